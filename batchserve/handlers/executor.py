"""A bounded executor for handler work: threads or processes, with back-pressure, deadlines and
cancellation expressed as the server's own errors."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
import functools
import logging
import multiprocessing
import os
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

from batchserve.errors import (
    DeadlineExceeded,
    InferenceFailed,
    ModelLoadError,
    NotReady,
    Overloaded,
)
from batchserve.handlers.config import EXECUTOR_KINDS, ExecutorKind
from batchserve.lifecycle import Lifecycle

log = logging.getLogger("batchserve.handlers")

T = TypeVar("T")
P = ParamSpec("P")


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


def watch_parent(parent: int, interval_s: float = 0.5) -> None:
    """In a worker process: exit at once when `parent`, the process that started it, is gone
    (killed outright, its pool never shut down). Blocked in the pool's queue, which it holds
    open itself, a worker would otherwise never notice and live on with the handler in memory.
    `parent` comes from the parent itself: one killed while this worker was still starting
    has already been replaced by a reaper."""

    def watch() -> None:
        while os.getppid() == parent:
            threading.Event().wait(interval_s)
        os._exit(1)

    threading.Thread(target=watch, name="batchserve-parent-watch", daemon=True).start()


_Item = tuple["cf.Future[Any]", Callable[..., Any], tuple[Any, ...]]


class _DaemonThreadPool(cf.Executor):
    """A fixed pool of daemon threads. The stdlib's thread pool joins its threads when the
    interpreter exits, so one hung handler call would keep a stopping server alive forever;
    these can be abandoned once the drain deadline passed."""

    def __init__(self, workers: int, name: str) -> None:
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._shutdown = False
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}_{i}", daemon=True)
            for i in range(workers)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> cf.Future[T]:
        if kwargs:
            raise TypeError("keyword arguments are not supported")
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            future: cf.Future[T] = cf.Future()
            self._queue.put((future, fn, args))
        return future

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            future, fn, args = item
            del item
            if future.set_running_or_notify_cancel():
                try:
                    result = fn(*args)
                except BaseException as err:  # the caller's to see, as with the stdlib pool
                    _settle(future, err, None)
                else:
                    _settle(future, None, result)
            del future, fn, args
        self._queue.put(None)  # the stop mark goes on to the next thread

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shutdown = True
            if cancel_futures:
                while True:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is not None:
                        item[0].cancel()
            self._queue.put(None)
        if wait:
            for thread in self._threads:
                thread.join()


def _settle(future: cf.Future[Any], error: BaseException | None, result: Any) -> None:
    # An abandoned call's future was already failed by `HandlerExecutor.aclose`.
    with contextlib.suppress(cf.InvalidStateError):
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)


_ABANDONED = "the handler was stopped (model unloaded or server stopping) before this call ended"


def _start_worker(
    parent: int, initializer: Callable[..., object] | None, initargs: tuple[Any, ...]
) -> None:
    watch_parent(parent)
    if initializer is not None:
        initializer(*initargs)


def _processes(pool: cf.Executor) -> list[multiprocessing.process.BaseProcess]:
    """A process pool's worker processes (the stdlib exposes no public way to end them)."""
    found: dict[int, multiprocessing.process.BaseProcess] | None
    found = getattr(pool, "_processes", None)
    return list(found.values()) if found else []


def _join(processes: list[multiprocessing.process.BaseProcess], timeout_s: float) -> bool:
    """Whether every process ended within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
    return not any(p.is_alive() for p in processes)


def _kill(processes: list[multiprocessing.process.BaseProcess]) -> None:
    for process in processes:
        if process.is_alive():
            process.kill()


class HandlerExecutor(Lifecycle):
    """`async with HandlerExecutor("thread", workers=2, max_pending=32) as ex:
    result = await ex.run(fn, arg, timeout_s=0.5)`.

    `max_pending` bounds the calls submitted and not finished (waiting and running): one more
    is refused at once with Overloaded (429). A call past its `timeout_s` raises
    DeadlineExceeded (504); a call whose caller is cancelled or times out is withdrawn if it has
    not started. Work already running cannot be interrupted, so it keeps its slot until it ends:
    the bound is on real work, not on callers.

    Calls wait in this executor's own queue and go to the pool only when a worker is free:
    a withdrawn call leaves at once, its arguments (a request's body) with it. The stdlib's
    pools keep a cancelled call, arguments and all, until a worker reaches it, which behind a
    busy worker would let callers with short deadlines pile up data without bound; a process
    pool even takes calls ahead into its pipe, where they can no longer be withdrawn.

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
        drain_timeout_s: float = 30.0,
    ) -> None:
        if kind not in EXECUTOR_KINDS:
            raise ValueError(f"executor kind must be one of {EXECUTOR_KINDS}, got {kind!r}")
        if workers < 1 or max_pending < 1:
            raise ValueError("workers and max_pending must be >= 1")
        if kind == "thread" and initializer is not None:
            raise ValueError("an initializer is for process workers only")
        self.kind: ExecutorKind = kind
        self.workers = workers
        self.max_pending = max_pending
        self._initializer = initializer
        self._initargs = initargs
        self._start_timeout_s = start_timeout_s
        self.drain_timeout_s = drain_timeout_s
        self._pool: cf.Executor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._accepting = False
        self._futures: set[cf.Future[Any]] = set()  # submitted, not finished
        # Not yet handed to the pool, oldest first; a withdrawn call is removed at once.
        self._waiting: OrderedDict[cf.Future[Any], tuple[Callable[..., Any], tuple[Any, ...]]]
        self._waiting = OrderedDict()
        self._dispatched = 0  # handed to the pool and not finished: at most `workers`
        # Released from worker threads (thread pools) and the loop: a lock keeps counts exact.
        self._lock = threading.Lock()
        self._completed = 0
        self._rejected = 0
        self._timed_out = 0
        self._cancelled = 0
        self._restarts = 0

    async def start(self) -> None:
        """Start the workers; returns when every one is ready (process initializers done)."""
        if self._pool is not None:
            return
        self._loop = asyncio.get_running_loop()
        pool = self._new_pool()
        self._pool = pool
        if self.kind == "process":
            try:
                await self._warm_up(pool)
            except BaseException:
                self._pool = None
                processes = _processes(pool)
                pool.shutdown(wait=False, cancel_futures=True)
                _kill(processes)  # a hung initializer would keep them alive
                raise
        self._accepting = True

    def _new_pool(self) -> cf.Executor:
        if self.kind == "thread":
            return _DaemonThreadPool(self.workers, "batchserve-handler")
        return cf.ProcessPoolExecutor(
            self.workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_start_worker,
            initargs=(os.getpid(), self._initializer, self._initargs),
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

    @property
    def accepting(self) -> bool:
        """False once `aclose` has begun: new calls are refused (NotReady)."""
        return self._accepting

    async def aclose(self, timeout_s: float | None = None) -> None:
        """Take no more calls; let the submitted ones finish, queued ones included (their
        requests are in flight), for up to `timeout_s` (default: `drain_timeout_s`); then
        withdraw what has not started and abandon what still runs: its callers get NotReady
        (503), threads are left to end on their own, worker processes are killed."""
        if not self._accepting:
            return
        self._accepting = False
        timeout_s = self.drain_timeout_s if timeout_s is None else timeout_s
        deadline = asyncio.get_running_loop().time() + timeout_s
        with self._lock:
            futures = list(self._futures)
        # Queued calls keep being handed to workers while this waits. In a thread that waits
        # at most timeout_s: never one that a hung call could keep.
        _, late = await asyncio.to_thread(cf.wait, futures, timeout_s)
        with self._lock:  # nothing more goes to the pool
            pool, self._pool = self._pool, None
        if pool is None:
            return
        processes = _processes(pool)
        if late:
            log.warning(
                "handler calls still running %g s after the executor began to stop: %d abandoned",
                timeout_s,
                len(late),
            )
            for future in late:
                if not future.cancel() and self.kind == "thread":
                    _settle(future, NotReady(_ABANDONED), None)
            pool.shutdown(wait=False, cancel_futures=True)
            _kill(processes)  # their pool fails what they were running
            return
        pool.shutdown(wait=False)
        left = max(0.0, deadline - asyncio.get_running_loop().time())
        if processes and not await asyncio.to_thread(_join, processes, max(left, 1.0)):
            _kill(processes)

    async def run(self, fn: Callable[..., T], /, *args: Any, timeout_s: float | None = None) -> T:
        """`fn(*args)` on a worker; see the class docstring for the errors."""
        if not self._accepting:
            raise NotReady("the handler executor is not running")
        if timeout_s is not None and timeout_s <= 0:
            self._count_timeout()
            raise DeadlineExceeded("the request's deadline passed before its handler ran")
        future = self._submit(fn, args)
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
            task = asyncio.current_task()
            if future.cancelled() and task is not None and not task.cancelling():
                # Withdrawn by aclose, not by our caller: an answer, not a dropped connection.
                raise NotReady(_ABANDONED) from None
            raise
        except cf.BrokenExecutor as err:
            if not self._accepting:  # killed by aclose past its deadline
                raise NotReady(_ABANDONED) from None
            raise InferenceFailed(f"a handler worker process died: {err}") from None

    def _submit(self, fn: Callable[..., T], args: tuple[Any, ...]) -> cf.Future[T]:
        future: cf.Future[T] = cf.Future()
        with self._lock:
            pending = len(self._waiting) + self._dispatched
            if pending >= self.max_pending:
                self._rejected += 1
                raise Overloaded(
                    f"handler overloaded: {pending} requests in its "
                    f"{self.workers} worker(s), the limit is {self.max_pending}"
                )
            self._waiting[future] = (fn, args)
            self._futures.add(future)
        future.add_done_callback(self._release)
        self._dispatch()
        return future

    def _dispatch(self) -> None:
        """Hand waiting calls to the pool while a worker is free (any thread)."""
        while True:
            with self._lock:
                pool = self._pool
                if pool is None or self._dispatched >= self.workers or not self._waiting:
                    return
                future, (fn, args) = self._waiting.popitem(last=False)
                if not future.set_running_or_notify_cancel():
                    continue  # withdrawn just now; `_release` counts it
                self._dispatched += 1
            try:
                inner = pool.submit(fn, *args)
            except BaseException as err:
                with self._lock:
                    self._dispatched -= 1
                if isinstance(err, cf.BrokenExecutor):
                    self._replace(pool)
                _settle(future, err, None)
                continue
            del fn, args
            inner.add_done_callback(functools.partial(self._finished, future, pool))

    def _finished(self, future: cf.Future[Any], pool: cf.Executor, inner: cf.Future[Any]) -> None:
        """A pool call ended (on a worker thread, or a process pool's own thread)."""
        with self._lock:
            self._dispatched -= 1
        if inner.cancelled():  # by the pool shutting down under it
            _settle(future, NotReady(_ABANDONED), None)
        else:
            error = inner.exception()
            _settle(future, error, None if error is not None else inner.result())
        if self.kind == "thread":
            self._dispatch()
            return
        # A process pool calls this on its own management thread: the next submit (and a
        # replacement pool) is better made from the loop than from inside the pool.
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nothing to hand on
                loop.call_soon_threadsafe(self._after_process_call, pool, inner)

    def _after_process_call(self, pool: cf.Executor, inner: cf.Future[Any]) -> None:
        if not inner.cancelled() and isinstance(inner.exception(), cf.BrokenExecutor):
            self._replace(pool)
        self._dispatch()

    def _release(self, future: cf.Future[Any]) -> None:
        with self._lock:
            self._futures.discard(future)
            withdrawn = self._waiting.pop(future, None) is not None
            if withdrawn or future.cancelled():
                self._cancelled += 1
            else:
                self._completed += 1

    def _count_timeout(self) -> None:
        with self._lock:
            self._timed_out += 1

    def _replace(self, broken: cf.Executor) -> None:
        """A dead worker process breaks the whole stdlib pool: build a new one once."""
        with self._lock:
            if self._pool is not broken:
                return  # already replaced (or closed)
            self._pool = self._new_pool()
            self._restarts += 1
        log.error("a handler worker process died; starting new ones")
        broken.shutdown(wait=False, cancel_futures=True)

    def statistics(self) -> ExecutorStatistics:
        with self._lock:
            return ExecutorStatistics(
                self.kind,
                self.workers,
                self.max_pending,
                len(self._waiting) + self._dispatched,
                self._completed,
                self._rejected,
                self._timed_out,
                self._cancelled,
                self._restarts,
            )
