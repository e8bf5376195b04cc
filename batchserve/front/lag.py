"""Event-loop lag: the early overload signal of a server whose front end is the bottleneck.

When requests arrive faster than the event loop can handle them, they wait in socket buffers
before any handler sees them, where no queue bound or deadline can reach them, and everyone's
latency grows. The loop's lateness measures exactly that wait. While it is over the limit the
infer endpoint refuses new requests with 429 before reading their bodies, which costs a
fraction of serving them, so the loop catches up instead of falling further behind.

Below the limit the smoothed lateness (`smoothed_s`) still estimates how long a request
waited before its handler ran: a deadline counts from when the client sent the request, so
admission adds that wait to the queue's and the handler's deadline is shortened by it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

SMOOTHING = 0.25  # weight of the newest tick in `smoothed_s`


class LoopLag:
    """How late the event loop runs a 5 ms timer. It counts as overloaded only when the timer
    has been late by more than the limit on every tick for a while (at least `sustain` ticks
    in a row spanning `window_s`): a burst that one long iteration absorbs, or a collection
    pause, is not overload; a loop that stays behind is."""

    __slots__ = ("_clock", "_due", "_handle", "_interval_s", "_late_since", "_late_ticks",
                 "_limit_s", "_loop", "_measure", "_settled", "_sustain", "_window_s", "lag_s",
                 "max_lag_s", "overloaded", "smoothed_s")  # fmt: skip

    def __init__(
        self,
        limit_s: float,
        interval_s: float = 0.005,
        window_s: float = 0.1,
        sustain: int = 3,
        *,
        measure: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._limit_s = limit_s
        self._clock = clock
        self._measure = measure  # run the timer even with no limit (deadlines need the lag)
        self._interval_s = interval_s
        self._window_s = window_s
        self._sustain = sustain
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._due = 0.0
        self._settled = False  # the first tick measures the start-up, not the load
        self._late_since = 0.0
        self._late_ticks = 0
        self.lag_s = 0.0  # lateness of the last tick
        self.smoothed_s = 0.0  # moving average of the lateness: the wait before a handler runs
        self.max_lag_s = 0.0
        self.overloaded = False

    @property
    def enabled(self) -> bool:
        return self._limit_s > 0 or self._measure

    def start(self) -> None:
        if not self.enabled or self._handle is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._settled = False
        self._arm(self._clock())

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self.overloaded = False
        self.smoothed_s = 0.0

    def _arm(self, now: float) -> None:
        assert self._loop is not None
        self._due = now + self._interval_s
        self._handle = self._loop.call_later(self._interval_s, self._tick)

    def _tick(self) -> None:
        now = self._clock()
        late = max(0.0, now - self._due)
        if not self._settled:
            self._settled = True
            late = 0.0
        self.lag_s = late
        # A quarter per tick: a loop that falls behind shows within a few ticks (each as long
        # as the backlog it ran), and one long iteration fades as fast.
        self.smoothed_s += SMOOTHING * (late - self.smoothed_s)
        self.max_lag_s = max(self.max_lag_s, late)
        if 0 < self._limit_s < late:
            if not self._late_ticks:
                self._late_since = self._due
            self._late_ticks += 1
            self.overloaded = (
                self._late_ticks >= self._sustain and now - self._late_since >= self._window_s
            )
        else:
            self._late_ticks = 0
            self.overloaded = False
        self._arm(now)
