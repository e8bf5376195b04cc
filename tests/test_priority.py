"""Request priorities: the pure choice of the next level (and its starvation bound), the level
policies, config.toml's [priority], and the batcher serving levels with a fake clock and a
runner the test completes by hand."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_batcher import ManualRunner, rows, settle
from tritonclient.grpc import service_pb2, service_pb2_grpc

from batchserve import BatchConfig, Engine, RuntimeConfig
from batchserve.app import Server
from batchserve.errors import InvalidInput, ModelLoadError, Overloaded
from batchserve.queue import Batcher, BatchPolicy
from batchserve.queue.priority import LevelPolicy, PriorityConfig, choose_tier, expired
from batchserve.repository.config import parse_model_config
from batchserve.testing import FakeClock

from helpers import StartServer, wait_until
from models import slow

SIG = ((2,),)

# ------------------------------------------------------------------------------ pure choice


def test_the_highest_level_with_requests_goes_first() -> None:
    assert choose_tier([None, 7, 3], runs=0, share=8) == 1
    assert choose_tier([5, 7, 3], runs=0, share=8) == 0
    assert choose_tier([None, None, 3], runs=0, share=8) == 2


def test_every_share_th_run_goes_to_the_oldest_request_whatever_its_level() -> None:
    oldest = [9, 4, 1]
    picks = [choose_tier(oldest, runs, share=4) for runs in range(8)]
    assert picks == [0, 0, 0, 2, 0, 0, 0, 2]
    assert all(choose_tier(oldest, runs, share=1) == 2 for runs in range(5))  # plain FIFO


def test_choosing_from_no_request_is_an_error() -> None:
    with pytest.raises(ValueError, match="no queue"):
        choose_tier([None, None], runs=3, share=4)


def _simulate(arrivals: list[list[int]], share: int, levels: int) -> list[tuple[int, int, int]]:
    """One request dispatched per run with `choose_tier`, FIFO within a level; `arrivals[r]`:
    the levels of the requests arriving before run r. Returns, per request, (runs from its
    arrival to its dispatch, requests waiting ahead of it at arrival, its level)."""
    queues: list[deque[tuple[int, int, int]]] = [deque() for _ in range(levels)]
    seq = 0
    found = []
    run = 0
    for batch in [*arrivals, *([[]] * (len(arrivals) * share * 4))]:
        for level in batch:
            ahead = sum(len(q) for q in queues)
            queues[level].append((seq, run, ahead))
            seq += 1
        if not any(queues):
            if run >= len(arrivals):
                break
            run += 1
            continue
        tier = choose_tier([q[0][0] if q else None for q in queues], run, share)
        _, arrived, ahead = queues[tier].popleft()
        found.append((run - arrived, ahead, tier))
        run += 1
    assert not any(queues)
    return found


@settings(max_examples=200, deadline=None)
@given(
    arrivals=st.lists(st.lists(st.integers(0, 2), max_size=3), min_size=1, max_size=60),
    share=st.integers(1, 6),
)
def test_no_request_waits_more_than_the_stated_bound(arrivals: list[list[int]], share: int) -> None:
    # docs/batching.md: a request with n requests ahead of it (any level) is dispatched within
    # share * (n + 1) runs, however many higher-level requests keep arriving.
    for waited, ahead, _level in _simulate(arrivals, share, levels=3):
        assert waited <= share * (ahead + 1), (waited, ahead, share)


def test_a_low_level_request_under_a_flood_of_high_ones_is_served_within_share_runs() -> None:
    arrivals = [[2, 0]] + [[0]] * 40  # one low, then one high per run, for 40 runs
    outcome = _simulate(arrivals, share=5, levels=3)
    low = [waited for waited, _, level in outcome if level == 2]
    assert low == [4]  # the first share turn (the 5th run, run 4) takes it


# ---------------------------------------------------------------------------- level policy


def test_priorities_map_to_levels_and_refuse_levels_the_model_lacks() -> None:
    config = PriorityConfig(levels=3, default=2)
    assert [config.tier(p) for p in (0, 1, 2, 3)] == [1, 0, 1, 2]
    assert PriorityConfig(levels=3).tier(0) == 2  # default: the lowest
    for bad in (4, 17):
        with pytest.raises(InvalidInput, match="from 1 \\(highest\\) to 3"):
            config.tier(bad)


def test_a_rejecting_level_s_timeout_shortens_deadlines_and_a_delaying_one_does_not() -> None:
    config = PriorityConfig(
        levels=3,
        policies=(
            LevelPolicy(timeout_ms=50),
            LevelPolicy(timeout_ms=80, on_timeout="delay"),
        ),
    )
    assert config.deadline_s(0, None) == pytest.approx(0.05)
    assert config.deadline_s(0, 0.02) == pytest.approx(0.02)
    assert config.deadline_s(0, 0.2) == pytest.approx(0.05)
    assert config.deadline_s(1, None) is None
    assert config.deadline_s(1, 0.3) == pytest.approx(0.3)
    assert config.deadline_s(2, 0.3) == pytest.approx(0.3)  # no policy of its own
    assert config.tiers == 4  # three levels and the delayed queue


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"levels": 1}, "levels must be 2 to 16"),
        ({"levels": 17}, "levels must be 2 to 16"),
        ({"levels": 2, "default": 3}, "default must be a level from 1 to 2"),
        ({"levels": 2, "share": 0}, "share must be >= 1"),
        ({"levels": 2, "policies": (LevelPolicy(),) * 3}, "policies for 3 levels"),
    ],
)
def test_priority_config_refuses_what_cannot_work(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PriorityConfig(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_queue_rows": 0}, "max_queue_rows must be >= 1"),
        ({"timeout_ms": 0}, "timeout_ms must be > 0"),
        ({"on_timeout": "drop"}, "on_timeout must be one of"),
        ({"on_timeout": "delay"}, "needs a timeout_ms"),
    ],
)
def test_level_policy_refuses_what_cannot_work(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LevelPolicy(**kwargs)  # type: ignore[arg-type]


def test_expiry_applies_to_delaying_levels_only() -> None:
    delay = LevelPolicy(timeout_ms=100, on_timeout="delay")
    assert not expired(10.0, delay, 10.1)
    assert expired(10.0, delay, 10.1001)
    assert not expired(10.0, LevelPolicy(timeout_ms=100), 99.0)


# ------------------------------------------------------------------------------ config.toml


def test_config_toml_priority_table_is_parsed() -> None:
    config = parse_model_config(
        {
            "priority": {
                "levels": 3,
                "default": 2,
                "share": 4,
                "level": {
                    "1": {"max_queue_rows": 64, "timeout_ms": 50},
                    "3": {"timeout_ms": 200, "on_timeout": "delay"},
                },
            }
        }
    )
    assert config.priority == PriorityConfig(
        levels=3,
        default=2,
        share=4,
        policies=(
            LevelPolicy(max_queue_rows=64, timeout_ms=50.0),
            LevelPolicy(),
            LevelPolicy(timeout_ms=200.0, on_timeout="delay"),
        ),
    )


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"levels": 2, "colour": 1}, "unknown key\\(s\\) \\['colour'\\]"),
        ({"levels": "2"}, "levels must be a int"),
        ({"levels": 2, "level": {"3": {}}}, "\\['3'\\] are not levels from 1 to 2"),
        ({"levels": 2, "level": {"top": {}}}, "\\['top'\\] are not levels"),
        ({"levels": 2, "level": {"1": {"timeout": 5}}}, "unknown key\\(s\\) \\['timeout'\\]"),
        ({"levels": 2, "level": {"1": {"on_timeout": "delay"}}}, "needs a timeout_ms"),
        ({"levels": 2, "default": 5}, "default must be a level"),
    ],
)
def test_config_toml_priority_errors_name_the_problem(
    table: dict[str, object], message: str
) -> None:
    with pytest.raises(ModelLoadError, match=message):
        parse_model_config({"priority": table}, "m/config.toml")


# ------------------------------------------------------------------------ batcher by level


def _batcher(runner: ManualRunner, priority: PriorityConfig, clock: FakeClock) -> Batcher:
    # One row per run: each run's contents show which request the levels chose.
    return Batcher(runner, BatchPolicy(1, 0.0), clock, max_queue_rows=100, priority=priority)


def _served(runner: ManualRunner) -> list[float]:
    values = []
    while runner.running:
        values.append(float(runner.running[0][0][0][0, 0]))
        runner.finish()
    return values


async def _drain(runner: ManualRunner, count: int) -> list[float]:
    order: list[float] = []
    while len(order) < count:
        await settle()
        order += _served(runner)
    return order


async def test_higher_levels_are_served_first_and_fifo_within_a_level() -> None:
    runner, clock = ManualRunner(), FakeClock()
    async with _batcher(runner, PriorityConfig(levels=3, share=100), clock) as batcher:
        blocker = batcher.submit(rows(1, 0), 1, SIG, tier=2)
        await settle()  # the idle session takes it at once
        items = [
            batcher.submit(rows(1, value), 1, SIG, tier=tier)
            for value, tier in ((1, 2), (2, 1), (3, 0), (4, 2), (5, 0), (6, 1))
        ]
        order = await _drain(runner, 7)
        await asyncio.gather(blocker.future, *(i.future for i in items))
    assert order == [0, 3, 5, 2, 6, 1, 4]


async def test_the_share_turn_serves_the_oldest_low_level_request() -> None:
    runner, clock = ManualRunner(), FakeClock()
    async with _batcher(runner, PriorityConfig(levels=2, share=3), clock) as batcher:
        batcher.submit(rows(1, 0), 1, SIG, tier=0)
        await settle()
        low = batcher.submit(rows(1, 100), 1, SIG, tier=1)
        highs = [batcher.submit(rows(1, v), 1, SIG, tier=0) for v in range(1, 7)]
        order = await _drain(runner, 8)
        await asyncio.gather(low.future, *(h.future for h in highs))
    # Runs 0 (the blocker), 1 and then run 2, the first share turn: the oldest, the low one.
    assert order == [0, 1, 100, 2, 3, 4, 5, 6]


async def test_a_level_s_own_queue_limit_refuses_only_that_level() -> None:
    runner, clock = ManualRunner(), FakeClock()
    priority = PriorityConfig(levels=2, policies=(LevelPolicy(), LevelPolicy(max_queue_rows=2)))
    async with _batcher(runner, priority, clock) as batcher:
        batcher.submit(rows(1, 0), 1, SIG, tier=1)
        await settle()
        waiting = [batcher.submit(rows(1, v), 1, SIG, tier=1) for v in (1, 2)]
        with pytest.raises(Overloaded, match="priority level 2's queue full"):
            batcher.submit(rows(1, 3), 1, SIG, tier=1)
        high = batcher.submit(rows(1, 4), 1, SIG, tier=0)  # its level has room
        levels = {s.level: s for s in batcher.statistics().levels}
        assert (levels["1"].rejected, levels["2"].rejected) == (0, 1)
        assert (levels["1"].queued_rows, levels["2"].queued_rows) == (1, 2)
        assert batcher.statistics().rejected == 1
        await _drain(runner, 4)
        await asyncio.gather(high.future, *(w.future for w in waiting))


async def test_a_delaying_level_s_late_requests_go_behind_the_punctual_ones() -> None:
    runner, clock = ManualRunner(), FakeClock()
    delay = LevelPolicy(timeout_ms=100, on_timeout="delay")
    priority = PriorityConfig(levels=2, share=100, policies=(delay,))
    async with _batcher(runner, priority, clock) as batcher:
        batcher.submit(rows(1, 0), 1, SIG, tier=1)
        await settle()
        late = [batcher.submit(rows(1, v), 1, SIG, tier=0) for v in (1, 2)]
        clock.advance(0.15)  # both outlive level 1's 100 ms while the session is busy
        punctual = batcher.submit(rows(1, 3), 1, SIG, tier=0)
        low = batcher.submit(rows(1, 4), 1, SIG, tier=1)
        order = await _drain(runner, 5)
        await asyncio.gather(punctual.future, low.future, *(i.future for i in late))
        levels = {s.level: s for s in batcher.statistics().levels}
    # Delayed: after every request still within its own timeout, of any level; in order.
    assert order == [0, 3, 4, 1, 2]
    assert levels["1"].delayed == 2
    assert set(levels) == {"1", "2", "delayed"}


async def test_deadline_admission_counts_only_the_rows_at_or_above_a_level() -> None:
    runner, clock = ManualRunner(), FakeClock()
    async with _batcher(runner, PriorityConfig(levels=2), clock) as batcher:
        batcher.submit(rows(1, 0), 1, SIG, tier=1)
        await settle()
        clock.advance(0.01)  # one row took 10 ms: the measured rate is 100 rows/s
        runner.finish()
        await settle()
        lows = [batcher.submit(rows(1, v), 1, SIG, tier=1) for v in range(1, 21)]
        # 20 low rows wait: 200 ms. A low request with a 100 ms deadline cannot make it; a
        # high one goes ahead of them and can.
        with pytest.raises(Overloaded, match="expected wait"):
            batcher.submit(rows(1, 50), 1, SIG, deadline_s=0.1, tier=1)
        high = batcher.submit(rows(1, 60), 1, SIG, deadline_s=0.1, tier=0)
        levels = {s.level: s for s in batcher.statistics().levels}
        assert (levels["1"].rejected, levels["2"].rejected) == (0, 1)
        order = await _drain(runner, 21)
        await asyncio.gather(high.future, *(low.future for low in lows))
    assert order == [60, *range(1, 21)]  # the session was idle: the high one ran first


async def test_room_left_in_a_run_goes_to_lower_levels_of_the_same_shape() -> None:
    runner, clock = ManualRunner(), FakeClock()
    priority = PriorityConfig(levels=3, share=100)
    policy = BatchPolicy(4, 0.0)
    async with Batcher(runner, policy, clock, max_queue_rows=100, priority=priority) as batcher:
        blocker = batcher.submit(rows(1, 0), 1, SIG, tier=2)
        await settle()
        items = [
            batcher.submit(rows(1, 1), 1, SIG, tier=2),
            batcher.submit(rows(1, 2), 1, SIG, tier=1),
            batcher.submit(rows(1, 3), 1, ((3,),), tier=1),  # another shape: not in this run
            batcher.submit(rows(1, 4), 1, SIG, tier=0),
            batcher.submit(rows(1, 5), 1, SIG, tier=2),
            batcher.submit(rows(1, 6), 1, SIG, tier=2),
        ]
        runner.finish()
        await settle()
        run = runner.running[0][0][0]
        # Level 1's one request, then level 2's, then level 3's oldest: four rows, one run.
        assert list(run[:, 0]) == [4, 2, 1, 5]
        levels = {s.level: s for s in batcher.statistics().levels}
        assert [levels[k].queued_rows for k in ("1", "2", "3")] == [0, 1, 1]
        assert batcher.statistics().queued_rows == 2
        await _drain(runner, 3)
        await asyncio.gather(blocker.future, *(i.future for i in items))
        assert batcher.statistics().queued_rows == 0


class RefusingOnce(ManualRunner):
    """A runner that turns the first run down (a session just lost), then takes them."""

    refused = False

    def try_run(self, arrays: list[np.ndarray], done: Any) -> bool:
        if not self.refused:
            self.refused = True
            return False
        return super().try_run(arrays, done)


async def test_a_mixed_run_the_runner_turns_down_goes_back_to_each_level() -> None:
    runner, clock = RefusingOnce(), FakeClock()
    priority = PriorityConfig(levels=2, share=100)
    async with Batcher(runner, BatchPolicy(4, 0.0), clock, max_queue_rows=100,
                       priority=priority) as batcher:  # fmt: skip
        items = [batcher.submit(rows(1, v), 1, SIG, tier=t) for v, t in ((1, 1), (2, 0), (3, 1))]
        await settle()  # the runner refused the mixed run: every request is back in its level
        levels = {s.level: s for s in batcher.statistics().levels}
        assert [levels[k].queued_rows for k in ("1", "2")] == [1, 2]
        batcher.wake()
        await settle()
        assert list(runner.running[0][0][0][:, 0]) == [2, 1, 3]
        runner.finish()
        await asyncio.gather(*(i.future for i in items))


async def test_a_low_level_s_wait_is_priced_at_its_share_of_runs_while_higher_ones_wait() -> None:
    runner, clock = ManualRunner(), FakeClock()
    async with _batcher(runner, PriorityConfig(levels=2, share=8), clock) as batcher:
        batcher.submit(rows(1, 0), 1, SIG, tier=1)
        await settle()
        clock.advance(0.01)  # one row in 10 ms: 100 rows/s, 10 ms a run
        runner.finish()
        await settle()
        batcher.submit(rows(1, 0), 1, SIG, tier=1)  # keeps the session busy
        await settle()
        lows = [batcher.submit(rows(1, v), 1, SIG, tier=1) for v in range(3)]
        highs = [batcher.submit(rows(1, v), 1, SIG, tier=0) for v in range(2)]
        # A high row waits for the 2 high rows; a low one gets 1 run in 8 while they wait:
        # its level's 4 rows take 32 runs' time, not 2 + 3 + 1.
        assert batcher.expected_wait_s(1, tier=0) == pytest.approx((2 + 1) / 100 + 0.01)
        assert batcher.expected_wait_s(1, tier=1) == pytest.approx((3 + 1) * 8 / 100 + 0.01)
        for high in highs:
            batcher.withdraw(high)
        # With nothing above it, the low level drains at the runs' own pace.
        assert batcher.expected_wait_s(1, tier=1) == pytest.approx((3 + 1) / 100 + 0.01)
        await _drain(runner, 4)
        await asyncio.gather(*(low.future for low in lows))


async def test_without_priorities_the_batcher_keeps_no_level_statistics() -> None:
    runner = ManualRunner()
    async with Batcher(runner, BatchPolicy(4, 0.0), FakeClock(), max_queue_rows=10) as batcher:
        item = batcher.submit(rows(1, 1), 1, SIG)
        await settle()
        runner.finish()
        out = await item.future
        assert batcher.statistics().levels == ()
    np.testing.assert_array_equal(out[0], rows(1, 2)[0])


# ------------------------------------------------------------------- real server, both protocols


@pytest.fixture(scope="module")
def slow_sum_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return slow(tmp_path_factory.mktemp("models") / "slow_sum.onnx", summed=True)


async def _busy_server(
    start_server: StartServer, model_path: Path, **priority: Any
) -> tuple[Server, Engine]:
    batch = BatchConfig(max_batch_size=1, priority=PriorityConfig(levels=2, **priority))
    engine = Engine(model_path, batch, RuntimeConfig(instances=1), name="slow")
    return await start_server(engine, grpc_port=0), engine


def _queue(engine: Engine) -> Any:
    return engine.statistics().batcher


X = np.full((1, 1024), 0.5, np.float32).tolist()
JSON = {"Content-Type": "application/json"}
# Runs of this many rows keep the one session busy (8 dense layers of 1024 x 1024 each) for
# far longer than a one-row request takes to travel: the queue forms behind them. The model
# answers each row's sum, so every answer is small and arrives in the order its run finished.
BIG = 1024


async def test_a_high_priority_request_overtakes_queued_ones_over_http_and_grpc(
    start_server: StartServer, slow_sum_path: Path
) -> None:
    server, engine = await _busy_server(start_server, slow_sum_path, share=100)
    finished: list[str] = []
    tasks: list[asyncio.Task[None]] = []
    async with (
        aiohttp.ClientSession() as http,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel,
    ):
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)

        async def over_http(name: str, priority: int) -> None:
            tensor = {"name": "x", "shape": [1, 1024], "datatype": "FP32", "data": X}
            body = {"inputs": [tensor], "parameters": {"priority": priority}}
            async with http.post(
                f"{server.url}/v2/models/slow/infer", data=orjson.dumps(body), headers=JSON
            ) as response:
                assert response.status == 200, await response.text()
            finished.append(name)

        async def over_grpc(name: str, priority: int | None, rows: int) -> None:
            request = service_pb2.ModelInferRequest(model_name="slow")
            request.inputs.add(name="x", datatype="FP32", shape=[rows, 1024])
            request.raw_input_contents.append(np.full((rows, 1024), 0.5, np.float32).tobytes())
            if priority is not None:  # as tritonclient sends it
                request.parameters["priority"].uint64_param = priority
            await stub.ModelInfer(request)
            finished.append(name)

        async def send(call: Coroutine[Any, Any, None], count: int, what: str) -> None:
            """Send one request and wait until it is in the queue, so the queue's order is
            the order of sending (a request that failed says why, rather than as a wait that
            never ends)."""
            tasks.append(asyncio.create_task(call))

            def reached() -> bool:
                return any(t.done() for t in tasks) or _queue(engine).requests >= count

            await wait_until(reached, what)
            for task in tasks:
                if task.done():
                    task.result()

        await send(over_grpc("first", None, BIG), 1, "the first request")
        for i, priority in enumerate((2, 0, 2, 2)):  # 0: the model's default level, 2
            await send(over_grpc(f"low{i}", priority, BIG), 2 + i, f"low request {i}")
        await send(over_grpc("high-grpc", 1, 1), 6, "the gRPC high one")
        await send(over_http("high-http", 1), 7, "the HTTP high one")
        await asyncio.gather(*tasks)
    # In arrival order both would come last. Queued behind the run in progress when they came
    # (the first, or at most a low one that had started meanwhile), they overtake the lows
    # still waiting; each level keeps its own arrival order.
    assert [name for name in finished if name.startswith("low")] == [f"low{i}" for i in range(4)]
    # (The two high ones run back to back, one row each: which answer lands first is the
    # transport's business, so only their place before the big runs is asserted.)
    assert max(finished.index("high-grpc"), finished.index("high-http")) < finished.index("low2")
    assert finished[-2:] == ["low2", "low3"], finished
    levels = {s.level: s for s in _queue(engine).levels}
    assert levels["1"].queue_wait.count == 2
    assert levels["2"].queue_wait.count == 5


async def test_a_priority_the_model_lacks_is_a_400_and_invalid_argument(
    start_server: StartServer, slow_sum_path: Path
) -> None:
    server, _ = await _busy_server(start_server, slow_sum_path)
    body = {"inputs": [{"name": "x", "shape": [1, 1024], "datatype": "FP32", "data": X}]}
    async with aiohttp.ClientSession() as http:
        wrong = "non-negative integer"
        for bad, message in (
            (3, "from 1 (highest) to 2"),
            (-1, wrong),
            ("1", wrong),
            (True, wrong),
        ):
            sent = {**body, "parameters": {"priority": bad}}
            async with http.post(f"{server.url}/v2/models/slow/infer", json=sent) as response:
                assert response.status == 400
                assert message in (await response.json())["error"]
        async with http.get(f"{server.url}/metrics") as response:
            text = await response.text()
    assert 'batchserve_priority_queue_rows{level="1",model="slow",version="1"}' in text
    assert 'batchserve_priority_rejected_requests_total{level="2",model="slow",version="1"}' in text
    request = service_pb2.ModelInferRequest(model_name="slow")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 1024])
    request.raw_input_contents.append(np.asarray(X, np.float32).tobytes())
    request.parameters["priority"].int64_param = 9
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "from 1 (highest) to 2" in (caught.value.details() or "")


async def test_a_model_without_levels_ignores_the_priority_parameter(
    start_server: StartServer, mlp_path: Path
) -> None:
    # As Triton: priority matters only to a model with levels; any valid value is served.
    server = await start_server(Engine(mlp_path, name="mlp"))
    body = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32",
                        "data": [0.0] * 64}], "parameters": {"priority": 5}}  # fmt: skip
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{server.url}/v2/models/mlp/infer", json=body) as response,
    ):
        assert response.status == 200


# ------------------------------------------------------------------ the load generator's side


def test_bench_parameters_are_read_as_json_or_text() -> None:
    from batchserve.bench.command import request_parameters
    from batchserve.bench.errors import BenchError

    assert request_parameters(["priority=1", "cache=false", "tag=a b", "timeout=5e4"]) == {
        "priority": 1, "cache": False, "tag": "a b", "timeout": 50000.0}  # fmt: skip
    for bad in ("priority", "=1", "x=[1]"):
        with pytest.raises(BenchError, match="--parameter"):
            request_parameters([bad])


def test_bench_sends_its_parameters_over_http_and_grpc() -> None:
    from batchserve.bench.workload import build_workload

    metadata = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]}
    params = {"priority": 2, "cache": False}
    for binary in (False, True):
        http = build_workload("http://h", "m", metadata, binary=binary, parameters=params)
        body = http.body(0).data
        header = body[: int(http.body(0).headers.get("Inference-Header-Content-Length", len(body)))]
        sent = orjson.loads(header)["parameters"]
        assert {k: sent[k] for k in params} == params
        assert sent.get("binary_data_output", False) is binary
    grpc_work = build_workload("grpc://h", "m", metadata, protocol="grpc", parameters=params)
    request = service_pb2.ModelInferRequest.FromString(grpc_work.body(0).data)
    assert request.parameters["priority"].int64_param == 2
    assert request.parameters["cache"].bool_param is False
