"""The queue in front of a fleet's ready replicas, second by second, as a fluid.

In each second `a` requests arrive evenly and the ready replicas drain the queue at their
capacity at the SLO, `C = ready x capacity_rps`. What they cannot serve waits: the backlog
carries into the next second. A request arriving when the queue holds `Q` waits `Q / C`; it
counts within the SLO only if that wait is at most the SLO, so once the backlog exceeds one
SLO's worth of work, every new arrival misses until it drains. Requests that would wait longer
than the server's request timeout are dropped (the server answers 504 at its deadline), which
bounds the backlog at `timeout x C`. With no ready replica, nothing is served or held: every
request of that second misses.

The same pass gives the autoscaling signal: requests in flight in the fleet, by Little's law
from the measured latency curve (`rate x mean latency` per replica, at the rate it serves),
plus the backlog waiting in front of it.

The fleet's ready count changes during the simulation, and the scalers read the signal while it
runs, so the queue is advanced lazily up to the second they ask about.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from batchserve.cost.capacity import LatencyCurve

FloatArray = npt.NDArray[np.float64]
# A change of the fleet: (time, ready replicas, replicas asked for, nodes).
Change = tuple[float, int, int, int]


def outside_share(backlog: float, arrivals: float, capacity: float, slo_s: float) -> float:
    """Share of one second's arrivals that wait more than `slo_s`, for a queue that starts the
    second at `backlog` and grows at `arrivals - capacity` per second (requests), drained at
    `capacity` req/s (> 0). A request at time tau waits queue(tau) / capacity."""
    limit = slo_s * capacity  # the queue length whose wait is exactly the SLO
    growth = arrivals - capacity
    if growth == 0:
        return 1.0 if backlog > limit else 0.0
    crossing = (limit - backlog) / growth  # when the queue passes the limit (either way)
    if growth > 0:
        return min(1.0, max(0.0, 1.0 - crossing))
    return min(1.0, max(0.0, crossing))


class Backlog:
    """Per-second arrivals, service, backlog, SLO share and in-flight count of one fleet."""

    def __init__(
        self,
        trace: FloatArray,
        curve: LatencyCurve,
        timeline: Sequence[Change],
        timeout_s: float,
    ) -> None:
        self.trace = trace
        self.curve = curve
        self.timeline = timeline  # appended to by the fleet while the simulation runs
        self.timeout_s = timeout_s
        self.slo_s = curve.slo_p99_ms / 1000.0
        size = trace.size
        self.ready = np.zeros(size)
        self.backlog = np.zeros(size)  # at the end of each second
        self.within = np.zeros(size)  # requests of the second that waited at most the SLO
        self.dropped = np.zeros(size)  # requests given up at the timeout (or with no replica)
        self.served = np.zeros(size)
        self.in_flight = np.zeros(size)  # mean requests in the fleet during the second
        self.done = 0
        self._change = 0
        self._carry = 0.0

    def advance(self, until: float) -> None:
        """Compute every second before `until` (those whose fleet state is already known).
        Stretches with no backlog, load within capacity and no fleet change are computed in
        one vector step; the rest second by second."""
        end = min(self.trace.size, math.floor(until))
        second = max(self.done, 0)
        while second < end:
            ready = self._ready_at(second)
            stop = min(end, self._next_change(second))
            calm = self._calm_until(second, stop, ready)
            if calm > second:
                self._calm(second, calm, ready)
                second = calm
            else:
                self._step(second, ready)
                second += 1
        self.done = max(self.done, end)

    def _next_change(self, second: int) -> int:
        """The first second after `second` whose ready count may differ."""
        following = self._change + 1
        if following >= len(self.timeline):
            return self.trace.size
        return max(second + 1, math.ceil(self.timeline[following][0]))

    def _calm_until(self, start: int, stop: int, ready: int) -> int:
        """The end of the stretch from `start` with nothing queued and arrivals within capacity."""
        if self._carry > 0 or ready <= 0:
            return start
        over = np.flatnonzero(self.trace[start:stop] > ready * self.curve.capacity_rps)
        return start + int(over[0]) if over.size else stop

    def _calm(self, start: int, stop: int, ready: int) -> None:
        arrivals = self.trace[start:stop]
        self.ready[start:stop] = ready
        self.within[start:stop] = arrivals
        self.served[start:stop] = arrivals
        if self.curve.mean_ms is not None:
            rate = arrivals / ready
            mean = np.interp(rate, self.curve.rates, self.curve.mean_ms)
            self.in_flight[start:stop] = ready * rate * mean / 1000.0

    def mean_in_flight(self, now: float, window_s: float) -> float:
        """The signal as the triggers read it: in flight, averaged over the last window."""
        self.advance(now)
        end = min(self.done, math.floor(now))
        begin = max(0, end - max(1, int(window_s)))
        return float(self.in_flight[begin:end].mean()) if end > begin else 0.0

    def served_share(self, now: float, window_s: float) -> float:
        """Mean utilisation of the ready replicas over the last window: served / capacity."""
        self.advance(now)
        end = min(self.done, math.floor(now))
        begin = max(0, end - max(1, int(window_s)))
        if end <= begin:
            return 0.0
        capacity = self.ready[begin:end] * self.curve.capacity_rps
        with np.errstate(divide="ignore", invalid="ignore"):
            share = np.where(capacity > 0, self.served[begin:end] / capacity, 0.0)
        return float(share.mean())

    def _ready_at(self, second: int) -> int:
        """Ready replicas from the last change at or before `second`."""
        timeline = self.timeline
        while self._change + 1 < len(timeline) and timeline[self._change + 1][0] <= second:
            self._change += 1
        return timeline[self._change][1] if timeline else 0

    def _step(self, second: int, ready: int) -> None:
        arrivals = float(self.trace[second])
        self.ready[second] = ready
        capacity = ready * self.curve.capacity_rps
        if capacity <= 0:
            # Nothing to hold the requests: the ingress has no endpoint (cold start).
            self.dropped[second] = arrivals + self._carry
            self.in_flight[second] = arrivals  # held by the ingress: what wakes a scaler
            self._carry = 0.0
            return
        limit = self.timeout_s * capacity  # fewer replicas: the oldest waiters time out
        carry = min(self._carry, limit)
        timed_out = self._carry - carry
        share = outside_share(carry, arrivals, capacity, self.slo_s) if arrivals else 0.0
        self.within[second] = arrivals * (1.0 - share)
        queue = carry + arrivals - capacity
        self._carry = min(limit, max(0.0, queue))
        self.dropped[second] = max(0.0, queue - limit) + timed_out
        self.served[second] = min(carry + arrivals, capacity)
        self.backlog[second] = self._carry
        busy = carry > 0 or self._carry > 0  # a queue: every replica serves at capacity
        per_replica = self.curve.capacity_rps if busy else arrivals / ready
        self.in_flight[second] = ready * self._replica_in_flight(per_replica) + (
            (carry + self._carry) / 2.0
        )

    def _replica_in_flight(self, rate: float) -> float:
        if self.curve.mean_ms is None:
            return 0.0  # no latency curve: the rate signal is used instead (simulate.py)
        return self.curve.in_flight(rate)

    def p99_ms(self) -> FloatArray:
        """Per second: the replicas' p99 at their load plus the wait at the end of the second
        (NaN without traffic; the overload figure with no ready replica)."""
        curve = self.curve
        with np.errstate(divide="ignore", invalid="ignore"):
            load = np.where(self.ready > 0, self.trace / np.maximum(self.ready, 1), np.inf)
            wait = np.where(
                self.ready > 0, 1000.0 * self.backlog / (self.ready * curve.capacity_rps), 0.0
            )
        served = np.minimum(load, curve.capacity_rps)
        p99 = np.interp(np.minimum(served, curve.rates[-1]), curve.rates, curve.p99_ms) + wait
        p99 = np.where(np.isinf(load), curve.overload_p99_ms, p99)
        result: FloatArray = np.where(self.trace > 0, p99, np.nan)
        return result
