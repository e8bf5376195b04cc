"""Per-replica capacity from `batchserve bench --json` output.

A sweep file (`--sweep`) holds the latency-throughput curve: the capacity is the highest rate
whose p99 stayed under the SLO, and the curve itself drives the simulation. A single-run file
holds one report: its achieved rate counts only if its p99 held the SLO.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from batchserve.cost.errors import CostError

# Past the last measured point the replica is saturated; plots and p99 series show at least
# this multiple of the SLO there (the queue grows without bound, so any finite figure is a floor).
OVERLOAD_P99_FACTOR = 10.0


@dataclass(frozen=True, slots=True)
class Capacity:
    """Requests per second one replica serves with p99 under the SLO, and where it came from."""

    rps: float
    p99_ms: float | None
    origin: str

    def __post_init__(self) -> None:
        if not self.rps > 0 or math.isinf(self.rps):
            raise CostError(f"per-replica throughput must be a positive number, got {self.rps}")


@dataclass(frozen=True, slots=True)
class LatencyCurve:
    """p99 latency of one replica against the rate offered to it.

    rates must increase; p99s (and means) are made non-decreasing (a later point that measured
    lower is noise: more load never makes a replica faster). mean_ms, the mean latency at each
    rate, gives the requests in flight by Little's law; a curve without it (a single measured
    point) cannot say how many requests are in flight.
    """

    rates: tuple[float, ...]
    p99_ms: tuple[float, ...]
    capacity_rps: float
    slo_p99_ms: float
    mean_ms: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if not self.rates or len(self.rates) != len(self.p99_ms):
            raise CostError("a latency curve needs at least one (rate, p99) point")
        if self.mean_ms is not None and len(self.mean_ms) != len(self.rates):
            raise CostError("a latency curve needs one mean latency per rate")
        if any(b <= a for a, b in zip(self.rates, self.rates[1:], strict=False)):
            raise CostError("latency curve rates must increase")

    @classmethod
    def from_points(
        cls,
        points: list[tuple[float, float]],
        capacity_rps: float,
        slo_p99_ms: float,
        means: list[float] | None = None,
    ) -> LatencyCurve:
        order = sorted(range(len(points)), key=lambda i: points[i])
        rates: list[float] = []
        p99s: list[float] = []
        mean_list: list[float] = []
        worst = worst_mean = 0.0
        for i in order:
            rate, p99 = points[i]
            if rates and rate == rates[-1]:
                continue
            worst = max(worst, p99)
            rates.append(rate)
            p99s.append(worst)
            if means is not None:
                worst_mean = max(worst_mean, means[i])
                mean_list.append(worst_mean)
        mean_ms = tuple(mean_list) if means is not None else None
        return cls(tuple(rates), tuple(p99s), capacity_rps, slo_p99_ms, mean_ms)

    @classmethod
    def step(cls, capacity: Capacity, slo_p99_ms: float) -> LatencyCurve:
        """Without a sweep only one point is known: the capacity and its p99 (or the SLO)."""
        p99 = capacity.p99_ms if capacity.p99_ms is not None else slo_p99_ms
        return cls((capacity.rps,), (p99,), capacity.rps, slo_p99_ms)

    def scaled(self, capacity_rps: float) -> LatencyCurve:
        """The same shape for a replica of another capacity (a platform's own throughput): the
        same latencies at the same share of capacity, so requests in flight scale with it."""
        factor = capacity_rps / self.capacity_rps
        rates = tuple(r * factor for r in self.rates)
        return LatencyCurve(rates, self.p99_ms, capacity_rps, self.slo_p99_ms, self.mean_ms)

    def in_flight(self, rate: float) -> float:
        """Requests inside one replica serving `rate` req/s: rate x mean latency (Little's law),
        the mean interpolated on the curve. Needs mean_ms."""
        if self.mean_ms is None:
            raise CostError("this latency curve has no mean latencies (a sweep file has them)")
        mean = float(np.interp(rate, self.rates, self.mean_ms))
        return rate * mean / 1000.0

    @property
    def overload_p99_ms(self) -> float:
        return max(self.p99_ms[-1], OVERLOAD_P99_FACTOR * self.slo_p99_ms)


def read_bench_json(path: str, slo_p99_ms: float) -> Capacity:
    """Capacity from a `batchserve bench --json` file. `FILE#a.b` reads the object at key path
    a.b inside FILE (e.g. `docs/results/suite.json#sweeps.batchserve`)."""
    data = _load(path)
    if "curve" in data:
        best = _best_under_slo(data["curve"], slo_p99_ms)
        if best is None:
            raise CostError(f"{path}: no rate in the sweep held p99 < {slo_p99_ms:g} ms")
        return Capacity(best[0], best[1], f"{path}: sweep, best rate under the SLO")
    if "report" in data:
        return _single(data["report"], path, slo_p99_ms)
    raise CostError(f"{path}: not a `batchserve bench --json` file (no 'curve' or 'report')")


def read_sweep_curve(path: str, slo_p99_ms: float) -> LatencyCurve:
    """The latency-vs-offered-rate curve of a `batchserve bench --sweep --json` file."""
    data = _load(path)
    if "curve" not in data:
        raise CostError(f"{path}: not a sweep (`batchserve bench --sweep --json`) file")
    best = _best_under_slo(data["curve"], slo_p99_ms)
    if best is None:
        raise CostError(f"{path}: no rate in the sweep held p99 < {slo_p99_ms:g} ms")
    reports = _reports(data["curve"], path)
    points = [(_rate(r), _p99(r)) for r in reports]
    means = [_mean(r) for r in reports]
    usable = None if any(m is None for m in means) else [float(m or 0.0) for m in means]
    return LatencyCurve.from_points(points, best[0], slo_p99_ms, usable)


def read_traffic(path: str) -> tuple[float, float] | None:
    """(request bytes, response bytes) recorded in a bench file, or None where it records none
    (the keys `request_bytes` and `response_bytes` of the object the path names)."""
    data = _load(path)
    sizes = data.get("request_bytes"), data.get("response_bytes")
    if sizes[0] is None and sizes[1] is None:
        return None
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in sizes):
        raise CostError(f"{path}: 'request_bytes' and 'response_bytes' must both be numbers")
    return float(sizes[0]), float(sizes[1])  # type: ignore[arg-type]


def _load(path: str) -> dict[str, Any]:
    file, _, key_path = path.partition("#")
    try:
        data: Any = json.loads(Path(file).read_text())
    except OSError as err:
        raise CostError(f"cannot read {file}: {err.strerror or err}") from None
    except json.JSONDecodeError as err:
        raise CostError(f"{file}: not valid JSON: {err}") from None
    for key in filter(None, key_path.split(".")):
        if not isinstance(data, dict) or key not in data:
            raise CostError(f"{file}: no key {key!r} on the path {key_path!r}")
        data = data[key]
    if not isinstance(data, dict):
        raise CostError(f"{path}: expected a JSON object")
    return data


def _reports(curve: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(curve, list) or not all(isinstance(r, dict) for r in curve):
        raise CostError(f"{where}: 'curve' must be a list of reports")
    return curve


def _holds(report: dict[str, Any], slo_p99_ms: float) -> bool:
    errors = int(report.get("requests", 0)) - int(report.get("ok", 0))
    return errors == 0 and _p99(report) < slo_p99_ms


def _best_under_slo(curve: Any, slo_p99_ms: float) -> tuple[float, float] | None:
    """(achieved rate, p99) of the fastest point that held the SLO. The bench's own 'best' used
    the SLO of that run; recomputing here honours --slo-p99-ms."""
    held = [r for r in _reports(curve, "sweep") if _holds(r, slo_p99_ms)]
    if not held:
        return None
    best = max(held, key=lambda r: float(r.get("achieved_rps", 0.0)))
    return float(best["achieved_rps"]), _p99(best)


def _single(report: Any, where: str, slo_p99_ms: float) -> Capacity:
    if not isinstance(report, dict) or "achieved_rps" not in report:
        raise CostError(f"{where}: 'report' lacks 'achieved_rps'")
    p99 = _p99(report)
    if not _holds(report, slo_p99_ms):
        raise CostError(
            f"{where}: this run's p99 {p99:.1f} ms (or its errors) misses the "
            f"{slo_p99_ms:g} ms SLO; its throughput is not a capacity under the SLO"
        )
    return Capacity(float(report["achieved_rps"]), p99, f"{where}: single run")


def _p99(report: dict[str, Any]) -> float:
    latency = report.get("latency_ms") or {}
    return float(latency.get("p99", math.inf))


def _mean(report: dict[str, Any]) -> float | None:
    latency = report.get("latency_ms") or {}
    mean = latency.get("mean")
    return None if mean is None else float(mean)


def _rate(report: dict[str, Any]) -> float:
    # Open-loop points carry the offered rate; fall back to the achieved one.
    rate = report.get("target_rate") or report.get("achieved_rps")
    if rate is None:
        raise CostError("a sweep point has neither 'target_rate' nor 'achieved_rps'")
    return float(rate)
