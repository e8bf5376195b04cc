"""Triton's model configuration and statistics, as plain dicts in Triton's JSON shapes.

Protocol-neutral: the HTTP endpoints send them as they are, and the gRPC service parses them
into Triton's messages (`google.protobuf.json_format.ParseDict` into `inference.ModelConfig`
and `inference.ModelStatisticsResponse`), so both front ends answer the same figures. Triton's
tools (perf_analyzer, model analyzer) read these to size their requests and to show the
server-side breakdown of a request's time.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Final

from batchserve.errors import NotReady

if TYPE_CHECKING:  # only types: building these answers loads nothing
    from batchserve.cache import CacheStatistics
    from batchserve.engine import Engine, EngineStatistics

PLATFORM: Final = "onnxruntime_onnx"
BACKEND: Final = "onnxruntime"

# The protocol extensions the server really implements, by Triton's names: the binary tensor
# data of HTTP, the repository index and load/unload, statistics and model configuration.
# Not `schedule_policy`: of its request parameters only `timeout` is read (no priorities).
EXTENSIONS: Final = ("binary_tensor_data", "model_repository", "statistics", "model_configuration")

_NS = 1e9


def data_type(datatype: str) -> str:
    """Triton's config name of an Open Inference Protocol datatype: FP32 → TYPE_FP32, and
    BYTES → TYPE_STRING."""
    return "TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"


def model_config(engine: Engine, *, versions: Sequence[str] | None = None) -> dict[str, Any]:
    """The Triton model configuration of a loaded engine (NotReady before it loads).

    `max_batch_size` is 0 when the model has no batch dimension (then nothing is merged and
    `dims` are the whole shape); otherwise the engine's batch limit, with `dims` after the
    batch dimension. -1 marks a variable dimension. `versions`: the versions of the model
    being served (by default the engine's own), reported as Triton's `specific` policy."""
    metadata = engine.metadata
    batched = metadata.batched
    config: dict[str, Any] = {
        "name": engine.name,
        "platform": PLATFORM,
        "backend": BACKEND,
        "max_batch_size": engine.batch_config.max_batch_size if batched else 0,
        "input": [_tensor(t.name, t.datatype, t.shape, batched) for t in metadata.inputs],
        "output": [_tensor(t.name, t.datatype, t.shape, batched) for t in metadata.outputs],
        "instance_group": [_instances(engine)],
        "default_model_filename": engine.model_path.name,
        "response_cache": {"enable": engine.cache_config.enabled},
    }
    policy = _version_policy([engine.version] if versions is None else versions)
    if policy is not None:
        config["version_policy"] = policy
    if batched:  # Triton allows a batcher only for models with a batch dimension
        delay_us = round(engine.batch_config.max_latency_ms * 1000)
        config["dynamic_batching"] = {"max_queue_delay_microseconds": delay_us}
    return config


def _tensor(name: str, datatype: str, shape: tuple[int, ...], batched: bool) -> dict[str, Any]:
    dims = shape[1:] if batched else shape
    return {"name": name, "data_type": data_type(datatype), "dims": list(dims)}


def _instances(engine: Engine) -> dict[str, Any]:
    runtime = engine.runtime_config
    device = runtime.device
    group: dict[str, Any] = {"name": engine.name, "count": runtime.instances}
    if device.kind == "cuda":  # a session never falls back to the CPU unnoticed (runtime/)
        group.update(kind="KIND_GPU", gpus=[device.index])
    else:
        group["kind"] = "KIND_CPU"
    return group


def _version_policy(versions: Sequence[str]) -> dict[str, Any] | None:
    # Triton numbers versions; a named one (`canary`) has no place in its policy.
    numbered = sorted(int(v) for v in versions if v.isdigit())
    return {"specific": {"versions": numbered}} if numbered else None


def model_statistics(engines: Iterable[Engine]) -> dict[str, Any]:
    """Triton's statistics response for these engines; one that is not loaded (or no longer)
    is left out, as Triton lists only the versions it has loaded."""
    entries = []
    for engine in engines:
        try:
            entries.append(engine_statistics(engine))
        except NotReady:
            continue
    return {"model_stats": entries}


def engine_statistics(engine: Engine) -> dict[str, Any]:
    """One engine's entry of `model_statistics` (NotReady when it is not loaded)."""
    return statistics_entry(engine.name, engine.version, engine.statistics())


def statistics_entry(name: str, version: str, stats: EngineStatistics) -> dict[str, Any]:
    """Triton's `ModelStatistics` from the engine's counters, all read off the batcher's
    per-run bookkeeping (nothing here is timed per request).

    - success: requests a run answered, plus cache hits; its time is theirs from entering
      the queue to the end of the run that answered them (queue + compute_infer). Decoding
      the request and encoding the answer are the front end's and not in it.
    - fail: requests refused by the queue (full, deadline unmeetable), withdrawn from it
      (deadline passed, client gone) or failed by their run; their time is not measured (0).
    - queue: the answered requests' wait for the run that answered them; cache hits count
      with no wait, as in Triton.
    - compute_infer: the run's time (from its dispatch: the merged inputs' concatenation,
      the hop to the session's thread, ONNX Runtime, the hop back) counted for each request
      it answered. compute_input and compute_output have the same count and 0 ns: the input
      copy is inside that time, and a request's outputs are views of the run's (no copy).
    - cache_hit / cache_miss: lookups of the response cache (an identical request in flight
      counts as a hit); their time is not measured (0).
    - inference_count and execution_count: rows and runs dispatched, as `/stats` has always
      reported them; batch_stats: finished runs by rows, with their time.
    """
    batcher = stats.batcher
    hits, misses = _cache_counts(stats.cache)
    answered = batcher.answered
    run_ns = _ns(batcher.answered_run_s)
    wait_ns = _ns(batcher.answered_wait_s)
    since = batcher.since_last_run_s
    return {
        "name": name,
        "version": version,
        "last_inference": 0 if since is None else int((time.time() - since) * 1000),
        "inference_count": batcher.rows,
        "execution_count": batcher.batches,
        "inference_stats": {
            "success": _duration(answered + hits, wait_ns + run_ns),
            "fail": _duration(batcher.failed + batcher.rejected + batcher.cancelled, 0),
            "queue": _duration(answered + hits, wait_ns),
            "compute_input": _duration(answered, 0),
            "compute_infer": _duration(answered, run_ns),
            "compute_output": _duration(answered, 0),
            "cache_hit": _duration(hits, 0),
            "cache_miss": _duration(misses, 0),
        },
        "batch_stats": [
            {
                "batch_size": rows,
                "compute_input": _duration(runs, 0),
                "compute_infer": _duration(runs, _ns(seconds)),
                "compute_output": _duration(runs, 0),
            }
            for rows, (runs, seconds) in sorted(batcher.run_stats.items())
        ],
    }


def _cache_counts(cache: CacheStatistics | None) -> tuple[int, int]:
    """(hits, misses): requests answered from either tier or by an identical one in flight,
    and those that went on to compute."""
    if cache is None:
        return 0, 0
    redis = cache.redis
    redis_hits = redis.hits if redis is not None else 0
    hits = cache.local.hits + redis_hits + cache.coalesced
    if cache.local.capacity_bytes:
        # Every lookup starts in the local tier: each of its misses was then answered by an
        # identical request in flight, by Redis, or computed.
        return hits, max(0, cache.local.misses - redis_hits - cache.coalesced)
    # Redis alone: the lookups it found nothing for, or skipped while its circuit was open
    # (a failed read is not told apart from a failed write, and is left out).
    return hits, redis.misses + redis.skipped if redis is not None else 0


def _duration(count: int, ns: int) -> dict[str, int]:
    return {"count": count, "ns": ns}


def _ns(seconds: float) -> int:
    # Whole numbers: Triton's clients read these as unsigned 64-bit integers.
    return max(0, round(seconds * _NS))
