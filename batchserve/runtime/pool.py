"""A pool of ONNX Runtime sessions, each with its own thread; results come back on the loop."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from types import TracebackType
from typing import Any

import numpy as np

from batchserve.runtime.session import run_session

# Called on the event loop thread with the run's outputs, or the exception it raised.
RunCallback = Callable[[list[np.ndarray] | BaseException], None]


@dataclass(frozen=True, slots=True)
class PoolStatistics:
    instances: int
    idle: int
    runs: int
    failures: int


class _Worker:
    __slots__ = ("executor", "index", "session")

    def __init__(self, index: int, session: Any) -> None:
        self.index = index
        self.session = session
        # One thread per session: ORT releases the GIL inside run(), so sessions overlap.
        self.executor = cf.ThreadPoolExecutor(1, thread_name_prefix=f"batchserve-session-{index}")


class SessionPool:
    """Runs batches on idle sessions; `try_run` never blocks and never queues."""

    def __init__(self, sessions: list[Any], input_names: tuple[str, ...]) -> None:
        if not sessions:
            raise ValueError("a session pool needs at least one session")
        self._workers = [_Worker(i, s) for i, s in enumerate(sessions)]
        self._idle = list(reversed(self._workers))
        self._names = input_names
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drained: asyncio.Event | None = None
        self._runs = 0
        self._failures = 0

    async def __aenter__(self) -> SessionPool:
        self._loop = asyncio.get_running_loop()
        self._drained = asyncio.Event()
        self._drained.set()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    @property
    def idle(self) -> int:
        return len(self._idle)

    @property
    def size(self) -> int:
        return len(self._workers)

    def try_run(self, arrays: list[np.ndarray], done: RunCallback) -> bool:
        """Start a run on an idle session; False (and nothing started) when none is idle."""
        if not self._idle or self._loop is None or self._drained is None:
            return False
        worker = self._idle.pop()
        self._drained.clear()
        future = worker.executor.submit(run_session, worker.session, arrays, self._names)
        future.add_done_callback(partial(self._from_thread, worker, done))
        return True

    def _from_thread(self, worker: _Worker, done: RunCallback, future: cf.Future[Any]) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._complete, worker, done, future)

    def _complete(self, worker: _Worker, done: RunCallback, future: cf.Future[Any]) -> None:
        self._idle.append(worker)
        self._runs += 1
        error = future.exception()
        if error is not None:
            self._failures += 1
        if len(self._idle) == len(self._workers) and self._drained is not None:
            self._drained.set()
        done(future.result() if error is None else error)

    async def run_each(self, arrays: list[np.ndarray]) -> None:
        """Run every session once on the same inputs (warm-up), concurrently."""
        loop = asyncio.get_running_loop()
        await asyncio.gather(
            *(
                loop.run_in_executor(w.executor, run_session, w.session, arrays, self._names)
                for w in self._workers
            )
        )

    async def aclose(self) -> None:
        """Wait for runs in progress, then stop the threads."""
        if self._drained is not None:
            await self._drained.wait()
        for worker in self._workers:
            worker.executor.shutdown(wait=False)

    def statistics(self) -> PoolStatistics:
        return PoolStatistics(len(self._workers), len(self._idle), self._runs, self._failures)
