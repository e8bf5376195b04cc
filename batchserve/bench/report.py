"""Turn raw measurements into the figures people compare: rate, percentiles, errors."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from batchserve.bench.loadgen import LoadConfig, RawResult, Status

PERCENTILES = (50.0, 90.0, 95.0, 99.0, 99.9)


@dataclass(slots=True)
class Report:
    mode: str
    target_rate: float | None
    concurrency: int | None
    duration_s: float
    processes: int
    requests: int
    ok: int
    achieved_rps: float
    latency_ms: dict[str, float]
    errors_by_status: dict[str, int]
    errors_by_exception: dict[str, int]
    delayed_by_cap: int
    server: dict[str, Any] = field(default_factory=dict)
    # Latency of requests answered with an error status (shed 429s, 503s): how fast refusals are.
    refused_latency_ms: dict[str, float] = field(default_factory=dict)
    # Requests given up on (timed out or not completed), also in latency_ms at their wait.
    timed_out: int = 0

    @property
    def errors(self) -> int:
        return self.requests - self.ok

    @property
    def p99_ms(self) -> float:
        return self.latency_ms.get("p99", float("inf"))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def text(self) -> str:
        target = (
            f"open loop at {self.target_rate:,.0f} req/s"
            if self.target_rate
            else f"closed loop, {self.concurrency} callers"
        )
        lat = self.latency_ms
        lines = [
            f"{target}, {self.duration_s:g} s measured, {self.processes} process(es)",
            f"  achieved   {self.achieved_rps:,.0f} req/s ({self.ok:,} ok of {self.requests:,})",
            "  latency ms "
            + "  ".join(f"{k} {v:.2f}" for k, v in lat.items() if k != "mean")
            + (f"  mean {lat['mean']:.2f}" if "mean" in lat else ""),
        ]
        if self.timed_out:
            lines.append(
                f"  latency includes {self.timed_out:,} timed-out request(s) at the time each "
                "was given up (a lower bound)"
            )
        if self.errors:
            lines.append(
                f"  errors     by status {self.errors_by_status or '{}'}, "
                f"by exception {self.errors_by_exception or '{}'}"
            )
        else:
            lines.append("  errors     none")
        if self.refused_latency_ms:
            refused = self.refused_latency_ms
            lines.append(
                f"  refusals   answered in p50 {refused['p50']:.2f} ms, p99 {refused['p99']:.2f} ms"
            )
        if self.delayed_by_cap:
            lines.append(f"  {self.delayed_by_cap:,} requests waited for a free slot (cap)")
        if self.server:
            lines.append(
                "  server     "
                + ", ".join(
                    f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                    for k, v in self.server.items()
                )
                + " (warm-up included)"
            )
        return "\n".join(lines)


def summarize(results: list[RawResult], config: LoadConfig) -> Report:
    """`requests` is every request scheduled (open loop) or started (closed loop) in the
    window; the latency percentiles cover the answered ones and, at the time each was given
    up, the timed-out ones, so a backlog the server never cleared still shows."""
    latencies = _concatenate(r.latencies for r in results)
    timeouts = _concatenate(r.timeout_latencies for r in results)
    statuses: Counter[Status] = Counter()
    exceptions: Counter[str] = Counter()
    for result in results:
        statuses.update(result.statuses)
        exceptions.update(result.exceptions)
    ok = int(latencies.size)
    window_start = min(r.window_start for r in results)
    last = max((r.last_completion for r in results), default=window_start)
    # Open loop: the window is fixed; a server that falls behind finishes late and so scores
    # less. Closed loop: callers stop starting requests at the window's end.
    elapsed = max(config.duration_s, last - window_start)
    return Report(
        mode="open" if config.open_loop else "closed",
        target_rate=config.rate,
        concurrency=config.concurrency,
        duration_s=config.duration_s,
        processes=config.processes,
        requests=sum(r.requests for r in results),
        ok=ok,
        achieved_rps=ok / elapsed if elapsed > 0 else 0.0,
        latency_ms=_percentiles(np.concatenate([latencies, timeouts])),
        errors_by_status={str(k): statuses[k] for k in sorted(statuses, key=str)},
        errors_by_exception=dict(sorted(exceptions.items())),
        delayed_by_cap=sum(r.delayed_by_cap for r in results),
        refused_latency_ms=_percentiles(_concatenate(r.refused_latencies for r in results)),
        timed_out=int(timeouts.size),
    )


def _concatenate(lists: Iterable[list[float]]) -> np.ndarray:
    return np.concatenate([np.asarray(values, dtype=np.float64) for values in lists])


def _percentiles(latencies: np.ndarray) -> dict[str, float]:
    if not latencies.size:
        return {}
    ms = latencies * 1000.0
    values = np.percentile(ms, PERCENTILES)
    result = {f"p{p:g}": float(v) for p, v in zip(PERCENTILES, values, strict=True)}
    result["max"] = float(ms.max())
    result["mean"] = float(ms.mean())
    return result
