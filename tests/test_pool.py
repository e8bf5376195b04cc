"""Session pool health: failing sessions are rebuilt, lost ones fail fast, stalls fail liveness."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable
from pathlib import Path

import aiohttp
import numpy as np
import pytest

from batchserve import BatchConfig, Engine, RuntimeConfig
from batchserve.clock import MonotonicClock
from batchserve.errors import InferenceFailed, ModelLoadError
from batchserve.queue import Batcher, BatchPolicy
from batchserve.runtime.pool import HealthPolicy, NoHealthySession, SessionPool
from batchserve.runtime.session import ManagedSession, SessionBuilder

from helpers import StartServer, slow_body, wait_until

GOOD = {"index": np.array([[3]], dtype=np.int64)}
BAD = {"index": np.array([[7]], dtype=np.int64)}  # outside the 5-entry table: the run fails


async def wait_for(condition: Callable[[], object]) -> None:
    await wait_until(condition, "the pool's state")


async def run(pool: SessionPool, inputs: dict[str, np.ndarray]) -> object:
    """One run through the pool; its outputs, or the exception it failed with."""
    answer: asyncio.Future[object] = asyncio.get_running_loop().create_future()
    assert pool.try_run([inputs["index"]], answer.set_result)
    return await answer


async def test_a_session_that_keeps_failing_is_rebuilt(gather_path: Path) -> None:
    builder = SessionBuilder(gather_path, RuntimeConfig())
    sessions, metadata = builder.load()
    session = ManagedSession(sessions[0])
    health = HealthPolicy(replace_after_failures=3)
    pool = SessionPool([session], metadata.input_names, rebuild=builder.rebuild, health=health)
    async with pool:
        await pool.run_each([GOOD["index"]])  # the warm-up: inputs known to compute
        session.close()  # the session breaks: every run fails from now on
        for _ in range(2):
            assert isinstance(await run(pool, GOOD), RuntimeError)
        assert pool.statistics().probes == 0  # not yet at the limit
        assert isinstance(await run(pool, GOOD), RuntimeError)
        # The third failure in a row: the known-good inputs fail too, so it is rebuilt.
        await wait_for(lambda: pool.statistics().replacements == 1)
        answer = await run(pool, GOOD)
        stats = pool.statistics()
    assert isinstance(answer, list)
    assert answer[0].tolist() == [[30.0]]
    assert (stats.failures, stats.probes, stats.replacements, stats.lost) == (3, 1, 1, 0)


async def test_bad_inputs_in_a_row_do_not_rebuild_a_healthy_session(gather_path: Path) -> None:
    runtime = RuntimeConfig(replace_after_failures=3)
    async with Engine(gather_path, BatchConfig(max_batch_size=1), runtime) as engine:
        for _ in range(7):
            with pytest.raises(InferenceFailed, match="out of data bounds"):
                await engine.infer(BAD)
        answer = await engine.infer(GOOD)
        stats = engine.statistics().pool
        assert engine.problem() is None
    assert answer["value"].tolist() == [[30.0]]
    # Checked twice (after 3 and 6 failures) on the warm-up's inputs, which still compute.
    assert (stats.failures, stats.probes, stats.replacements) == (7, 2, 0)


async def test_with_every_session_lost_queued_requests_fail_instead_of_waiting(
    gather_path: Path,
) -> None:
    builder = SessionBuilder(gather_path, RuntimeConfig())
    sessions, metadata = builder.load()

    def broken_rebuild() -> object:
        raise ModelLoadError("the model file is gone")

    health = HealthPolicy(replace_after_failures=1, rebuild_attempts=1, rebuild_backoff_s=0.01)
    pool = SessionPool(sessions, metadata.input_names, rebuild=broken_rebuild, health=health)
    policy = BatchPolicy(8, 0.0)
    async with pool, Batcher(pool, policy, MonotonicClock(), max_queue_rows=100) as batcher:
        pool.on_capacity = batcher.wake
        first = batcher.submit([BAD["index"]], 1, ((1,),))
        # One loop turn, not a wait: the batcher dispatches it alone, and the next one is queued
        # while its run is still out (a wait could let the run fail first).
        await asyncio.sleep(0)
        assert batcher.statistics().queued_rows == 0
        waiting = batcher.submit([GOOD["index"]], 1, ((1,),))  # queued behind the failure
        with pytest.raises(InferenceFailed, match="out of data bounds"):
            await first.future
        async with asyncio.timeout(10):  # bounded: before the fix it waited forever
            with pytest.raises(InferenceFailed, match="no healthy ONNX Runtime session"):
                await waiting.future
            later = batcher.submit([GOOD["index"]], 1, ((1,),))
            with pytest.raises(InferenceFailed, match="no healthy ONNX Runtime session"):
                await later.future
    assert pool.statistics().lost == 1


async def test_a_session_that_cannot_be_rebuilt_is_lost_and_requests_fail_fast(
    gather_path: Path,
) -> None:
    builder = SessionBuilder(gather_path, RuntimeConfig())
    sessions, metadata = builder.load()

    def broken_rebuild() -> object:
        raise ModelLoadError("the model file is gone")

    health = HealthPolicy(replace_after_failures=1, rebuild_attempts=2, rebuild_backoff_s=0.01)
    pool = SessionPool(sessions, metadata.input_names, rebuild=broken_rebuild, health=health)
    async with pool:
        results: list[object] = []
        assert pool.try_run([BAD["index"]], results.append)
        await wait_for(lambda: pool.statistics().lost == 1)
        assert isinstance(results[0], Exception)
        assert "could not be rebuilt" in str(pool.problem())
        # With no session left a run is failed at once instead of waiting forever.
        assert pool.try_run([GOOD["index"]], results.append)
        await wait_for(lambda: len(results) == 2)
        assert isinstance(results[1], NoHealthySession)
    assert pool.statistics().replacements == 0


async def test_a_rebuild_refuses_a_model_file_that_changed(
    gather_path: Path, mlp_path: Path, tmp_path: Path
) -> None:
    path = tmp_path / "model.onnx"
    shutil.copy(gather_path, path)
    builder = SessionBuilder(path, RuntimeConfig())
    builder.load()
    assert builder.rebuild().get_inputs()[0].name == "index"
    shutil.copy(mlp_path, path)
    with pytest.raises(ModelLoadError, match="changed since it was loaded"):
        builder.rebuild()


async def test_closing_during_a_rebuild_does_not_hang(gather_path: Path) -> None:
    builder = SessionBuilder(gather_path, RuntimeConfig())
    sessions, metadata = builder.load()

    def slow_rebuild() -> object:
        raise ModelLoadError("not now")

    health = HealthPolicy(replace_after_failures=1, rebuild_attempts=100, rebuild_backoff_s=0.05)
    pool = SessionPool(sessions, metadata.input_names, rebuild=slow_rebuild, health=health)
    async with pool:
        results: list[object] = []
        pool.try_run([BAD["index"]], results.append)
        await wait_for(lambda: len(results) == 1)
    # Leaving the block returned: the pending rebuild was cancelled and the slot given up.
    assert pool.statistics().lost == 1


@pytest.mark.slow
async def test_a_stalled_run_fails_liveness_until_it_ends(
    start_server: StartServer, slow_path: Path, http: aiohttp.ClientSession
) -> None:
    engine = Engine(
        slow_path,
        BatchConfig(max_batch_size=8192),
        RuntimeConfig(stall_timeout_s=0.05),
        name="slow",
    )
    server = await start_server(engine)
    async with http.get(f"{server.url}/v2/health/live") as r:
        assert r.status == 200
    data, headers = slow_body(8192)
    busy = asyncio.create_task(
        http.post(f"{server.url}/v2/models/slow/infer", data=data, headers=headers)
    )

    async def stalled() -> dict[str, object] | None:  # or the long run ended first: a failure
        assert not busy.done(), "the run ended before it counted as a stall"
        async with http.get(f"{server.url}/v2/health/live") as r:
            return dict(await r.json()) if r.status == 503 else None

    seen = await wait_until(stalled, "the long run to count as a stall")
    assert seen.get("live") is False
    assert "stall limit" in str(seen.get("error"))
    async with http.get(f"{server.url}/metrics") as r:
        assert 'batchserve_model_live{model="slow",version="1"} 0.0' in await r.text()
    response = await busy
    assert response.status == 200
    response.release()
    async with http.get(f"{server.url}/v2/health/live") as r:
        assert r.status == 200
        assert await r.json() == {"live": True}
