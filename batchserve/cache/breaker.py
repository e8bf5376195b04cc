"""A circuit breaker: after repeated failures stop calling for a while, then try one call."""

from __future__ import annotations

from enum import Enum

from batchserve.clock import Clock


class CircuitState(Enum):
    CLOSED = 0  # calls go through
    OPEN = 1  # calls are skipped until the cool-down ends
    HALF_OPEN = 2  # one trial call is allowed; its outcome closes or reopens the circuit


class CircuitBreaker:
    """`allow()` before a call, then `success()` or `failure()` after it. Pure state, no I/O."""

    def __init__(self, clock: Clock, failure_threshold: int = 3, reset_after_s: float = 5.0):
        if failure_threshold < 1 or reset_after_s <= 0:
            raise ValueError("failure_threshold must be >= 1 and reset_after_s > 0")
        self._clock = clock
        self._threshold = failure_threshold
        self._reset_after = reset_after_s
        self._failures = 0
        self._opened_at = 0.0
        self._state = CircuitState.CLOSED
        self._trial = False
        self.opened = 0  # how many times the circuit has opened (or reopened after a trial)

    @property
    def state(self) -> CircuitState:
        if (
            self._state is CircuitState.OPEN
            and self._clock.now() - self._opened_at >= self._reset_after
        ):
            return CircuitState.HALF_OPEN
        return self._state

    def allow(self) -> bool:
        state = self.state
        if state is CircuitState.HALF_OPEN:
            # One trial at a time: reopen until it reports, so concurrent callers keep skipping.
            self._state, self._opened_at = CircuitState.OPEN, self._clock.now()
            self._trial = True
            return True
        return state is CircuitState.CLOSED

    def success(self) -> None:
        self._failures = 0
        self._trial = False
        self._state = CircuitState.CLOSED

    def failure(self) -> None:
        self._failures += 1
        if self._trial or (
            self._state is CircuitState.CLOSED and self._failures >= self._threshold
        ):
            self.opened += 1
            self._trial = False
            self._state, self._opened_at = CircuitState.OPEN, self._clock.now()
