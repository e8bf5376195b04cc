"""Drive a server open loop (requests on a schedule) or closed loop (N callers back to back).

Open loop measures each request's latency from the time it was *scheduled*, not from the time
it went out, so a server that stalls cannot hide the requests it kept waiting (coordinated
omission). Several processes split the load when one Python process cannot generate it.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from batchserve.bench.transport import ConnectionPool
from batchserve.bench.workload import Workload


@dataclass(frozen=True, slots=True)
class LoadConfig:
    """rate: requests/s for open loop; concurrency: callers for closed loop (exactly one set)."""

    rate: float | None = None
    concurrency: int | None = None
    duration_s: float = 10.0
    warmup_s: float = 2.0
    arrivals: Literal["constant", "poisson"] = "constant"
    max_outstanding: int = 1024
    timeout_s: float = 30.0
    processes: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if (self.rate is None) == (self.concurrency is None):
            raise ValueError("set exactly one of rate (open loop) or concurrency (closed loop)")
        if self.rate is not None and self.rate <= 0:
            raise ValueError("rate must be > 0")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        if self.duration_s <= 0 or self.warmup_s < 0 or self.processes < 1:
            raise ValueError("duration must be > 0, warm-up >= 0, processes >= 1")
        if self.max_outstanding < 1:
            raise ValueError("max_outstanding must be >= 1")
        if self.timeout_s <= 0:
            raise ValueError("timeout must be > 0")

    @property
    def open_loop(self) -> bool:
        return self.rate is not None


@dataclass(slots=True)
class RawResult:
    """One process's measurements (latencies in seconds: `latencies` of successful requests,
    `refused_latencies` of those answered with an error status, such as shed 429s)."""

    latencies: list[float] = field(default_factory=list)
    refused_latencies: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    exceptions: Counter[str] = field(default_factory=Counter)
    window_start: float = 0.0
    last_completion: float = 0.0
    delayed_by_cap: int = 0


class _Recorder:
    __slots__ = ("counter", "result", "window_end", "window_start")

    def __init__(self, window_start: float, window_end: float, counter: Any) -> None:
        self.result = RawResult(window_start=window_start)
        self.window_start = window_start
        self.window_end = window_end
        self.counter = counter

    def measured(self, started: float) -> bool:
        return self.window_start <= started < self.window_end

    def ok(self, started: float, ended: float) -> None:
        self.result.latencies.append(ended - started)
        self.result.last_completion = max(self.result.last_completion, ended)

    def failed(self, status: int | None, error: BaseException | None) -> None:
        if status is not None:
            self.result.statuses[status] += 1
        if error is not None:
            self.result.exceptions[type(error).__name__] += 1


async def _one(
    http: ConnectionPool, workload: Workload, index: int, started: float, rec: _Recorder
) -> None:
    try:
        status = await http.post(workload.body(index).raw)
    except OSError as err:  # refused, reset, closed, timed out (all OSError subclasses)
        if rec.measured(started):
            rec.failed(None, err)
        return
    ended = time.perf_counter()
    if rec.counter is not None and status == 200:
        rec.counter.value += 1  # progress display, warm-up included
    if not rec.measured(started):
        return
    if status == 200:
        rec.ok(started, ended)
    else:
        rec.failed(status, None)
        rec.result.refused_latencies.append(ended - started)


def _schedule(config: LoadConfig, share: float, start: float, end: float, seed: int) -> Any:
    """Send times (perf_counter seconds) from `start` until `end` at `share` of the rate."""
    assert config.rate is not None
    rate = config.rate * share
    if config.arrivals == "constant":
        gap = 1.0 / rate
        n = 0
        while (when := start + n * gap) < end:
            yield when
            n += 1
        return
    rng = np.random.default_rng(seed)
    when = start
    while True:
        when += float(rng.exponential(1.0 / rate))
        if when >= end:
            return
        yield when


async def _open_loop(
    http: ConnectionPool,
    workload: Workload,
    config: LoadConfig,
    share: float,
    start: float,
    rec: _Recorder,
    seed: int,
) -> None:
    tasks: set[asyncio.Task[None]] = set()
    for index, scheduled in enumerate(_schedule(config, share, start, rec.window_end, seed)):
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if http.saturated:
            rec.result.delayed_by_cap += 1  # it waits for a slot, and the wait counts
        task = asyncio.create_task(_one(http, workload, index, scheduled, rec))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(tasks, timeout=config.timeout_s)


async def _closed_loop(
    http: ConnectionPool, workload: Workload, callers: int, rec: _Recorder
) -> None:
    async def caller(offset: int) -> None:
        index = offset
        while (started := time.perf_counter()) < rec.window_end:
            await _one(http, workload, index, started, rec)
            index += callers

    await asyncio.gather(*(caller(i) for i in range(callers)))


async def _run_process(
    workload: Workload, config: LoadConfig, index: int, start: float, counter: Any
) -> RawResult:
    share = 1.0 / config.processes
    window_start = start + config.warmup_s
    rec = _Recorder(window_start, window_start + config.duration_s, counter)
    callers = 0
    if config.concurrency is not None:
        callers = config.concurrency // config.processes + (
            1 if index < config.concurrency % config.processes else 0
        )
    limit = callers if config.concurrency is not None else config.max_outstanding
    async with ConnectionPool(workload.url, max(limit, 1), config.timeout_s) as http:
        await asyncio.sleep(max(0.0, start - time.perf_counter()))
        if config.open_loop:
            await _open_loop(http, workload, config, share, start, rec, config.seed + index)
        elif callers:
            await _closed_loop(http, workload, callers, rec)
    return rec.result


def _event_loop_run(coro: Any) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def _worker(
    workload: Workload, config: LoadConfig, index: int, start: float, counter: Any, out: Any
) -> None:
    try:
        result = _event_loop_run(_run_process(workload, config, index, start, counter))
    except BaseException as err:  # report, don't hang the parent
        out.put((index, f"{type(err).__name__}: {err}"))
        raise
    out.put((index, result))


def run_load(
    workload: Workload, config: LoadConfig, progress: bool | None = None
) -> list[RawResult]:
    """Run the load (blocking); one RawResult per process."""
    show = sys.stderr.isatty() if progress is None else progress
    context = mp.get_context("spawn")
    counters = [context.RawValue("q", 0) for _ in range(config.processes)]
    if config.processes == 1:
        start = time.perf_counter() + 0.2
        return [
            _with_progress(
                lambda: _event_loop_run(_run_process(workload, config, 0, start, counters[0])),
                counters,
                config,
                start,
                show,
            )
        ]
    start = time.perf_counter() + 2.0  # time for the spawned interpreters to import
    queue = context.Queue()
    workers = [
        context.Process(target=_worker, args=(workload, config, i, start, counters[i], queue))
        for i in range(config.processes)
    ]
    for worker in workers:
        worker.start()

    def collect() -> list[RawResult]:
        deadline = start + config.warmup_s + config.duration_s + config.timeout_s + 30
        results = [queue.get(timeout=max(1.0, deadline - time.perf_counter())) for _ in workers]
        failures = [r for _, r in results if isinstance(r, str)]
        if failures:
            raise RuntimeError(f"a load generator process failed: {failures[0]}")
        return [result for _, result in sorted(results, key=lambda pair: pair[0])]

    try:
        collected: list[RawResult] = _with_progress(collect, counters, config, start, show)
        return collected
    finally:
        for worker in workers:
            worker.join(timeout=10)
            if worker.is_alive():
                worker.kill()


def _with_progress(
    work: Any, counters: list[Any], config: LoadConfig, start: float, show: bool
) -> Any:
    if not show:
        return work()
    import threading

    stop = threading.Event()

    def report() -> None:
        last, last_t = 0, time.perf_counter()
        while not stop.wait(0.5):
            done = sum(c.value for c in counters)
            now = time.perf_counter()
            phase = "warm-up" if now < start + config.warmup_s else "measuring"
            rate = (done - last) / (now - last_t)
            print(f"\r  {phase}: {done:,} ok, {rate:,.0f} req/s   ", end="", file=sys.stderr)
            last, last_t = done, now
        print("\r" + " " * 60 + "\r", end="", file=sys.stderr)

    thread = threading.Thread(target=report, daemon=True)
    thread.start()
    try:
        return work()
    finally:
        stop.set()
        thread.join()
