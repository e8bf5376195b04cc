"""The dispatch policy is a pure function: tested with a fake clock, no sleeps."""

from __future__ import annotations

import math

import pytest

from batchserve.queue import BatchPolicy, QueueState
from batchserve.queue.policy import ArrivalRate
from batchserve.testing import FakeClock


def state(**changes: float) -> QueueState:
    base = {
        "queued_rows": 1,
        "oldest_enqueued_at": 1000.0,
        "idle_sessions": 1,
        "busy_sessions": 1,
        "arrival_gap_s": 0.0001,
    }
    base.update(changes)
    return QueueState(**base)  # type: ignore[arg-type]


def test_empty_queue_waits_without_a_deadline() -> None:
    decision = BatchPolicy(8, 0.002).decide(state(queued_rows=0), 1000.0)
    assert not decision.dispatch
    assert decision.wake_at is None


def test_no_free_session_waits_for_one() -> None:
    decision = BatchPolicy(8, 0.002).decide(state(queued_rows=100, idle_sessions=0), 1000.0)
    assert not decision.dispatch
    assert decision.wake_at is None  # a finishing session wakes the batcher, not a timer


def test_idle_pool_dispatches_at_once() -> None:
    # Light load: nothing to gain by waiting, latency stays at the model's own.
    assert BatchPolicy(8, 0.5).decide(state(busy_sessions=0), 1000.0).dispatch


def test_full_batch_dispatches_at_once() -> None:
    assert BatchPolicy(8, 0.5).decide(state(queued_rows=8), 1000.0).dispatch


def test_partly_busy_pool_holds_for_company_until_max_latency() -> None:
    clock = FakeClock(1000.0)
    policy = BatchPolicy(8, 0.002)
    decision = policy.decide(state(), clock.now())
    assert not decision.dispatch
    assert decision.wake_at == pytest.approx(1000.002)
    clock.advance(0.0015)
    assert not policy.decide(state(), clock.now()).dispatch
    clock.advance(0.0005)
    assert policy.decide(state(), clock.now()).dispatch


def test_no_hold_when_the_next_arrival_would_come_too_late() -> None:
    policy = BatchPolicy(8, 0.002)
    assert policy.decide(state(arrival_gap_s=0.01), 1000.0).dispatch
    assert policy.decide(state(arrival_gap_s=math.inf), 1000.0).dispatch


def test_zero_max_latency_is_purely_work_conserving() -> None:
    assert BatchPolicy(8, 0.0).decide(state(), 1000.0).dispatch


def test_flush_dispatches_whatever_is_queued() -> None:
    assert BatchPolicy(8, 10.0).decide(state(flush=True), 1000.0).dispatch


def test_rejects_nonsense_limits() -> None:
    with pytest.raises(ValueError, match="max_rows"):
        BatchPolicy(0, 0.001)
    with pytest.raises(ValueError, match="max_latency"):
        BatchPolicy(1, -1.0)


def test_arrival_rate_smooths_gaps() -> None:
    clock = FakeClock()
    rate = ArrivalRate(alpha=0.5)
    rate.observe(clock.now())
    assert rate.gap_s == math.inf
    clock.advance(0.010)
    rate.observe(clock.now())
    assert rate.gap_s == pytest.approx(0.010)
    clock.advance(0.002)
    rate.observe(clock.now())
    assert rate.gap_s == pytest.approx(0.006)
