"""A pool of ONNX Runtime sessions, each with its own thread; results come back on the loop.

The pool also keeps itself healthy: a session whose runs keep failing, and that then fails a
run on inputs it has computed before, is rebuilt off the event loop (its slot is out of rotation
meanwhile), and a run that takes far longer than any run should is reported as a stall, which
the server's liveness probe turns into a restart.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from batchserve.lifecycle import Lifecycle
from batchserve.runtime.session import close_session, run_session, stop_capturing

log = logging.getLogger("batchserve.runtime")

# Called on the event loop thread with the run's outputs, or the exception it raised.
RunCallback = Callable[[list[np.ndarray] | BaseException], None]
# Builds a fresh session of the same model (blocking; called off the event loop).
Rebuild = Callable[[], Any]


class NoHealthySession(RuntimeError):
    """Every session failed and none could be rebuilt."""


@dataclass(frozen=True, slots=True)
class PoolStatistics:
    instances: int
    idle: int
    runs: int
    failures: int
    replacements: int = 0
    lost: int = 0  # sessions that could not be rebuilt
    probes: int = 0  # known-good runs that checked a session after repeated failures


@dataclass(frozen=True, slots=True)
class HealthPolicy:
    """When a session is replaced, and when a run counts as stalled.

    replace_after_failures: consecutive failed runs of one session before it is checked,
        and rebuilt if the check fails (0 = never). The check reruns the smallest inputs a
        session of the pool has computed without error (the warm-up's, or a request's): when
        that succeeds the failures were the inputs' fault (an index out of range), not the
        session's, and the count starts again. With no such inputs yet it is rebuilt at once.
        A single good run also resets the count.
    rebuild_attempts / rebuild_backoff_s: tries to rebuild a session, with doubling waits,
        before its slot is given up as lost.
    stall_after_s: a run still going after this long makes the pool unhealthy (0 = never).
    """

    replace_after_failures: int = 5
    rebuild_attempts: int = 3
    rebuild_backoff_s: float = 1.0
    stall_after_s: float = 0.0


class _Slot:
    """One session and the thread that runs it."""

    __slots__ = ("executor", "failures", "index", "ran_s", "session", "started_at")

    def __init__(self, index: int, session: Any) -> None:
        self.index = index
        self.session = session
        self.failures = 0  # consecutive
        self.started_at = 0.0  # monotonic time the current run began; 0 when idle
        self.ran_s = 0.0  # the last run's seconds, from its start to its end in the thread
        # One thread per session: ORT releases the GIL inside run(), so sessions overlap.
        self.executor = cf.ThreadPoolExecutor(1, thread_name_prefix=f"batchserve-session-{index}")


class SessionPool(Lifecycle):
    """Runs batches on idle sessions; `try_run` never blocks and never queues."""

    def __init__(
        self,
        sessions: list[Any],
        input_names: tuple[str, ...],
        *,
        rebuild: Rebuild | None = None,
        health: HealthPolicy | None = None,
    ) -> None:
        if not sessions:
            raise ValueError("a session pool needs at least one session")
        self._slots = [_Slot(i, s) for i, s in enumerate(sessions)]
        self._idle = list(reversed(self._slots))
        self._names = input_names
        self._rebuild = rebuild
        self._health = health or HealthPolicy()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drained: asyncio.Event | None = None
        self._rebuilding: set[asyncio.Task[None]] = set()
        self._lost = 0
        self._runs = 0
        # The seconds of the run whose `done` is being called (see `Runner.last_run_s`).
        self.last_run_s: float | None = None
        self._failures = 0
        self._replacements = 0
        self._probes = 0
        self._closing = False
        # The smallest non-empty inputs a session computed without error (copied): rerun to
        # tell a broken session from a run of bad inputs.
        self._known_good: list[np.ndarray] | None = None
        self._known_good_bytes = 0
        # Called when a rebuilt session rejoins, so the batcher dispatches what waited for it.
        self.on_capacity: Callable[[], None] | None = None

    async def start(self) -> None:
        """Bind to the running loop: runs' results come back on it."""
        self._loop = asyncio.get_running_loop()
        self._drained = asyncio.Event()
        self._drained.set()

    @property
    def idle(self) -> int:
        return len(self._idle)

    @property
    def size(self) -> int:
        return len(self._slots) - self._lost

    @property
    def next_session(self) -> int | None:
        """The index of the session the next `try_run` starts on (None: none is idle), so a
        trace can say which session ran a batch."""
        return self._idle[-1].index if self._idle else None

    def try_run(self, arrays: list[np.ndarray], done: RunCallback) -> bool:
        """Start a run on an idle session; False (and nothing started) when none is idle."""
        if self._loop is None or self._drained is None:
            return False
        if not self._idle:
            if self._lost == len(self._slots):
                # Nothing will ever run it: fail now rather than let requests wait forever.
                error = NoHealthySession("no healthy ONNX Runtime session is left")
                self._loop.call_soon(done, error)
                return True
            return False
        slot = self._idle.pop()
        self._drained.clear()
        slot.started_at = time.monotonic()
        future = slot.executor.submit(run_session, slot.session, arrays, self._names)
        future.add_done_callback(partial(self._ran, slot, done, arrays))
        return True

    def _ran(self, slot: _Slot, done: RunCallback, arrays: list[np.ndarray], future: Any) -> None:
        # In the session's thread, as the run ends: its time without the event loop's delay in
        # taking the answer (which the front end's lag already counts, once).
        slot.ran_s = time.monotonic() - slot.started_at
        self._from_thread(self._complete, slot, done, arrays, future)

    def _from_thread(self, complete: Callable[..., None], *args: Any) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(complete, *args)

    def _complete(
        self,
        slot: _Slot,
        done: RunCallback,
        arrays: list[np.ndarray],
        future: cf.Future[Any],
    ) -> None:
        slot.started_at = 0.0
        self._runs += 1
        error = future.exception()
        if error is None:
            slot.failures = 0
            self._idle.append(slot)
            self._remember(arrays)
        else:
            self._failures += 1
            slot.failures += 1
            limit = self._health.replace_after_failures
            if self._rebuild is None or not limit or slot.failures < limit:
                self._idle.append(slot)
            elif self._known_good is not None:
                self._probe(slot, self._known_good)
            else:
                self._start_rebuild(slot)
        self._check_drained()
        self.last_run_s = slot.ran_s
        done(future.result() if error is None else error)

    def _remember(self, arrays: list[np.ndarray]) -> None:
        # Empty tensors prove nothing: a broken session may well "compute" zero elements.
        if not all(array.size for array in arrays):
            return
        size = sum(array.nbytes for array in arrays)
        if self._known_good is None or size < self._known_good_bytes:
            # Copied: the caller's arrays may be views of a request body.
            self._known_good = [np.array(array, copy=True) for array in arrays]
            self._known_good_bytes = size

    def _probe(self, slot: _Slot, arrays: list[np.ndarray]) -> None:
        """Rerun known-good inputs on a session that keeps failing (it stays out of rotation
        meanwhile): only a session that fails those too is rebuilt."""
        slot.started_at = time.monotonic()
        future = slot.executor.submit(run_session, slot.session, arrays, self._names)
        future.add_done_callback(partial(self._from_thread, self._probed, slot))

    def _probed(self, slot: _Slot, future: cf.Future[Any]) -> None:
        slot.started_at = 0.0
        self._probes += 1
        error = future.exception()
        if error is not None:
            log.warning("session %d failed a run on known-good inputs: %s", slot.index, error)
            self._start_rebuild(slot)
            return
        log.info(
            "session %d failed %d runs in a row but computes known-good inputs: the inputs "
            "were at fault, it stays",
            slot.index,
            slot.failures,
        )
        slot.failures = 0
        self._idle.append(slot)
        self._check_drained()
        if self.on_capacity is not None:
            self.on_capacity()

    def _check_drained(self) -> None:
        if len(self._idle) + self._lost == len(self._slots) and self._drained is not None:
            self._drained.set()

    def _start_rebuild(self, slot: _Slot) -> None:
        if self._closing:  # a check that ended after aclose began: nothing will run again
            self._lost += 1
            self._check_drained()
            return
        log.warning("session %d failed %d runs in a row: rebuilding it", slot.index, slot.failures)
        task = asyncio.ensure_future(self._replace(slot))
        self._rebuilding.add(task)
        task.add_done_callback(self._rebuilding.discard)

    async def _replace(self, slot: _Slot) -> None:
        assert self._rebuild is not None
        policy = self._health
        for attempt in range(policy.rebuild_attempts):
            try:
                session = await asyncio.to_thread(self._rebuild)
            except Exception as err:
                log.error("rebuilding session %d failed (try %d): %s", slot.index, attempt + 1, err)
                await asyncio.sleep(policy.rebuild_backoff_s * 2**attempt)
                continue
            # The replaced session is out of rotation (its last run has returned): release
            # what it owns, such as its CUDA stream.
            close_session(slot.session)
            slot.session = session
            slot.failures = 0
            self._replacements += 1
            self._idle.append(slot)
            log.warning("session %d replaced", slot.index)
            if self.on_capacity is not None:
                self.on_capacity()
            return
        self._lost += 1
        log.error("session %d could not be rebuilt: its slot is out of service", slot.index)
        self._check_drained()
        if self.on_capacity is not None:
            self.on_capacity()  # the batcher re-checks, and fails what no session can run

    def problem(self) -> str | None:
        """Why the pool cannot serve (for the liveness probe), or None when it is healthy."""
        if self._lost == len(self._slots):
            return "every ONNX Runtime session failed and could not be rebuilt"
        stall = self._health.stall_after_s
        if stall:
            now = time.monotonic()
            for slot in self._slots:
                if slot.started_at and now - slot.started_at > stall:
                    return (
                        f"session {slot.index} has been running one batch for "
                        f"{now - slot.started_at:.1f} s (stall limit {stall:g} s)"
                    )
        return None

    async def run_each(self, arrays: list[np.ndarray]) -> None:
        """Run every session once on the same inputs (warm-up), concurrently."""
        loop = asyncio.get_running_loop()
        await asyncio.gather(
            *(
                loop.run_in_executor(w.executor, run_session, w.session, arrays, self._names)
                for w in self._slots
            )
        )
        self._remember(arrays)

    async def run_in_turn(self, arrays: list[np.ndarray]) -> None:
        """Run every session once on the same inputs, one after another, each on its own
        thread (where ORT keeps a session's CUDA graphs): captures must not overlap."""
        loop = asyncio.get_running_loop()
        for w in self._slots:
            await loop.run_in_executor(w.executor, run_session, w.session, arrays, self._names)
        self._remember(arrays)

    def stop_capturing(self) -> None:
        """No session captures CUDA graphs from now on (call it before serving)."""
        for slot in self._slots:
            stop_capturing(slot.session)

    async def aclose(self) -> None:
        """Wait for runs in progress, then stop the threads."""
        self._closing = True
        for task in list(self._rebuilding):
            task.cancel()
        if self._rebuilding:
            await asyncio.gather(*self._rebuilding, return_exceptions=True)
        if self._drained is not None:
            # A slot whose rebuild was cancelled will never be idle again.
            self._lost = len(self._slots) - len(self._idle) - self._busy()
            self._check_drained()
            await self._drained.wait()
        for slot in self._slots:
            slot.executor.shutdown(wait=False)
            if not slot.started_at:  # a wedged run may still use its session: leave it be
                close_session(slot.session)
            # A run still going holds its own reference; the pool lets go of the session now,
            # so it is freed without waiting for the cyclic collector.
            slot.session = None
        self.on_capacity = None  # the batcher's wake: breaks the pool <-> batcher cycle

    def _busy(self) -> int:
        return sum(1 for slot in self._slots if slot.started_at)

    def statistics(self) -> PoolStatistics:
        return PoolStatistics(
            len(self._slots),
            len(self._idle),
            self._runs,
            self._failures,
            self._replacements,
            self._lost,
            self._probes,
        )
