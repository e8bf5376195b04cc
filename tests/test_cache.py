"""The response cache: keys, the byte-bounded LRU, the codec, the breaker, and real Redis."""

from __future__ import annotations

import asyncio
import gc
import tracemalloc
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
import redis

from batchserve import BatchConfig, CacheConfig, Engine, RuntimeConfig
from batchserve.cache import cache_key, codec
from batchserve.cache.breaker import CircuitBreaker, CircuitState
from batchserve.cache.lru import ByteLRU
from batchserve.cache.tiered import ResponseCache
from batchserve.errors import Overloaded
from batchserve.testing import FakeClock

from helpers import RedisProcess, StartServer, StartServerProcess, wait_until
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


def test_keys_tell_str_from_bytes_and_where_strings_end() -> None:
    def key(*values: Any, dtype: Any = object) -> bytes:
        return cache_key("m", "1", {"text": np.array(values, dtype=dtype)})

    keys = [
        key("a"),
        key(b"a"),
        key("ab", "c"),
        key("a", "bc"),
        key("abc", ""),
        key("a", "b", "c"),
        key("ab", "c", dtype="U2"),
        key("a", "bc", dtype="U2"),
        key(b"ab", b"c", dtype="S2"),
        key(b"a", b"bc", dtype="S2"),
        key("a", dtype="U1"),
        key(b"a", dtype="S1"),
    ]
    assert len(set(keys)) == len(keys)
    assert key("ab", "c") == key(*["ab", "c"])
    with pytest.raises(ValueError, match="only str and bytes"):
        key(1, "a")


# -- local tier ---------------------------------------------------------------------------------


def test_lru_is_bounded_by_bytes_and_evicts_least_recent() -> None:
    values = [codec.dumps({"y": np.full(100, i, np.float32)}) for i in range(4)]
    keys = [bytes([i]) * 32 for i in range(4)]
    probe = ByteLRU(1 << 20)
    for key, value in zip(keys[:3], values, strict=False):
        probe.put(key, value)
    lru = ByteLRU(capacity_bytes=probe.statistics().bytes)  # exactly three entries
    for key, value in zip(keys[:3], values, strict=False):
        lru.put(key, value)
    assert lru.get(keys[0]) is not None  # 0 is now the most recent
    lru.put(keys[3], values[3])
    assert lru.get(keys[1]) is None  # the least recent went first
    assert lru.get(keys[0]) == values[0]
    stats = lru.statistics()
    assert stats.evictions == 1
    assert stats.bytes <= stats.capacity_bytes
    big = codec.dumps({"y": np.zeros(10_000, np.float32)})  # larger than the whole cache
    lru.put(b"big" * 11, big)
    assert lru.get(b"big" * 11) is None


@pytest.mark.slow
def test_the_local_tier_holds_no_more_memory_than_its_size() -> None:
    # Many tiny distinct answers, as one-row requests to a small classifier make: per-entry
    # overhead, not array bytes, is what fills the memory. Measured as what dropping the
    # cache frees, so nothing else the test allocates is counted.
    capacity = 2 << 20

    async def fill() -> ResponseCache:
        cache = ResponseCache(ByteLRU(capacity))
        for i in range(30_000):
            key = cache_key("mlp", "1", {"input": np.array([[i]], np.int64)})

            async def compute(i: int = i) -> dict[str, np.ndarray]:
                return {"probabilities": np.full((1, 10), i, np.float32)}

            await cache.get_or_compute(key, compute)
        return cache

    tracemalloc.start()
    try:
        cache = asyncio.run(fill())
        gc.collect()
        held = tracemalloc.get_traced_memory()[0]
        stats = cache.statistics().local
        del cache
        gc.collect()
        held -= tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert stats.evictions > 0  # it filled up
    assert stats.bytes <= capacity
    assert held <= 1.25 * capacity, f"{held / capacity:.2f}x the configured size"
    assert stats.bytes >= 0.75 * held  # and what it reports is what it holds


async def test_hits_are_new_writable_arrays_and_never_change_the_entry() -> None:
    cache = ResponseCache(ByteLRU(1 << 20))
    source = np.ones(4, np.float32)

    async def compute() -> dict[str, np.ndarray]:
        return {"y": source}

    first = await cache.get_or_compute(b"k", compute)
    source[:] = 7  # the computing caller writes to its answer: the entry must not change
    hits = [cache.local_hit(b"k") for _ in range(2)]
    assert hits[0] is not None
    assert hits[1] is not None
    hits[0]["y"][:] = 9  # so does a caller of a hit
    assert first["y"] is source
    np.testing.assert_array_equal(hits[1]["y"], np.ones(4, np.float32))
    assert hits[1]["y"].flags.writeable
    assert not np.shares_memory(hits[0]["y"], hits[1]["y"])
    np.testing.assert_array_equal(cache.local_hit(b"k")["y"], np.ones(4, np.float32))  # type: ignore[index]


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


async def test_coalesced_callers_get_arrays_of_their_own(echo_path: Path) -> None:
    inputs = echo_inputs(7)
    async with Engine(echo_path, cache=CacheConfig(size_mb=8)) as engine:
        first, second = await asyncio.gather(engine.infer(inputs), engine.infer(inputs))
        stats = engine.statistics()
        assert stats.batcher.requests == 1
        assert stats.cache is not None
        assert stats.cache.coalesced == 1  # the second waited for the first's computation
        expected = {name: array.copy() for name, array in first.items()}
        for name in first:
            assert first[name].flags.writeable, name
            assert second[name].flags.writeable, name
            assert not np.shares_memory(first[name], second[name]), name
            first[name][...] = first[name][0, 0]  # one caller writes to its answer
            assert second[name].tolist() == expected[name].tolist(), name
        hit = await engine.infer(inputs)
        assert engine.statistics().cache.local.hits == 1  # type: ignore[union-attr]
    for name in hit:
        assert hit[name].flags.writeable, name
        assert hit[name].tolist() == expected[name].tolist(), name


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


def redis_writes(engine: Engine) -> int:
    stats = engine.statistics().cache
    assert stats is not None
    assert stats.redis is not None
    return stats.redis.writes


# -- Redis --------------------------------------------------------------------------------------


async def test_a_second_engine_gets_hits_the_first_computed(
    mlp_path: Path, redis_server: RedisProcess
) -> None:
    x = np.random.default_rng(4).standard_normal((2, 64)).astype(np.float32)
    # A generous call timeout: on a busy machine a 50 ms one could turn the hit into a miss.
    config = CacheConfig(size_mb=8, redis_url=redis_server.url, ttl_s=60, redis_timeout_ms=5000)
    async with Engine(mlp_path, cache=config, name="mlp") as first:
        computed = await first.infer({"input": x})
        # The write to Redis happens off the request's path: wait for it, however long.
        await wait_until(lambda: redis_writes(first) >= 1, "the write to Redis")
    async with Engine(mlp_path, cache=config, name="mlp") as second:
        shared = await second.infer({"input": x})
        stats = second.statistics()
    assert stats.batcher.requests == 0
    assert stats.cache is not None
    assert stats.cache.redis is not None
    assert stats.cache.redis.hits == 1
    np.testing.assert_array_equal(shared["probabilities"], computed["probabilities"])


async def test_redis_hits_are_text_and_arrays_of_their_own(
    echo_path: Path, redis_server: RedisProcess
) -> None:
    config = CacheConfig(size_mb=0, redis_url=redis_server.url, ttl_s=60, redis_timeout_ms=5000)
    as_bytes = echo_inputs(8)
    text = as_bytes["x_BYTES"]
    as_bytes["x_BYTES"] = np.array([[v.encode() for v in text.flat]], dtype=object)
    async with Engine(echo_path, cache=config, name="echo") as first:
        computed = await first.infer(as_bytes)
        # The write to Redis happens off the request's path: wait for it, however long.
        await wait_until(lambda: redis_writes(first) >= 1, "the write to Redis")
    assert computed["y_BYTES"].tolist() == text.tolist()
    as_text = {**as_bytes, "x_BYTES": text}
    async with Engine(echo_path, cache=config, name="echo") as second:
        one, two = await asyncio.gather(second.infer(as_text), second.infer(as_text))
        stats = second.statistics()
    assert stats.batcher.requests == 0
    assert stats.cache is not None
    assert stats.cache.redis is not None
    assert (stats.cache.redis.hits, stats.cache.coalesced) == (1, 1)
    for name in computed:
        assert one[name].tolist() == two[name].tolist() == computed[name].tolist(), name
        assert one[name].flags.writeable, name
        assert not np.shares_memory(one[name], two[name]), name


async def test_entries_expire_after_their_ttl(mlp_path: Path, redis_server: RedisProcess) -> None:
    """Entries are written with the TTL (Redis holds the clock: asked, not timed here), and
    once Redis has dropped one the answer is computed again."""
    x = np.ones((1, 64), np.float32)
    config = CacheConfig(size_mb=0, redis_url=redis_server.url, ttl_s=0.3, redis_timeout_ms=5000)
    client = redis.Redis.from_url(redis_server.url)
    try:
        async with Engine(mlp_path, cache=config) as engine:
            await engine.infer({"input": x})
            await wait_until(lambda: redis_writes(engine) >= 1, "the write to Redis")
            keys = client.keys("*")
            assert len(keys) == 1
            # set with a 300 ms expiry, or already expired on a busy machine (-2: gone)
            assert client.pttl(keys[0]) in {-2, *range(1, 301)}
            await wait_until(lambda: client.exists(keys[0]) == 0, "Redis to expire the entry")
            await engine.infer({"input": x})
            assert engine.statistics().batcher.requests == 2  # expired, computed again
    finally:
        client.close()


async def test_redis_outage_degrades_to_local_tier_and_recovers(
    mlp_path: Path, redis_server: RedisProcess
) -> None:
    config = CacheConfig(
        # Killed, Redis refuses connections at once: the outage needs no short call timeout,
        # and a generous one keeps a busy machine's slow answers from reopening the breaker.
        size_mb=0, redis_url=redis_server.url, ttl_s=60, redis_timeout_ms=5000,
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

        def redis_stats() -> Any:
            return engine.statistics().cache.redis  # type: ignore[union-attr]

        await wait_until(lambda: redis_stats().circuit != "open", "the breaker's cool-down")

        # Loads close the breaker (its probe succeeds) and write the answers back to Redis
        # off their path; served again, every one is a Redis hit. Polled: no event says
        # when the background writes have landed.
        async def all_redis_hits() -> bool:
            hits_before = redis_stats().hits
            await load(1)
            after = redis_stats()
            return bool(after.circuit == "closed" and after.hits == hits_before + len(inputs))

        await wait_until(all_redis_hits, "every input served from Redis again")


@pytest.mark.slow
async def test_two_server_processes_share_hits_through_redis(
    mlp_path: Path, redis_server: RedisProcess, serve_process: StartServerProcess
) -> None:
    flags = ["--name", "mlp", "--cache-size-mb", "8", "--redis-url", redis_server.url,
             "--redis-timeout-ms", "5000"]  # fmt: skip
    first, second = serve_process(str(mlp_path), *flags), serve_process(str(mlp_path), *flags)
    try:
        x = np.random.default_rng(6).standard_normal((1, 64)).astype(np.float32)
        body = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32",
                            "data": x.ravel().tolist()}]}  # fmt: skip
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{first.url}/v2/models/mlp/infer", json=body) as r:
                computed = await r.json()

            # The first server writes to Redis off the request's path: poll its statistics.
            async def written() -> int:
                async with http.get(f"{first.url}/v2/models/mlp/stats") as r:
                    return int((await r.json())["model_stats"][0]["cache"]["redis"]["writes"])

            await wait_until(written, "the first server's write to Redis")
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
    started, refuse = asyncio.Event(), asyncio.Event()

    async def refused() -> dict[str, np.ndarray]:  # what the queue does to a short deadline
        started.set()
        await refuse.wait()
        raise Overloaded("the queue's expected wait exceeds the request's deadline (1 ms)")

    async def computed() -> dict[str, np.ndarray]:
        return answer

    leader = asyncio.create_task(cache.get_or_compute(b"k", refused))
    await started.wait()
    follower = asyncio.create_task(cache.get_or_compute(b"k", computed))
    await wait_until(lambda: cache.statistics().coalesced == 1, "the duplicate to wait")
    refuse.set()  # the leader is refused only once its duplicate waits for it
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
        await wait_until(lambda: redis_writes(full) >= 1, "the write to Redis")
    half_precision = RuntimeConfig(fp16=True, build_cache_dir=str(tmp_path))
    async with Engine(mlp_path, runtime=half_precision, cache=config, name="mlp") as half:
        await half.infer({"input": x})
        stats = half.statistics()
    assert stats.cache is not None
    assert stats.cache.redis is not None
    assert stats.cache.redis.hits == 0
    assert stats.batcher.requests == 1  # computed by the FP16 model itself
