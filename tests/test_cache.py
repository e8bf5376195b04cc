"""The response cache: keys, the byte-bounded LRU, the codec, the breaker, and real Redis."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import numpy as np
import pytest

from batchserve import BatchConfig, CacheConfig, Engine, RuntimeConfig
from batchserve.cache import cache_key, codec
from batchserve.cache.breaker import CircuitBreaker, CircuitState
from batchserve.cache.lru import ByteLRU
from batchserve.cache.tiered import ResponseCache
from batchserve.errors import Overloaded
from batchserve.testing import FakeClock

from conftest import RedisProcess, StartServer
from models import ECHO_TYPES

V2 = {
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32,
    "UINT64": np.uint64, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32,
    "INT64": np.int64, "FP16": np.float16, "FP32": np.float32, "FP64": np.float64,
}  # fmt: skip


def echo_inputs(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    inputs: dict[str, np.ndarray] = {}
    for datatype in ECHO_TYPES:
        if datatype == "BYTES":
            inputs[f"x_{datatype}"] = np.array([[f"s{seed}", "é"]], dtype=object)
        else:
            inputs[f"x_{datatype}"] = (rng.random((1, 2)) * 100).astype(V2[datatype])
    return inputs


# -- keys ---------------------------------------------------------------------------------------


def test_keys_differ_in_every_field_that_matters() -> None:
    x = {"input": np.arange(4, dtype=np.float32).reshape(1, 4)}
    base = cache_key("m", "1", x)
    assert cache_key("m", "1", {"input": x["input"].copy()}) == base
    others = [
        cache_key("n", "1", x),
        cache_key("m", "2", x),
        cache_key("m", "1", x, ["probabilities"]),
        cache_key("m", "1", {"input": x["input"].astype(np.float64)}),
        cache_key("m", "1", {"input": x["input"].reshape(2, 2)}),
        cache_key("m", "1", {"input": x["input"] + 1}),
        cache_key("m", "1", {"other": x["input"]}),
        cache_key("m1", "", x),  # field boundaries are length-prefixed: "m"+"1" ≠ "m1"+""
    ]
    assert len({base, *others}) == len(others) + 1


# -- local tier ---------------------------------------------------------------------------------


def test_lru_is_bounded_by_bytes_and_evicts_least_recent() -> None:
    lru = ByteLRU(capacity_bytes=3 * (400 + 32))
    for i in range(3):
        lru.put(bytes([i]) * 32, {"y": np.full(100, i, np.float32)})  # 400 bytes each
    assert lru.get(bytes([0]) * 32) is not None  # 0 is now the most recent
    lru.put(bytes([3]) * 32, {"y": np.zeros(100, np.float32)})
    assert lru.get(bytes([1]) * 32) is None  # the least recent went first
    assert lru.get(bytes([0]) * 32) is not None
    stats = lru.statistics()
    assert stats.evictions == 1
    assert stats.bytes <= stats.capacity_bytes
    lru.put(b"big" * 11, {"y": np.zeros(10_000, np.float32)})  # larger than the whole cache
    assert lru.get(b"big" * 11) is None


def test_lru_hits_are_read_only_copies() -> None:
    lru = ByteLRU(1 << 20)
    source = np.ones(4, np.float32)
    lru.put(b"k", {"y": source})
    source[:] = 7  # the caller's buffer changes later: the cached answer must not
    hit = lru.get(b"k")
    assert hit is not None
    np.testing.assert_array_equal(hit["y"], np.ones(4, np.float32))
    with pytest.raises(ValueError, match="read-only"):
        hit["y"][0] = 3


# -- codec and breaker --------------------------------------------------------------------------


def test_codec_round_trips_every_datatype() -> None:
    outputs = echo_inputs(1)
    outputs["scalar"] = np.array(3.5, np.float64)
    outputs["empty"] = np.zeros((0, 3), np.int32)
    back = codec.loads(codec.dumps(outputs))
    assert list(back) == list(outputs)
    for name, array in outputs.items():
        assert back[name].dtype == array.dtype, name
        assert back[name].shape == array.shape, name
        assert back[name].tolist() == array.tolist(), name


@pytest.mark.parametrize("raw", [b"", b"nope", codec.dumps({"y": np.ones(3)})[:-1]])
def test_codec_refuses_anything_else(raw: bytes) -> None:
    with pytest.raises(ValueError, match=r"cached value|truncated"):
        codec.loads(raw)


def test_circuit_breaker_opens_cools_down_and_recovers() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(clock, failure_threshold=2, reset_after_s=5.0)
    breaker.failure()
    assert breaker.allow()
    breaker.failure()
    assert breaker.state is CircuitState.OPEN
    assert not breaker.allow()
    clock.advance(5.0)
    assert breaker.state is CircuitState.HALF_OPEN
    assert breaker.allow()  # one trial
    assert not breaker.allow()  # and only one
    breaker.failure()
    assert breaker.state is CircuitState.OPEN
    clock.advance(5.0)
    assert breaker.allow()
    breaker.success()
    assert breaker.state is CircuitState.CLOSED
    assert breaker.opened == 2


# -- the engine with a cache --------------------------------------------------------------------


async def test_hits_equal_misses_for_every_datatype(echo_path: Path) -> None:
    async with Engine(echo_path, cache=CacheConfig(size_mb=8)) as engine:
        inputs = echo_inputs(2)
        miss = await engine.infer(inputs)
        hit = await engine.infer({k: v.copy() for k, v in inputs.items()})
        stats = engine.statistics()
    assert stats.batcher.requests == 1
    assert stats.cache is not None
    assert stats.cache.local.hits == 1
    for name in miss:
        assert hit[name].dtype == miss[name].dtype
        assert hit[name].shape == miss[name].shape
        assert hit[name].tolist() == miss[name].tolist()


async def test_an_empty_batch_is_cached_like_any_other(mlp_path: Path) -> None:
    # Found by the schema-driven fuzz run: a zero-row tensor once failed the key with a 500.
    empty = np.zeros((0, 64), np.float32)
    assert cache_key("m", "1", {"input": empty}, None) != cache_key(
        "m", "1", {"input": np.zeros((0, 32), np.float32)}, None
    )
    async with Engine(mlp_path, cache=CacheConfig(size_mb=8)) as engine:
        first = await engine.infer({"input": empty})
        second = await engine.infer({"input": empty.copy()})
        stats = engine.statistics()
    assert first["probabilities"].shape == second["probabilities"].shape == (0, 10)
    assert stats.cache is not None
    assert stats.cache.local.hits == 1


async def test_requested_outputs_and_models_never_share_entries(
    two_inputs_path: Path,
) -> None:
    feeds = {"a": np.ones((1, 3), np.float32), "b": np.ones((1, 2), np.int64)}
    config = CacheConfig(size_mb=8)
    async with (
        Engine(two_inputs_path, cache=config, name="one") as one,
        Engine(two_inputs_path, cache=config, name="two") as two,
    ):
        only_sum = await one.infer(feeds, outputs=["sum"])
        both = await one.infer(feeds)
        await two.infer(feeds)
        assert list(only_sum) == ["sum"]
        assert list(both) == ["sum", "b_twice"]
        assert one.statistics().batcher.requests == 2
        assert two.statistics().batcher.requests == 1


async def test_identical_concurrent_requests_run_once(mlp_path: Path) -> None:
    x = np.random.default_rng(3).standard_normal((1, 64)).astype(np.float32)
    async with Engine(mlp_path, cache=CacheConfig(size_mb=8)) as engine:
        results = await asyncio.gather(*(engine.infer({"input": x.copy()}) for _ in range(50)))
        stats = engine.statistics()
    assert stats.batcher.requests == 1
    assert stats.cache is not None
    assert stats.cache.coalesced == 49
    for result in results:
        np.testing.assert_array_equal(result["probabilities"], results[0]["probabilities"])


async def test_opting_out_and_non_cacheable_models_always_compute(mlp_path: Path) -> None:
    x = np.ones((1, 64), np.float32)
    async with Engine(mlp_path, cache=CacheConfig(size_mb=8)) as engine:
        await engine.infer({"input": x})
        await engine.infer({"input": x}, cache=False)
        assert engine.statistics().batcher.requests == 2
    async with Engine(mlp_path, cache=CacheConfig(size_mb=8, cacheable=False)) as engine:
        await engine.infer({"input": x})
        await engine.infer({"input": x})
        assert engine.statistics().batcher.requests == 2


# -- Redis --------------------------------------------------------------------------------------


async def test_a_second_engine_gets_hits_the_first_computed(
    mlp_path: Path, redis_server: RedisProcess
) -> None:
    x = np.random.default_rng(4).standard_normal((2, 64)).astype(np.float32)
    config = CacheConfig(size_mb=8, redis_url=redis_server.url, ttl_s=60)
    async with Engine(mlp_path, cache=config, name="mlp") as first:
        computed = await first.infer({"input": x})
        await asyncio.sleep(0.2)  # the write to Redis happens off the request's path
    async with Engine(mlp_path, cache=config, name="mlp") as second:
        shared = await second.infer({"input": x})
        stats = second.statistics()
    assert stats.batcher.requests == 0
    assert stats.cache is not None
    assert stats.cache.redis is not None
    assert stats.cache.redis.hits == 1
    np.testing.assert_array_equal(shared["probabilities"], computed["probabilities"])


async def test_entries_expire_after_their_ttl(mlp_path: Path, redis_server: RedisProcess) -> None:
    x = np.ones((1, 64), np.float32)
    config = CacheConfig(size_mb=0, redis_url=redis_server.url, ttl_s=0.3)
    async with Engine(mlp_path, cache=config) as engine:
        await engine.infer({"input": x})
        await asyncio.sleep(0.1)
        await engine.infer({"input": x})
        assert engine.statistics().batcher.requests == 1  # a Redis hit
        await asyncio.sleep(0.5)
        await engine.infer({"input": x})
        assert engine.statistics().batcher.requests == 2  # expired, computed again


async def test_redis_outage_degrades_to_local_tier_and_recovers(
    mlp_path: Path, redis_server: RedisProcess
) -> None:
    config = CacheConfig(
        size_mb=0, redis_url=redis_server.url, ttl_s=60, redis_timeout_ms=50,
        redis_retry_after_s=0.3,
    )  # fmt: skip
    rng = np.random.default_rng(5)
    inputs = [rng.standard_normal((1, 64)).astype(np.float32) for _ in range(20)]
    async with Engine(mlp_path, BatchConfig(max_batch_size=64), cache=config) as engine:

        async def load(rounds: int) -> None:
            for _ in range(rounds):
                results = await asyncio.gather(
                    *(engine.infer({"input": x}) for x in inputs), return_exceptions=True
                )
                assert not [r for r in results if isinstance(r, BaseException)]

        await load(2)
        redis_server.kill()  # mid-load: nothing may fail
        await load(5)
        stats = engine.statistics().cache
        assert stats is not None
        assert stats.redis is not None
        assert stats.redis.errors >= 1
        assert stats.redis.circuit in {"open", "half_open"}
        redis_server.start()  # back: after the cool-down the breaker closes by itself
        await asyncio.sleep(0.4)
        await load(2)
        await asyncio.sleep(0.2)
        hits_before = engine.statistics().cache.redis.hits  # type: ignore[union-attr]
        await load(1)
        after = engine.statistics().cache.redis  # type: ignore[union-attr]
    assert after.circuit == "closed"
    assert after.hits >= hits_before + len(inputs)


async def test_two_server_processes_share_hits_through_redis(
    mlp_path: Path, redis_server: RedisProcess
) -> None:
    from test_cli import Running

    flags = ["--name", "mlp", "--cache-size-mb", "8", "--redis-url", redis_server.url]
    first, second = Running(str(mlp_path), *flags), Running(str(mlp_path), *flags)
    try:
        x = np.random.default_rng(6).standard_normal((1, 64)).astype(np.float32)
        body = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32",
                            "data": x.ravel().tolist()}]}  # fmt: skip
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{first.url}/v2/models/mlp/infer", json=body) as r:
                computed = await r.json()
            await asyncio.sleep(0.2)  # the first server writes to Redis off the request's path
            async with http.post(f"{second.url}/v2/models/mlp/infer", json=body) as r:
                shared = await r.json()
            async with http.get(f"{second.url}/v2/models/mlp/stats") as r:
                stats = (await r.json())["model_stats"][0]
        assert shared["outputs"] == computed["outputs"]
        assert stats["request_count"] == 0  # the second server never ran the model
        assert stats["cache"]["redis"]["hits"] == 1
    finally:
        for server in (first, second):
            assert await asyncio.to_thread(server.stop) == 0
            server.kill()


async def test_http_requests_can_opt_out(start_server: StartServer, mlp_path: Path) -> None:
    server = await start_server(Engine(mlp_path, name="mlp", cache=CacheConfig(size_mb=8)))
    body = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0.5] * 64}]}
    url = f"{server.url}/v2/models/mlp/infer"
    async with aiohttp.ClientSession() as http:
        for extra, headers in [
            ({}, {}),
            ({}, {}),  # a hit
            ({"parameters": {"cache": False}}, {}),
            ({}, {"Cache-Control": "no-cache"}),
        ]:
            async with http.post(url, json={**body, **extra}, headers=headers) as r:
                assert r.status == 200
        async with http.get(f"{server.url}/v2/models/mlp/stats") as r:
            stats = (await r.json())["model_stats"][0]
    assert stats["request_count"] == 3
    assert stats["cache"]["local"]["hits"] == 1


async def test_a_leader_refused_for_its_own_deadline_does_not_refuse_its_duplicates() -> None:
    cache = ResponseCache(ByteLRU(1 << 20))
    answer = {"y": np.ones(2, np.float32)}
    started = asyncio.Event()

    async def refused() -> dict[str, np.ndarray]:  # what the queue does to a short deadline
        started.set()
        await asyncio.sleep(0.01)
        raise Overloaded("the queue's expected wait exceeds the request's deadline (1 ms)")

    async def computed() -> dict[str, np.ndarray]:
        return answer

    leader = asyncio.create_task(cache.get_or_compute(b"k", refused))
    await started.wait()
    follower = asyncio.create_task(cache.get_or_compute(b"k", computed))
    with pytest.raises(Overloaded):
        await leader
    result = await follower  # computed with its own (absent) deadline instead
    np.testing.assert_array_equal(result["y"], answer["y"])


async def test_fp16_and_fp32_replicas_never_share_answers_through_redis(
    mlp_path: Path, redis_server: RedisProcess, tmp_path: Path
) -> None:
    pytest.importorskip("onnxconverter_common", reason="--fp16 needs the gpu extra")
    x = np.random.default_rng(6).standard_normal((1, 64)).astype(np.float32)
    config = CacheConfig(size_mb=8, redis_url=redis_server.url, ttl_s=60)
    async with Engine(mlp_path, cache=config, name="mlp") as full:
        await full.infer({"input": x})
        await asyncio.sleep(0.2)  # the write to Redis happens off the request's path
    half_precision = RuntimeConfig(fp16=True, build_cache_dir=str(tmp_path))
    async with Engine(mlp_path, runtime=half_precision, cache=config, name="mlp") as half:
        await half.infer({"input": x})
        stats = half.statistics()
    assert stats.cache is not None
    assert stats.cache.redis is not None
    assert stats.cache.redis.hits == 0
    assert stats.batcher.requests == 1  # computed by the FP16 model itself
