"""Triton's model configuration and statistics: what tritonclient and perf_analyzer read, over
a real server, and parsed into Triton's own protobuf messages."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
import tritonclient.http as httpclient
from google.protobuf.json_format import ParseDict
from tritonclient.grpc import model_config_pb2, service_pb2
from tritonclient.utils import InferenceServerException

from batchserve import BatchConfig, CacheConfig, Engine, RuntimeConfig
from batchserve.cache import CacheStatistics
from batchserve.cache.lru import LRUStatistics
from batchserve.cache.redis_tier import RedisStatistics
from batchserve.engine import EngineStatistics
from batchserve.protocol.triton import model_config, model_statistics, statistics_entry
from batchserve.queue import BatcherStatistics
from batchserve.runtime import PoolStatistics

from helpers import StartServer
from models import ECHO_TYPES

EXTENSIONS = {"binary_tensor_data", "model_repository", "statistics", "model_configuration"}


def client(url: str) -> httpclient.InferenceServerClient:
    return httpclient.InferenceServerClient(url=url.removeprefix("http://"))


def read_config(url: str, model: str, version: str = "") -> Any:
    triton = client(url)
    try:
        return triton.get_model_config(model, version)
    finally:
        triton.close()


def infer_and_read_statistics(url: str, rows: list[int]) -> tuple[Any, Any]:
    """Infer with each row count in turn (sync: each answered before the next), then read
    the statistics of the model and of every model."""
    triton = client(url)
    try:
        for i, count in enumerate(rows):
            x = np.random.default_rng(i).standard_normal((count, 64)).astype(np.float32)
            tensor = httpclient.InferInput("input", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x)
            triton.infer("mlp", [tensor])
        return triton.get_inference_statistics("mlp"), triton.get_inference_statistics()
    finally:
        triton.close()


def ints(tree: Any) -> list[Any]:
    """Every number of a JSON tree, to check they are whole (Triton's clients read uint64)."""
    if isinstance(tree, dict):
        return [n for value in tree.values() for n in ints(value)]
    if isinstance(tree, list):
        return [n for value in tree for n in ints(value)]
    return [tree] if isinstance(tree, int | float) else []


async def test_the_config_of_a_batched_model(start_server: StartServer, mlp_path: Path) -> None:
    engine = Engine(
        mlp_path,
        BatchConfig(max_batch_size=16, max_latency_ms=3.0),
        RuntimeConfig(instances=2),
        name="mlp",
    )
    server = await start_server(engine)
    config = await asyncio.to_thread(read_config, server.url, "mlp")
    assert config["name"] == "mlp"
    assert (config["platform"], config["backend"]) == ("onnxruntime_onnx", "onnxruntime")
    assert config["max_batch_size"] == 16
    assert config["input"] == [{"name": "input", "data_type": "TYPE_FP32", "dims": [64]}]
    assert config["output"] == [{"name": "probabilities", "data_type": "TYPE_FP32", "dims": [10]}]
    assert config["dynamic_batching"] == {"max_queue_delay_microseconds": 3000}
    assert config["instance_group"] == [{"name": "mlp", "count": 2, "kind": "KIND_CPU"}]
    assert config["version_policy"] == {"specific": {"versions": [1]}}
    assert config["response_cache"] == {"enable": False}
    assert await asyncio.to_thread(read_config, server.url, "mlp", "1") == config

    parsed = ParseDict(config, model_config_pb2.ModelConfig())
    assert parsed.max_batch_size == 16
    assert parsed.input[0].data_type == model_config_pb2.TYPE_FP32
    assert list(parsed.input[0].dims) == [64]
    assert parsed.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    assert parsed.dynamic_batching.max_queue_delay_microseconds == 3000
    wrapped = ParseDict({"config": config}, service_pb2.ModelConfigResponse())
    assert wrapped.config.name == "mlp"


async def test_the_config_of_models_without_batching(
    start_server: StartServer, fixed_path: Path, variable_path: Path
) -> None:
    server = await start_server(
        Engine(fixed_path, name="fixed"),
        Engine(variable_path, name="variable", cache=CacheConfig(size_mb=1)),
    )
    fixed = await asyncio.to_thread(read_config, server.url, "fixed")
    assert fixed["max_batch_size"] == 0  # no batch dimension: every request is its own run
    assert fixed["input"] == [{"name": "x", "data_type": "TYPE_FP32", "dims": [2, 4]}]
    assert fixed["output"] == [{"name": "y", "data_type": "TYPE_FP32", "dims": [2, 4]}]
    assert "dynamic_batching" not in fixed
    ParseDict(fixed, model_config_pb2.ModelConfig())

    variable = await asyncio.to_thread(read_config, server.url, "variable")
    assert variable["max_batch_size"] == 64
    assert variable["input"] == [{"name": "x", "data_type": "TYPE_FP32", "dims": [-1]}]
    assert variable["response_cache"] == {"enable": True}


async def test_every_datatype_has_its_triton_name(
    start_server: StartServer, echo_path: Path
) -> None:
    server = await start_server(Engine(echo_path, name="echo"))
    config = await asyncio.to_thread(read_config, server.url, "echo")
    types = {t["name"]: t["data_type"] for t in config["input"]}
    expected = {f"x_{name}": f"TYPE_{name}" for name in ECHO_TYPES}
    assert types == {**expected, "x_BYTES": "TYPE_STRING"}
    assert all(t["dims"] == [2] for t in config["input"] + config["output"])
    ParseDict(config, model_config_pb2.ModelConfig())


async def test_unknown_models_and_versions_are_404(
    start_server: StartServer, mlp_path: Path, http: aiohttp.ClientSession
) -> None:
    server = await start_server(Engine(mlp_path, name="mlp"))
    for path in ("nope/config", "mlp/versions/2/config", "nope/stats", "mlp/versions/2/stats"):
        async with http.get(f"{server.url}/v2/models/{path}") as r:
            assert r.status == 404, path
            assert "error" in await r.json()
    with pytest.raises(InferenceServerException, match="unknown model"):
        await asyncio.to_thread(read_config, server.url, "nope")


async def test_config_and_statistics_need_the_api_key(
    start_server: StartServer, mlp_path: Path, http: aiohttp.ClientSession
) -> None:
    server = await start_server(Engine(mlp_path, name="mlp"), api_key="k")
    for path in ("/v2/models/mlp/config", "/v2/models/mlp/stats", "/v2/models/stats"):
        async with http.get(server.url + path) as r:
            assert r.status == 401, path
        async with http.get(server.url + path, headers={"Authorization": "Bearer k"}) as r:
            assert r.status == 200, path


async def test_server_metadata_lists_the_extensions_implemented(
    start_server: StartServer, mlp_path: Path
) -> None:
    server = await start_server(Engine(mlp_path, name="mlp"))

    def metadata() -> Any:
        triton = client(server.url)
        try:
            return triton.get_server_metadata()
        finally:
            triton.close()

    assert set((await asyncio.to_thread(metadata))["extensions"]) == EXTENSIONS


async def test_statistics_count_every_request_and_its_time(
    start_server: StartServer, mlp_path: Path, fixed_path: Path
) -> None:
    engine = Engine(mlp_path, name="mlp")
    server = await start_server(engine, Engine(fixed_path, name="fixed"))
    rows = [1, 3, 2, 5, 1, 4, 2]
    before_ms = int(time.time() * 1000)  # last_inference is whole milliseconds
    mine, everyone = await asyncio.to_thread(infer_and_read_statistics, server.url, rows)
    (entry,) = mine["model_stats"]
    assert (entry["name"], entry["version"]) == ("mlp", "1")  # perf_analyzer reads a string
    stats = entry["inference_stats"]
    sent = len(rows)
    for part in ("success", "queue", "compute_input", "compute_infer", "compute_output"):
        assert stats[part]["count"] == sent, part
    assert stats["fail"]["count"] == 0
    assert stats["cache_hit"] == stats["cache_miss"] == {"count": 0, "ns": 0}
    assert stats["compute_infer"]["ns"] > 0
    assert stats["success"]["ns"] == stats["queue"]["ns"] + stats["compute_infer"]["ns"]
    # One at a time: each request ran alone, one run of its own rows.
    assert entry["inference_count"] == sum(rows)
    assert entry["execution_count"] == sent
    by_size = {b["batch_size"]: b for b in entry["batch_stats"]}
    assert {size: b["compute_infer"]["count"] for size, b in by_size.items()} == {
        size: rows.count(size) for size in set(rows)
    }
    assert all(b["compute_infer"]["ns"] > 0 for b in by_size.values())
    assert all(b["execution_count"] == b["compute_infer"]["count"] for b in by_size.values())
    assert before_ms <= entry["last_inference"] <= time.time() * 1000
    assert all(type(n) is int for n in ints(stats)), "perf_analyzer reads unsigned integers"
    assert entry["request_count"] == sent  # batchserve's own counters are still there

    assert {e["name"] for e in everyone["model_stats"]} == {"mlp", "fixed"}
    fixed = next(e for e in everyone["model_stats"] if e["name"] == "fixed")
    assert fixed["last_inference"] == 0  # never ran (no warm-up run counts: none yet)
    ParseDict(mine, service_pb2.ModelStatisticsResponse(), ignore_unknown_fields=True)

    # The protocol-neutral answer (the gRPC service's) parses strictly, unknown fields refused.
    neutral = model_statistics([engine])
    parsed = ParseDict(neutral, service_pb2.ModelStatisticsResponse())
    assert parsed.model_stats[0].inference_stats.success.count == sent
    assert parsed.model_stats[0].version == "1"
    ParseDict(model_config(engine), model_config_pb2.ModelConfig())


async def test_cache_hits_are_successes_without_a_run(
    start_server: StartServer, mlp_path: Path, http: aiohttp.ClientSession
) -> None:
    server = await start_server(Engine(mlp_path, name="mlp", cache=CacheConfig(size_mb=1)))
    x = np.ones((2, 64), np.float32)
    body = {"inputs": [{"name": "input", "shape": [2, 64], "datatype": "FP32",
                        "data": x.ravel().tolist()}]}  # fmt: skip
    for _ in range(3):  # a miss, then two hits
        async with http.post(f"{server.url}/v2/models/mlp/infer", json=body) as r:
            assert r.status == 200
    async with http.get(f"{server.url}/v2/models/mlp/stats") as r:
        stats = (await r.json())["model_stats"][0]["inference_stats"]
    assert stats["cache_hit"]["count"] == 2
    assert stats["cache_miss"]["count"] == 1
    assert stats["success"]["count"] == stats["queue"]["count"] == 3
    assert stats["compute_infer"]["count"] == 1


def test_statistics_from_the_counters() -> None:
    """The figures derived from the batcher's and the cache's counters, one by one."""
    batcher = BatcherStatistics(
        requests=12, rows=40, batches=5, rejected=1, cancelled=2, failed=3,
        answered=6, answered_wait_s=0.25, answered_run_s=1.5,
        run_stats={8: (4, 1.0), 2: (1, 0.125)}, since_last_run_s=2.0,
    )  # fmt: skip
    cache = CacheStatistics(
        LRUStatistics(hits=4, misses=9, capacity_bytes=1 << 20),
        RedisStatistics(hits=2, misses=5),
        coalesced=1,
    )
    stats = EngineStatistics(batcher, PoolStatistics(1, 1, 5, 0), 0.5, cache)
    entry = statistics_entry("m", "3", stats)
    inference = entry["inference_stats"]
    assert inference["success"] == {"count": 6 + 7, "ns": 1_750_000_000}
    assert inference["queue"] == {"count": 13, "ns": 250_000_000}
    assert inference["compute_infer"] == {"count": 6, "ns": 1_500_000_000}
    assert inference["compute_input"] == inference["compute_output"] == {"count": 6, "ns": 0}
    assert inference["fail"] == {"count": 6, "ns": 0}
    assert inference["cache_hit"] == {"count": 7, "ns": 0}  # local, Redis, in flight
    assert inference["cache_miss"] == {"count": 9 - 2 - 1, "ns": 0}
    assert [b["batch_size"] for b in entry["batch_stats"]] == [2, 8]
    assert entry["batch_stats"][1]["compute_infer"] == {"count": 4, "ns": 1_000_000_000}
    assert abs(entry["last_inference"] - (time.time() - 2.0) * 1000) < 1000
    ParseDict({"model_stats": [entry]}, service_pb2.ModelStatisticsResponse())

    redis_only = CacheStatistics(LRUStatistics(), RedisStatistics(hits=2, misses=5, skipped=1), 0)
    entry = statistics_entry("m", "3", EngineStatistics(batcher, stats.pool, 0.5, redis_only))
    assert entry["inference_stats"]["cache_miss"]["count"] == 6
