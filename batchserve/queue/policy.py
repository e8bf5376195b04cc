"""When to dispatch a batch: a pure function of the queue's state and the time (no I/O)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class QueueState:
    queued_rows: int
    oldest_enqueued_at: float
    idle_sessions: int
    busy_sessions: int
    arrival_gap_s: float  # smoothed time between arrivals (inf before the second one)
    flush: bool = False  # shutting down: send everything as soon as a session is free


@dataclass(frozen=True, slots=True)
class Decision:
    dispatch: bool
    wake_at: float | None = None  # when to look again if nothing else happens first


WAIT = Decision(False)
DISPATCH = Decision(True)


class BatchPolicy:
    """Work-conserving batching with a bounded, adaptive hold.

    - No free session: wait; the queue fills by itself while the pool works (this is where big
      batches come from under load).
    - Whole pool idle: dispatch at once; at light load nothing else is coming soon, so latency
      stays at the model's own.
    - Some sessions busy, one free, batch not full: the server is loaded, so hold the batch for
      company, but only while the oldest request has waited less than `max_latency_s` and the
      next arrival is expected before that deadline.
    """

    __slots__ = ("max_latency_s", "max_rows")

    def __init__(self, max_rows: int, max_latency_s: float) -> None:
        if max_rows < 1:
            raise ValueError("max_rows must be >= 1")
        if max_latency_s < 0:
            raise ValueError("max_latency_s must be >= 0")
        self.max_rows = max_rows
        self.max_latency_s = max_latency_s

    def decide(self, state: QueueState, now: float) -> Decision:
        if state.queued_rows <= 0 or state.idle_sessions <= 0:
            return WAIT
        if state.flush or state.queued_rows >= self.max_rows or state.busy_sessions == 0:
            return DISPATCH
        deadline = state.oldest_enqueued_at + self.max_latency_s
        remaining = deadline - now
        if remaining <= 0 or state.arrival_gap_s >= remaining:
            return DISPATCH
        return Decision(False, deadline)


class ArrivalRate:
    """Exponentially smoothed gap between arrivals (the policy's forecast of company)."""

    __slots__ = ("_alpha", "_last", "gap_s")

    def __init__(self, alpha: float = 0.2) -> None:
        self._alpha = alpha
        self._last: float | None = None
        self.gap_s = float("inf")

    def observe(self, now: float) -> None:
        last = self._last
        self._last = now
        if last is None:
            return
        gap = now - last
        if self.gap_s == float("inf"):
            self.gap_s = gap
        else:
            self.gap_s += self._alpha * (gap - self.gap_s)
