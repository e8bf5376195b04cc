"""Batcher mechanics with a runner the test completes by hand (deterministic, no ORT timing)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import numpy as np
import pytest

from batchserve.errors import InferenceFailed, NotReady, Overloaded
from batchserve.queue import Batcher, BatchPolicy
from batchserve.queue.batcher import SOJOURN_INTERVAL_S
from batchserve.testing import FakeClock

Done = Callable[[list[np.ndarray] | BaseException], None]


class ManualRunner:
    """A one-session runner whose runs finish only when the test says so."""

    last_run_s: float | None = None  # the batcher times the run itself

    def __init__(self, size: int = 1) -> None:
        self.size = size
        self.running: list[tuple[list[np.ndarray], Done]] = []

    @property
    def idle(self) -> int:
        return self.size - len(self.running)

    def try_run(self, arrays: list[np.ndarray], done: Done) -> bool:
        if not self.idle:
            return False
        self.running.append((arrays, done))
        return True

    def finish(self, transform: Callable[[np.ndarray], np.ndarray] = lambda a: a * 2) -> None:
        arrays, done = self.running.pop(0)
        done([transform(arrays[0])])


def rows(n: int, value: float, width: int = 2) -> list[np.ndarray]:
    return [np.full((n, width), value, dtype=np.float32)]


async def settle() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


async def test_requests_queued_while_busy_form_one_batch_in_order() -> None:
    runner = ManualRunner()
    async with Batcher(runner, BatchPolicy(8, 0.0), FakeClock(), max_queue_rows=100) as batcher:
        first = batcher.submit(rows(1, 1), 1, ((2,),))
        await settle()
        assert len(runner.running) == 1  # idle pool: dispatched at once, alone
        later = [batcher.submit(rows(2, v), 2, ((2,),)) for v in (2, 3, 4, 5, 6)]
        await settle()
        runner.finish()
        await settle()
        # Four requests (8 rows) fill the next batch; the fifth waits for the one after.
        batch = runner.running[0][0][0]
        assert batch.shape == (8, 2)
        assert list(batch[:, 0]) == [2, 2, 3, 3, 4, 4, 5, 5]
        runner.finish()
        await settle()
        runner.finish()
        results = [await item.future for item in [first, *later]]
    for item, result in zip([first, *later], results, strict=True):
        np.testing.assert_array_equal(result[0], item.arrays[0] * 2)


async def test_groups_by_shape_and_serves_them_oldest_first() -> None:
    runner = ManualRunner()
    async with Batcher(runner, BatchPolicy(8, 0.0), FakeClock(), max_queue_rows=100) as batcher:
        blocker = batcher.submit(rows(1, 0), 1, ((2,),))
        await settle()
        clock_order = [
            batcher.submit(rows(1, 1, width=3), 1, ((3,),)),
            batcher.submit(rows(1, 2, width=2), 1, ((2,),)),
            batcher.submit(rows(1, 3, width=3), 1, ((3,),)),
        ]
        runner.finish()
        await settle()
        assert runner.running[0][0][0].shape == (2, 3)  # the width-3 group arrived first
        runner.finish()
        await settle()
        assert runner.running[0][0][0].shape == (1, 2)
        runner.finish()
        await asyncio.gather(blocker.future, *(i.future for i in clock_order))


async def test_mismatched_result_rows_fail_the_batch() -> None:
    runner = ManualRunner()
    async with Batcher(runner, BatchPolicy(8, 0.0), FakeClock(), max_queue_rows=100) as batcher:
        blocker = batcher.submit(rows(1, 0), 1, ((2,),))
        await settle()
        a = batcher.submit(rows(1, 1), 1, ((2,),))
        b = batcher.submit(rows(1, 2), 1, ((2,),))
        runner.finish()
        await settle()
        runner.finish(lambda arr: arr[:1])  # a broken model: one row for two requests
        with pytest.raises(InferenceFailed, match="returned shapes"):
            await a.future
        with pytest.raises(InferenceFailed, match="returned shapes"):
            await b.future
        await blocker.future


async def test_closing_refuses_new_requests_and_drains_old_ones() -> None:
    runner = ManualRunner()
    batcher = Batcher(runner, BatchPolicy(8, 0.0), FakeClock(), max_queue_rows=100)
    await batcher.start()
    item = batcher.submit(rows(1, 1), 1, ((2,),))
    closing = asyncio.create_task(batcher.aclose())
    await settle()
    with pytest.raises(NotReady):
        batcher.submit(rows(1, 1), 1, ((2,),))
    assert not closing.done()  # still waiting for the running batch
    runner.finish()
    await closing
    np.testing.assert_array_equal((await item.future)[0], item.arrays[0] * 2)


async def test_a_request_the_queue_would_make_late_is_refused_on_arrival() -> None:
    runner, clock = ManualRunner(), FakeClock()
    async with Batcher(runner, BatchPolicy(4, 0.0), clock, max_queue_rows=1000) as batcher:
        assert batcher.expected_wait_s(100) == 0.0  # nothing measured yet: nothing refused
        first = batcher.submit(rows(4, 1), 4, ((2,),))
        await settle()
        clock.advance(0.1)  # one run of 4 rows took 100 ms: 40 rows/s, 0.1 s per run
        runner.finish()
        await first.future
        blocker = batcher.submit(rows(4, 1), 4, ((2,),))  # busy again
        await settle()
        queued = [batcher.submit(rows(4, 1), 4, ((2,),), deadline_s=1.0) for _ in range(4)]
        # 16 rows ahead + 4 = 20 rows at 40 rows/s = 0.5 s, plus a run: 0.6 s.
        assert batcher.expected_wait_s(4) == pytest.approx(0.6)
        # Refused once the wait passes 80% of the deadline (headroom for HTTP and jitter).
        with pytest.raises(Overloaded, match=r"expected wait \(600 ms\) exceeds .* \(700 ms\)"):
            batcher.submit(rows(4, 1), 4, ((2,),), deadline_s=0.7)
        with pytest.raises(Overloaded, match="expected wait"):
            batcher.check_room(0.6)  # the front end's check, before reading a body
        batcher.check_room(0.8)  # a later deadline still fits
        assert batcher.statistics().rejected == 2
        for _ in range(5):
            clock.advance(0.1)
            runner.finish()
            await settle()
        for item in [blocker, *queued]:
            await item.future


async def test_runs_are_priced_by_their_own_time_not_by_when_the_loop_took_the_answer() -> None:
    runner, clock = ManualRunner(), FakeClock()
    async with Batcher(runner, BatchPolicy(4, 0.0), clock, max_queue_rows=1000) as batcher:
        first = batcher.submit(rows(4, 1), 4, ((2,),))
        await settle()
        # The run took 10 ms in its thread; a busy event loop took its answer 90 ms later.
        # That delay is the loop's lag, which admission counts itself: priced into every run
        # too, it outlived the lag in the median and refused every request while no run went.
        clock.advance(0.1)
        runner.last_run_s = 0.01
        runner.finish()
        await first.future
        blocker = batcher.submit(rows(4, 1), 4, ((2,),))
        await settle()
        # 4 queued + 4 rows at 400 rows/s = 20 ms, plus a 10 ms run.
        queued = batcher.submit(rows(4, 1), 4, ((2,),), deadline_s=1.0)
        assert batcher.expected_wait_s(4) == pytest.approx(0.03)
        runner.last_run_s = None  # a runner that cannot tell: the time until its answer
        clock.advance(0.2)
        runner.finish()
        await blocker.future
        assert batcher.expected_wait_s(4) > 0.03
        await settle()
        runner.finish()
        await queued.future


async def test_arrivals_while_no_session_is_free_scan_no_shape_groups() -> None:
    runner = ManualRunner()
    async with Batcher(
        runner, BatchPolicy(8, 0.0), FakeClock(), max_queue_rows=100_000, max_shape_groups=10_000
    ) as batcher:
        blocker = batcher.submit(rows(1, 0), 1, ((2,),))
        await settle()
        assert len(runner.running) == 1
        before = batcher.statistics().groups_scanned
        # Thousands of distinct shapes, each arriving on its own loop iteration while the only
        # session is busy: none of them may cost a pass over the groups already waiting.
        waiting = []
        for width in range(3, 4003):
            waiting.append(batcher.submit(rows(1, width, width), 1, ((width,),)))
            await asyncio.sleep(0)
        stats = batcher.statistics()
        assert stats.shape_groups == 4000
        assert stats.groups_scanned == before
        # Once the session frees up the oldest group goes next, found without a scan.
        runner.finish()
        await settle()
        assert runner.running[0][0][0].shape == (1, 3)
        assert batcher.statistics().groups_scanned - before <= 4
        for _ in range(4000):
            runner.finish()
            await asyncio.sleep(0)
        await asyncio.gather(blocker.future, *(item.future for item in waiting))
        assert batcher.statistics().groups_scanned - before <= 4 * 4000


async def test_shape_groups_are_served_oldest_head_first_after_partial_takes() -> None:
    runner = ManualRunner()
    async with Batcher(runner, BatchPolicy(2, 0.0), FakeClock(), max_queue_rows=100) as batcher:
        blocker = batcher.submit(rows(1, 0), 1, ((2,),))
        await settle()
        order = [
            batcher.submit(rows(1, 1, 3), 1, ((3,),)),  # group A, head
            batcher.submit(rows(1, 2, 3), 1, ((3,),)),
            batcher.submit(rows(1, 3, 4), 1, ((4,),)),  # group B
            batcher.submit(rows(1, 4, 3), 1, ((3,),)),  # group A, behind B's head
        ]
        seen = []
        for _ in range(3):
            runner.finish()
            await settle()
            seen.append(runner.running[0][0][0][:, 0].tolist())
        runner.finish()
        await asyncio.gather(blocker.future, *(item.future for item in order))
    # A's first two fill a batch; then B (older than A's new head), then A's last.
    assert seen == [[1, 2], [3], [4]]


async def test_distinct_shapes_past_the_cap_are_refused_with_overloaded() -> None:
    runner = ManualRunner()
    async with Batcher(
        runner, BatchPolicy(8, 0.0), FakeClock(), max_queue_rows=100, max_shape_groups=2
    ) as batcher:
        blocker = batcher.submit(rows(1, 0), 1, ((2,),))
        await settle()
        accepted = [
            batcher.submit(rows(1, 1, 3), 1, ((3,),)),
            batcher.submit(rows(1, 1, 4), 1, ((4,),)),
            batcher.submit(rows(1, 1, 4), 1, ((4,),)),  # joins a waiting group: no new one
        ]
        with pytest.raises(Overloaded, match="distinct input shapes"):
            batcher.submit(rows(1, 1, 5), 1, ((5,),))
        assert batcher.statistics().rejected == 1
        for _ in range(3):
            runner.finish()
            await settle()
        await asyncio.gather(blocker.future, *(item.future for item in accepted))


async def test_one_outlier_batch_does_not_switch_deadline_shedding_off() -> None:
    runner, clock = ManualRunner(), FakeClock()
    async with Batcher(runner, BatchPolicy(4, 0.0), clock, max_queue_rows=1000) as batcher:
        for _ in range(5):  # normal batches: 4 rows in 100 ms
            item = batcher.submit(rows(4, 1), 4, ((2,),))
            await settle()
            clock.advance(0.1)
            runner.finish()
            await item.future
        # One run of 20,000,000 rows of shape [0] done at once: a rate of 2e13 rows/s.
        empty = [np.zeros((20_000_000, 0), dtype=np.float32)]
        outlier = batcher.submit(empty, 20_000_000, ((0,),))
        await settle()
        clock.advance(0.000001)
        runner.finish()
        await outlier.future
        blocker = batcher.submit(rows(4, 1), 4, ((2,),))
        await settle()
        queued = [batcher.submit(rows(4, 1), 4, ((2,),), deadline_s=1.0) for _ in range(4)]
        # Still 40 rows/s and 0.1 s a run: 20 rows wait 0.6 s, past 80% of 0.7 s.
        assert batcher.expected_wait_s(4) == pytest.approx(0.6)
        with pytest.raises(Overloaded, match="expected wait"):
            batcher.submit(rows(4, 1), 4, ((2,),), deadline_s=0.7)
        for _ in range(5):
            clock.advance(0.1)
            runner.finish()
            await settle()
        await asyncio.gather(blocker.future, *(item.future for item in queued))


class FailingRunner:
    """Runs at once (on the next loop iteration); a run fails when any input is negative,
    like a model given an out-of-range index."""

    def __init__(self) -> None:
        self.runs: list[int] = []

    idle = 1
    size = 1
    last_run_s: float | None = None

    def try_run(self, arrays: list[np.ndarray], done: Done) -> bool:
        self.runs.append(len(arrays[0]))
        result: list[np.ndarray] | BaseException = (
            ValueError("index out of range") if (arrays[0] < 0).any() else [arrays[0] * 2]
        )
        asyncio.get_running_loop().call_soon(done, result)
        return True


async def test_a_failed_batch_is_bisected_so_only_the_bad_request_fails() -> None:
    runner = FailingRunner()
    async with Batcher(runner, BatchPolicy(16, 0.0), FakeClock(), max_queue_rows=100) as batcher:
        items = [batcher.submit(rows(1, -1 if i == 5 else i), 1, ((2,),)) for i in range(16)]
        results = await asyncio.gather(*(item.future for item in items), return_exceptions=True)
        stats = batcher.statistics()
    for i, result in enumerate(results):
        if i == 5:
            assert isinstance(result, InferenceFailed)
            assert "index out of range" in str(result)
        else:
            assert isinstance(result, list)
            np.testing.assert_array_equal(result[0], items[i].arrays[0] * 2)
    # The merged run, then two halves per level down to the bad request: 1 + 2 * log2(16).
    assert runner.runs[0] == 16
    assert len(runner.runs) <= 1 + 2 * 4
    assert stats.retry_runs == len(runner.runs) - 1
    assert stats.failed == 1


async def test_a_single_request_that_fails_is_not_retried() -> None:
    runner = FailingRunner()
    async with Batcher(runner, BatchPolicy(16, 0.0), FakeClock(), max_queue_rows=100) as batcher:
        item = batcher.submit(rows(1, -1), 1, ((2,),))
        with pytest.raises(InferenceFailed):
            await item.future
    assert runner.runs == [1]


async def test_a_standing_queue_is_priced_by_what_requests_really_waited() -> None:
    """Runs are fast (4 rows in 10 ms) but requests sat 50 ms in the queue before each one,
    as when the queue drains at a busy event loop's pace: the expected wait is what they
    waited, not the 2.5 ms that rows ahead ÷ row rate says; it is forgotten once no run was
    dispatched for `SOJOURN_INTERVAL_S`."""
    runner, clock = ManualRunner(), FakeClock()
    async with Batcher(runner, BatchPolicy(4, 0.0), clock, max_queue_rows=1000) as batcher:
        for _ in range(3):
            item = batcher.submit(rows(4, 1), 4, ((2,),))
            clock.advance(0.05)  # dispatched only 50 ms after it arrived
            await settle()
            clock.advance(0.01)
            runner.finish()
            await item.future
        assert batcher.recent_wait_s() == pytest.approx(0.05)
        assert batcher.expected_wait_s(1) == pytest.approx(0.06)  # 50 ms waited + one run
        with pytest.raises(Overloaded, match="expected wait"):
            batcher.check_room(0.07, waited_s=0.001)  # 61 ms > 80% of 70 ms
        batcher.check_room(0.1, waited_s=0.001)
        clock.advance(SOJOURN_INTERVAL_S)  # no dispatch since: the queue is empty now
        assert batcher.recent_wait_s() == 0.0
        batcher.check_room(0.07, waited_s=0.001)  # 1 row at 400 rows/s + 10 ms: admitted
