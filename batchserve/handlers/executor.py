"""A bounded executor for handler work: threads or processes, with back-pressure, deadlines and
cancellation expressed as the server's own errors."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import logging
import multiprocessing
import threading
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

from batchserve.errors import (
    DeadlineExceeded,
    InferenceFailed,
    ModelLoadError,
    NotReady,
    Overloaded,
)
from batchserve.handlers.config import EXECUTOR_KINDS, ExecutorKind

log = logging.getLogger("batchserve.handlers")

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class ExecutorStatistics:
    kind: ExecutorKind
    workers: int
    max_pending: int
    pending: int  # submitted and not finished: waiting or running
    completed: int
    rejected: int  # refused with 429: max_pending reached
    timed_out: int  # the caller's deadline passed first
    cancelled: int  # the caller went away before the work started
    restarts: int  # process pools rebuilt after a worker died


def _ping() -> None:
    """Runs once in each new worker process: returns when its initializer has run."""


class HandlerExecutor:
    """`async with HandlerExecutor("thread", workers=2, max_pending=32) as ex:
    result = await ex.run(fn, arg, timeout_s=0.5)`.

    `max_pending` bounds the calls submitted and not finished (waiting and running): one more
    is refused at once with Overloaded (429). A call past its `timeout_s` raises
    DeadlineExceeded (504); a call whose caller is cancelled or times out is withdrawn if it has
    not started. Work already running cannot be interrupted, so it keeps its slot until it ends:
    the bound is on real work, not on callers.

    Processes: `fn` and its arguments travel by pickle (the stdlib's transport between our own
    processes), so `fn` must be a module-level function; `initializer(*initargs)` runs once in
    each worker process (to import and set up a handler there). Workers are spawned, not
    forked: the parent runs threads (the event loop, ONNX Runtime) that a fork would copy
    mid-flight.
    """

    def __init__(
        self,
        kind: ExecutorKind = "thread",
        workers: int = 1,
        max_pending: int = 16,
        *,
        initializer: Callable[..., object] | None = None,
        initargs: tuple[Any, ...] = (),
        start_timeout_s: float = 60.0,
    ) -> None:
        if kind not in EXECUTOR_KINDS:
            raise ValueError(f"executor kind must be one of {EXECUTOR_KINDS}, got {kind!r}")
        if workers < 1 or max_pending < 1:
            raise ValueError("workers and max_pending must be >= 1")
        self.kind: ExecutorKind = kind
        self.workers = workers
        self.max_pending = max_pending
        self._initializer = initializer
        self._initargs = initargs
        self._start_timeout_s = start_timeout_s
        self._pool: cf.Executor | None = None
        # Released from worker threads (thread pools) and the loop: a lock keeps counts exact.
        self._lock = threading.Lock()
        self._pending = 0
        self._completed = 0
        self._rejected = 0
        self._timed_out = 0
        self._cancelled = 0
        self._restarts = 0

    async def __aenter__(self) -> HandlerExecutor:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Start the workers; returns when every one is ready (process initializers done)."""
        if self._pool is not None:
            return
        pool = self._new_pool()
        self._pool = pool
        if self.kind == "process":
            try:
                await self._warm_up(pool)
            except BaseException:
                self._pool = None
                pool.shutdown(wait=False, cancel_futures=True)
                raise

    def _new_pool(self) -> cf.Executor:
        if self.kind == "thread":
            return cf.ThreadPoolExecutor(
                self.workers,
                thread_name_prefix="batchserve-handler",
                initializer=self._initializer,
                initargs=self._initargs,
            )
        return cf.ProcessPoolExecutor(
            self.workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=self._initializer,
            initargs=self._initargs,
        )

    async def _warm_up(self, pool: cf.Executor) -> None:
        # Submitted together, the pings make the pool spawn all its workers now instead of on
        # the first requests; a failing initializer breaks the pool, which surfaces here.
        pings = [asyncio.wrap_future(pool.submit(_ping)) for _ in range(self.workers)]
        try:
            async with asyncio.timeout(self._start_timeout_s):
                await asyncio.gather(*pings)
        except TimeoutError:
            raise ModelLoadError(
                f"handler worker processes not ready within {self._start_timeout_s:g} s"
            ) from None
        except cf.BrokenExecutor as err:
            raise ModelLoadError(
                f"handler worker processes failed to start (see their log): {err}"
            ) from None

    async def aclose(self) -> None:
        """Drop work not started, wait for the running calls to end, stop the workers."""
        pool, self._pool = self._pool, None
        if pool is not None:
            await asyncio.to_thread(pool.shutdown, wait=True, cancel_futures=True)

    async def run(self, fn: Callable[..., T], /, *args: Any, timeout_s: float | None = None) -> T:
        """`fn(*args)` on a worker; see the class docstring for the errors."""
        pool = self._pool
        if pool is None:
            raise NotReady("the handler executor is not running")
        if timeout_s is not None and timeout_s <= 0:
            self._count_timeout()
            raise DeadlineExceeded("the request's deadline passed before its handler ran")
        future = self._submit(pool, fn, args)
        try:
            if timeout_s is None:
                return await asyncio.wrap_future(future)
            async with asyncio.timeout(timeout_s) as scope:
                return await asyncio.wrap_future(future)
        except TimeoutError:
            if timeout_s is None or not scope.expired():
                raise  # raised by fn itself, not our deadline
            future.cancel()
            self._count_timeout()
            raise DeadlineExceeded(
                f"handler did not finish within the request's deadline of {timeout_s * 1000:g} ms"
            ) from None
        except asyncio.CancelledError:
            future.cancel()
            raise
        except cf.BrokenExecutor as err:
            self._replace(pool)
            raise InferenceFailed(f"a handler worker process died: {err}") from None

    def _submit(
        self, pool: cf.Executor, fn: Callable[..., T], args: tuple[Any, ...]
    ) -> cf.Future[T]:
        with self._lock:
            if self._pending >= self.max_pending:
                self._rejected += 1
                raise Overloaded(
                    f"handler overloaded: {self._pending} requests in its "
                    f"{self.workers} worker(s), the limit is {self.max_pending}"
                )
            self._pending += 1
        try:
            future = pool.submit(fn, *args)
        except BaseException as err:
            with self._lock:
                self._pending -= 1
            if isinstance(err, cf.BrokenExecutor):
                self._replace(pool)
                raise InferenceFailed(f"a handler worker process died: {err}") from None
            raise
        future.add_done_callback(self._release)
        return future

    def _release(self, future: cf.Future[Any]) -> None:
        with self._lock:
            self._pending -= 1
            if future.cancelled():
                self._cancelled += 1
            else:
                self._completed += 1

    def _count_timeout(self) -> None:
        with self._lock:
            self._timed_out += 1

    def _replace(self, broken: cf.Executor) -> None:
        """A dead worker process breaks the whole stdlib pool: build a new one once."""
        if self._pool is not broken:
            return  # already replaced (or closed) by another caller
        log.error("a handler worker process died; starting new ones")
        broken.shutdown(wait=False, cancel_futures=True)
        self._pool = self._new_pool()
        self._restarts += 1

    def statistics(self) -> ExecutorStatistics:
        with self._lock:
            return ExecutorStatistics(
                self.kind,
                self.workers,
                self.max_pending,
                self._pending,
                self._completed,
                self._rejected,
                self._timed_out,
                self._cancelled,
                self._restarts,
            )
