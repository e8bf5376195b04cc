"""Request-rate traces for the simulation: one rate per second of the day."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from batchserve.cost.errors import CostError

DAY_S = 86_400
MAX_TRACE_S = 31 * DAY_S  # a month of seconds is plenty, and bounds memory


@dataclass(frozen=True, slots=True)
class DiurnalShape:
    """A day of traffic: a cosine from `trough_fraction * peak` at `trough_hour` to the peak
    twelve hours later, and a spike that multiplies the rate by `spike_factor` for `spike_s`
    seconds from `spike_hour`, reached and left over `ramp_s` seconds."""

    peak_rps: float = 1000.0
    trough_fraction: float = 0.2
    trough_hour: float = 4.0
    spike_factor: float = 5.0
    spike_hour: float = 19.0
    spike_s: float = 600.0
    ramp_s: float = 60.0

    def __post_init__(self) -> None:
        if not self.peak_rps > 0 or not 0 <= self.trough_fraction <= 1:
            raise CostError("diurnal trace: peak must be > 0 and trough fraction in [0, 1]")
        if self.spike_factor < 1 or self.spike_s < 0 or self.ramp_s < 0:
            raise CostError("diurnal trace: spike factor >= 1, durations >= 0")


def diurnal(shape: DiurnalShape = DiurnalShape(), seconds: int = DAY_S) -> npt.NDArray[np.float64]:
    t = np.arange(seconds, dtype=np.float64)
    phase = 2 * math.pi * (t - shape.trough_hour * 3600) / DAY_S
    base = shape.trough_fraction + (1 - shape.trough_fraction) * (1 - np.cos(phase)) / 2
    start = shape.spike_hour * 3600
    ramp = max(shape.ramp_s, 1.0)
    rising = np.clip((t - start) / ramp, 0, 1)
    falling = np.clip((start + shape.ramp_s + shape.spike_s + shape.ramp_s - t) / ramp, 0, 1)
    envelope = np.minimum(rising, falling)
    rates: npt.NDArray[np.float64] = (
        shape.peak_rps * base * (1 + (shape.spike_factor - 1) * envelope)
    )
    return rates


def flat(rate: float, seconds: int) -> npt.NDArray[np.float64]:
    return np.full(seconds, float(rate), dtype=np.float64)


def read_csv(path: str | Path) -> npt.NDArray[np.float64]:
    """A `seconds,rate` CSV (header optional): each rate holds until the next row's time; the
    last one holds for as long as the gap before it (one second for a single row)."""
    times, rates = _rows(Path(path))
    step = times[-1] - times[-2] if len(times) > 1 else 1.0
    length = math.ceil(times[-1] + step)
    if length > MAX_TRACE_S:
        raise CostError(f"{path}: the trace spans {length:,} s; at most {MAX_TRACE_S:,} s")
    grid = np.arange(length, dtype=np.float64)
    index = np.searchsorted(np.asarray(times), grid, side="right") - 1
    values = np.asarray(rates, dtype=np.float64)
    result: npt.NDArray[np.float64] = np.where(index >= 0, values[np.maximum(index, 0)], 0.0)
    return result


def _rows(path: Path) -> tuple[list[float], list[float]]:
    try:
        text = path.read_text()
    except OSError as err:
        raise CostError(f"cannot read trace {path}: {err.strerror or err}") from None
    times: list[float] = []
    rates: list[float] = []
    for number, row in enumerate(csv.reader(text.splitlines()), start=1):
        if not row or not "".join(row).strip():
            continue
        try:
            second, rate = float(row[0]), float(row[1])
        except (ValueError, IndexError):
            if number == 1:
                continue  # a header line
            raise CostError(f"{path}:{number}: expected 'seconds,rate', got {row!r}") from None
        if rate < 0 or not math.isfinite(rate) or second < 0:
            raise CostError(f"{path}:{number}: seconds and rate must be >= 0")
        if times and second <= times[-1]:
            raise CostError(f"{path}:{number}: seconds must increase")
        times.append(second)
        rates.append(rate)
    if not times:
        raise CostError(f"{path}: the trace has no rows")
    return times, rates
