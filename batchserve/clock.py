"""Time source for everything that measures durations; injectable so tests need no sleeps."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Monotonic seconds."""
        ...


class MonotonicClock:
    """Default clock: `time.monotonic`, the same source the event loop uses."""

    __slots__ = ()

    def now(self) -> float:
        return time.monotonic()
