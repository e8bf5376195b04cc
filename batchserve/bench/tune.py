"""`batchserve tune`: try server settings, sweep each, keep the fastest under the SLO.

Like Triton's Model Analyzer, but built in: each candidate is a real `batchserve serve`
process on 127.0.0.1, measured by the same open-loop sweep as `batchserve bench --sweep`.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from typing import Any

from batchserve.bench.loadgen import LoadConfig
from batchserve.bench.measure import (
    Target,
    at_rate,
    listening_url,
    measure,
    model_metadata,
    sweep,
)
from batchserve.bench.report import Report
from batchserve.bench.workload import build_workload


@dataclass(frozen=True, slots=True)
class Candidate:
    max_batch_size: int = 64
    max_latency_ms: float = 2.0
    instances: int = 1
    intra_op_threads: int = 0

    def flags(self) -> list[str]:
        return [
            "--max-batch-size", str(self.max_batch_size),
            "--max-latency-ms", str(self.max_latency_ms),
            "--instances", str(self.instances),
            "--intra-op-threads", str(self.intra_op_threads),
        ]  # fmt: skip

    def label(self) -> str:
        threads = self.intra_op_threads or "auto"
        return (
            f"batch {self.max_batch_size}, latency {self.max_latency_ms:g} ms, "
            f"{self.instances} session(s), {threads} thread(s)"
        )


def candidates() -> list[Candidate]:
    """The defaults first, then one change at a time, then the usual winning combinations."""
    base = Candidate()
    return [
        base,
        replace(base, intra_op_threads=1),
        replace(base, max_latency_ms=0.0),
        replace(base, max_batch_size=16),
        replace(base, max_batch_size=256),
        replace(base, instances=2),
        replace(base, instances=2, intra_op_threads=1),
        replace(base, max_batch_size=256, max_latency_ms=5.0),
    ]


@dataclass(slots=True)
class Trial:
    candidate: Candidate
    best: Report | None
    curve: list[Report]
    seconds: float

    @property
    def rate(self) -> float:
        return self.best.target_rate or 0.0 if self.best else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "settings": asdict(self.candidate),
            "best": self.best.as_dict() if self.best else None,
            "curve": [r.as_dict() for r in self.curve],
            "seconds": self.seconds,
        }


@contextlib.contextmanager
def serving(model: str, name: str, candidate: Candidate) -> Iterator[str]:
    """A `batchserve serve` subprocess with the candidate's settings; stopped by PID."""
    command = [sys.executable, "-m", "batchserve", "serve", model, "--name", name]
    # Measured over HTTP: no gRPC port, which could clash with a server already running.
    command += ["--host", "127.0.0.1", "--port", "0", "--grpc-port", "off"]
    command += ["--log-level", "info", *candidate.flags()]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stderr is not None
        yield listening_url(process.stderr, 120, f"the server ({candidate.label()})")
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def tune(
    model: str,
    *,
    slo_p99_ms: float,
    budget_s: float,
    load: LoadConfig,
    binary: bool = False,
    rows: int = 1,
    start_rate: float = 250.0,
    max_rate: float = 200_000.0,
) -> list[Trial]:
    """Sweep candidates until the budget runs out (a trial is started only if the last one's
    duration still fits); returns the trials, best first."""
    name = "tuned"
    started = time.monotonic()
    trials: list[Trial] = []
    for candidate in candidates():
        elapsed = time.monotonic() - started
        last = trials[-1].seconds if trials else 0.0
        if trials and elapsed + last > budget_s:
            break
        trial_started = time.monotonic()
        with serving(model, name, candidate) as url:
            metadata = model_metadata(url, name)
            workload = build_workload(url, name, metadata, binary=binary, rows=rows)
            target = Target(url, name)

            def run(rate: float, target: Target = target, workload: Any = workload) -> Report:
                return measure(target, workload, at_rate(load, rate))

            curve, best = sweep(run, slo_p99_ms, start_rate, max_rate, bisect_steps=2)
        trial = Trial(candidate, best, curve, time.monotonic() - trial_started)
        trials.append(trial)
        rate = f"{trial.rate:,.0f} req/s" if best else "no rate held the SLO"
        print(f"  {candidate.label()}: {rate} ({trial.seconds:.0f} s)", flush=True)
    return sorted(trials, key=lambda t: t.rate, reverse=True)


def trials_table(trials: list[Trial]) -> str:
    lines = [
        "| settings | best rate under SLO | p50 ms | p99 ms | mean batch rows |",
        "|---|---:|---:|---:|---:|",
    ]
    for trial in trials:
        best = trial.best
        if best is None:
            lines.append(f"| {trial.candidate.label()} | none | | | |")
            continue
        batch = best.server.get("mean_batch_rows")
        lines.append(
            f"| {trial.candidate.label()} | {trial.rate:,.0f} | {best.latency_ms['p50']:.2f} | "
            f"{best.latency_ms['p99']:.2f} | {f'{batch:.1f}' if batch else 'n/a'} |"
        )
    return "\n".join(lines)
