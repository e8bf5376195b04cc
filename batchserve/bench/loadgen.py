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
from collections.abc import Iterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from queue import Empty
from typing import Any, Literal, Protocol

import numpy as np

from batchserve.bench.errors import BenchError
from batchserve.bench.transport import ConnectionPool
from batchserve.bench.workload import Workload


@dataclass(frozen=True, slots=True)
class LoadConfig:
    """rate: requests/s for open loop; concurrency: callers for closed loop (exactly one set).
    max_outstanding (open loop) and concurrency are totals over all processes; timeout_s counts
    from each request's scheduled (open loop) or actual (closed loop) send time."""

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
        if self.rate is not None and self.max_outstanding < self.processes:
            raise ValueError("max_outstanding must be >= processes (each holds a share)")
        if self.timeout_s <= 0:
            raise ValueError("timeout must be > 0")

    @property
    def open_loop(self) -> bool:
        return self.rate is not None


# An answer's status: the HTTP status code, or the gRPC status code's name ("OK").
Status = int | str


@dataclass(slots=True)
class RawResult:
    """One process's measurements. `requests` counts the sends scheduled (open loop) or started
    (closed loop) inside the window; each of them ends in exactly one of `latencies` (answered
    200, or OK over gRPC), `statuses` (answered with an error status: an HTTP status, or a
    gRPC status code's name) or `exceptions` (no answer).

    Latencies are in seconds from the scheduled (open loop) or actual (closed loop) send time:
    `refused_latencies` of error statuses such as shed 429s, `timeout_latencies` of requests
    given up on (timed out, gRPC's DEADLINE_EXCEEDED included, or still pending when the run
    ended), each the time it had waited by then: a lower bound of the latency it would have
    had."""

    requests: int = 0
    latencies: list[float] = field(default_factory=list)
    refused_latencies: list[float] = field(default_factory=list)
    timeout_latencies: list[float] = field(default_factory=list)
    statuses: Counter[Status] = field(default_factory=Counter)
    exceptions: Counter[str] = field(default_factory=Counter)
    window_start: float = 0.0
    last_completion: float = 0.0
    delayed_by_cap: int = 0


# A request the run ended on before its deadline was enforced (for example one still connecting).
NOT_COMPLETED = "NotCompleted"


class Client(AbstractAsyncContextManager[Any], Protocol):
    """What the load loops drive: HTTP's `ConnectionPool`, or a gRPC client, each an async
    context manager holding its connections. `post` sends one pre-encoded request and returns
    its answer's status: `ok_status` is a success, `timeout_status` (if any) a request the
    server or the client gave up on at its deadline. No answer at all raises an OSError
    (timed out waiting: a TimeoutError)."""

    @property
    def ok_status(self) -> Status: ...

    @property
    def timeout_status(self) -> Status | None: ...

    @property
    def saturated(self) -> bool: ...

    @property
    def sweep_interval(self) -> float: ...

    async def post(self, raw: bytes, deadline: float | None = None) -> Status: ...


# Room for a busy event loop to run the sweep that enforces the last deadline; waited out only
# while a request is still out.
_FINISH_SLACK_S = 0.1


class _Recorder:
    __slots__ = (
        "counter", "ok_status", "result", "timeout_s", "timeout_status", "window_end",
        "window_start",
    )  # fmt: skip

    def __init__(
        self, window_start: float, window_end: float, timeout_s: float, counter: Any
    ) -> None:
        self.result = RawResult(window_start=window_start)
        self.window_start = window_start
        self.window_end = window_end
        self.timeout_s = timeout_s
        self.counter = counter
        self.ok_status: Status = 200
        self.timeout_status: Status | None = None

    def measured(self, started: float) -> bool:
        return self.window_start <= started < self.window_end

    def count(self, started: float) -> None:
        if self.measured(started):
            self.result.requests += 1

    def ok(self, started: float, ended: float) -> None:
        self.result.latencies.append(ended - started)
        self.result.last_completion = max(self.result.last_completion, ended)

    def refused(self, status: Status, started: float, ended: float) -> None:
        self.result.statuses[status] += 1
        if status == self.timeout_status:
            self.result.timeout_latencies.append(ended - started)
        else:
            self.result.refused_latencies.append(ended - started)

    def error(self, name: str, started: float, timed_out: bool) -> None:
        self.result.exceptions[name] += 1
        if timed_out:
            self.result.timeout_latencies.append(time.perf_counter() - started)


async def _one(client: Client, raw: bytes, started: float, rec: _Recorder) -> None:
    try:
        status = await client.post(raw, started + rec.timeout_s)
    except OSError as err:  # refused, reset, closed, timed out (all OSError subclasses)
        if rec.measured(started):
            rec.error(type(err).__name__, started, isinstance(err, TimeoutError))
        return
    except asyncio.CancelledError:
        # The run ended with this request still out: it counts, as a request given up on.
        if rec.measured(started):
            rec.error(NOT_COMPLETED, started, timed_out=True)
        raise
    ended = time.perf_counter()
    ok = status == rec.ok_status
    if rec.counter is not None and ok:
        rec.counter.value += 1  # progress display, warm-up included
    if not rec.measured(started):
        return
    if ok:
        rec.ok(started, ended)
    else:
        rec.refused(status, started, ended)


def send_times(config: LoadConfig, process: int, start: float, end: float) -> Iterator[float]:
    """Process `process`'s send times (perf_counter seconds) from `start` until `end`.

    Constant arrivals: the processes take turns, process i sending at start + (n·P + i) / rate,
    so the merged schedule is evenly spaced. Poisson arrivals: each process draws its own gaps
    (its own seed) at 1/P of the rate; independent Poisson streams merge into one."""
    assert config.rate is not None
    rate = config.rate / config.processes
    if config.arrivals == "constant":
        first, gap = start + process / config.rate, 1.0 / rate
        n = 0
        while (when := first + n * gap) < end:
            yield when
            n += 1
        return
    rng = np.random.default_rng(config.seed + process)
    when = start
    while True:
        when += float(rng.exponential(1.0 / rate))
        if when >= end:
            return
        yield when


def _share(total: int, processes: int, process: int) -> range:
    """Process `process`'s part of 0..total-1, split as evenly as possible."""
    base, extra = divmod(total, processes)
    first = process * base + min(process, extra)
    return range(first, first + base + (1 if process < extra else 0))


def callers_of(config: LoadConfig, process: int) -> range:
    """Closed loop: the global ids of process `process`'s callers. Caller g sends the bodies
    g, g + concurrency, ..., so no two callers in any process send the same workload position."""
    assert config.concurrency is not None
    return _share(config.concurrency, config.processes, process)


async def _open_loop(
    http: Client,
    workload: Workload,
    config: LoadConfig,
    process: int,
    start: float,
    rec: _Recorder,
) -> None:
    tasks: set[asyncio.Task[None]] = set()
    last = start
    for k, scheduled in enumerate(send_times(config, process, start, rec.window_end)):
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        rec.count(scheduled)
        if http.saturated and rec.measured(scheduled):
            rec.result.delayed_by_cap += 1  # it waits for a slot, and the wait counts
        # The global position in the merged schedule: processes never send the same body
        # position, so --unique-fraction holds across processes.
        raw = workload.body(k * config.processes + process).raw
        task = asyncio.create_task(_one(http, raw, scheduled, rec))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        last = scheduled
    # Every deadline (scheduled + timeout) is enforced by then; what is left is cancelled and
    # recorded, so no scheduled request goes missing from the report.
    await _finish(tasks, last + config.timeout_s + 2 * http.sweep_interval + _FINISH_SLACK_S)


async def _finish(tasks: set[asyncio.Task[None]], until: float) -> None:
    """Wait for `tasks` until `until`, then cancel (and so record) what is left."""
    if not tasks:
        return
    _, pending = await asyncio.wait(tasks, timeout=max(0.0, until - time.perf_counter()))
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.wait(pending)


async def _closed_loop(
    http: Client, workload: Workload, callers: range, total: int, rec: _Recorder
) -> None:
    async def caller(index: int) -> None:
        while (started := time.perf_counter()) < rec.window_end:
            rec.count(started)
            await _one(http, workload.body(index).raw, started, rec)
            index += total

    tasks = {asyncio.create_task(caller(g)) for g in callers}
    await _finish(tasks, rec.window_end + rec.timeout_s + 2 * http.sweep_interval + _FINISH_SLACK_S)


async def _run_process(
    workload: Workload, config: LoadConfig, process: int, start: float, counter: Any
) -> RawResult:
    window_start = start + config.warmup_s
    rec = _Recorder(window_start, window_start + config.duration_s, config.timeout_s, counter)
    callers = range(0)
    # --max-outstanding bounds the whole load, so each process holds its share of it.
    limit = len(_share(config.max_outstanding, config.processes, process))
    if config.concurrency is not None:
        callers = callers_of(config, process)
        limit = len(callers)
    http = _client(workload, max(limit, 1), config.timeout_s)
    rec.ok_status, rec.timeout_status = http.ok_status, http.timeout_status
    async with http:
        # uvloop's millisecond timers may wake early, and a closed-loop request sent before
        # `start` would fall outside a window without warm-up: sleep again for the rest.
        while (wait := start - time.perf_counter()) > 0:  # noqa: ASYNC110 - a clock deadline
            await asyncio.sleep(wait)
        if config.open_loop:
            await _open_loop(http, workload, config, process, start, rec)
        elif config.concurrency is not None and callers:
            await _closed_loop(http, workload, callers, config.concurrency, rec)
    return rec.result


def _client(workload: Workload, limit: int, timeout_s: float) -> Client:
    """The workload's client, holding at most `limit` requests in flight."""
    if workload.protocol == "http":
        return ConnectionPool(workload.url, limit, timeout_s)
    # Imported here: HTTP runs never load grpc.
    from batchserve.bench.grpc_client import StreamClient, UnaryClient, parse_target

    kind = StreamClient if workload.protocol == "grpc-stream" else UnaryClient
    return kind(parse_target(workload.url), workload.headers, limit, timeout_s)


def _event_loop_run(coro: Any) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def _process_main(
    workload: Workload, config: LoadConfig, index: int, start: float, counter: Any, out: Any
) -> None:
    """One load generator process: its share of the callers, its result put on `out`."""
    try:
        result = _event_loop_run(_run_process(workload, config, index, start, counter))
    except Exception as err:  # reported by the parent in one line; don't hang it
        out.put((index, f"{type(err).__name__}: {err}"))
        return
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
    processes = [
        context.Process(target=_process_main, args=(workload, config, i, start, counters[i], queue))
        for i in range(config.processes)
    ]
    for process in processes:
        process.start()

    def collect() -> list[RawResult]:
        deadline = start + config.warmup_s + config.duration_s + config.timeout_s + 30
        try:
            results = [
                queue.get(timeout=max(1.0, deadline - time.perf_counter())) for _ in processes
            ]
        except Empty:
            raise BenchError(
                f"a load generator process did not report within "
                f"{deadline - start:.0f} s of the start"
            ) from None
        failures = [r for _, r in results if isinstance(r, str)]
        if failures:
            raise BenchError(f"a load generator process failed: {failures[0]}")
        return [result for _, result in sorted(results, key=lambda pair: pair[0])]

    try:
        collected: list[RawResult] = _with_progress(collect, counters, config, start, show)
        return collected
    finally:
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()


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
