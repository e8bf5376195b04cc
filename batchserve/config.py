"""Frozen, validated configuration for every part; only the CLI reads flags and environment."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal
from urllib.parse import parse_qs, urlsplit

if TYPE_CHECKING:
    # Only the type: the runtime package loads ONNX Runtime, which config must not.
    from batchserve.queue.priority import PriorityConfig
    from batchserve.runtime.input_prefix import InputFormat


def _positive(name: str, value: float) -> None:
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")


def _non_negative(name: str, value: float) -> None:
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


def _unique_inputs(formats: tuple[InputFormat, ...]) -> None:
    names = [spec.name for spec in formats]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise ValueError(f"input format given more than once for {twice}")


def _check_redis_url(url: str | None) -> None:
    """Refuse at start what would fail every Redis call later: a scheme redis-py does not
    know, or TLS options (`ssl_ca_certs=...`) on a URL without TLS. The messages never quote
    the URL, which may hold a password."""
    if not url:
        return
    parts = urlsplit(url)
    if parts.scheme not in {"redis", "rediss", "unix"}:
        raise ValueError(
            f"redis_url must start with redis://, rediss:// or unix://, not {parts.scheme}:"
        )
    tls_options = sorted(name for name in parse_qs(parts.query) if name.startswith("ssl_"))
    if tls_options and parts.scheme != "rediss":
        raise ValueError(f"redis_url: {', '.join(tls_options)} needs rediss:// (TLS)")


@dataclass(frozen=True, slots=True)
class BatchConfig:
    """How requests are merged into ONNX Runtime runs.

    max_batch_size: most rows (along the batch dimension) in one run.
    max_latency_ms: longest a request is held back waiting for company while a session is free;
        it never delays a request when the whole pool is idle (see docs/batching.md).
    max_queue_rows: rows allowed to wait; past it new requests are rejected (429).
    max_shape_groups: distinct input shapes (non-batch dimensions) allowed to wait at once;
        a request that would open one more is rejected (429).
    priority: the model's priority levels and their queue policies (a model's config.toml
        `[priority]`; docs/batching.md); None: one queue, first come first served.
    """

    max_batch_size: int = 64
    max_latency_ms: float = 2.0
    max_queue_rows: int = 8192
    max_shape_groups: int = 1024
    priority: PriorityConfig | None = None

    def __post_init__(self) -> None:
        _positive("max_batch_size", self.max_batch_size)
        _non_negative("max_latency_ms", self.max_latency_ms)
        _positive("max_queue_rows", self.max_queue_rows)
        _positive("max_shape_groups", self.max_shape_groups)

    @property
    def max_latency_s(self) -> float:
        return self.max_latency_ms / 1000.0


@dataclass(frozen=True, slots=True)
class Device:
    """An execution device: `cpu` or `cuda` with a device index."""

    kind: Literal["cpu", "cuda"] = "cpu"
    index: int = 0

    @classmethod
    def parse(cls, text: str) -> Device:
        kind, _, index = text.strip().lower().partition(":")
        if kind == "cpu" and not index:
            return cls("cpu", 0)
        if kind == "cuda":
            if not index:
                return cls("cuda", 0)
            if index.isdigit():
                return cls("cuda", int(index))
        raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {text!r}")

    def __str__(self) -> str:
        return "cpu" if self.kind == "cpu" else f"cuda:{self.index}"


SPIN_MODEL_BYTES = 8 * 1024 * 1024


def available_cpus(cgroup_root: str = "/sys/fs/cgroup") -> int:
    """The CPUs this process may really use: its affinity mask, capped by a cgroup v2 CPU
    quota (a Kubernetes CPU limit). os.cpu_count() reports the whole node, and sizing thread
    pools by it in a 2-CPU pod on a 64-core node means 64 threads throttled by the quota."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    try:
        with open(os.path.join(cgroup_root, "cpu.max")) as file:
            quota, period = file.read().split()[:2]
    except (OSError, ValueError):
        return max(1, cpus)
    if quota != "max" and int(period) > 0:
        cpus = min(cpus, max(1, -(-int(quota) // int(period))))  # a 1.5-CPU limit: 2 threads
    return max(1, cpus)


@dataclass(frozen=True, slots=True)
class RuntimeConfig:
    """The ONNX Runtime session pool.

    instances: sessions in the pool; each runs in its own thread (and, on CUDA, its own stream).
    intra_op_threads: threads per session for one operator; 0 picks cores // instances on CPU
        and 1 on CUDA.
    spin: let ORT's intra-op threads spin between operators. None (auto) turns it on for models
        larger than SPIN_MODEL_BYTES: those are compute-bound, and spinning keeps the threads hot
        between their many operators (resnet50 on 2 cores: about 0.89 → 1.0 of raw ORT); for
        small models it stays off, since spinning threads would steal the event loop's core.
    warmup: run each session once on generated inputs before reporting ready.
    replace_after_failures: a session whose runs fail this many times in a row is rebuilt
        (0 = never), unless it still computes inputs it computed before (then the inputs were
        at fault; see HealthPolicy).
    stall_timeout_s: a single run going on longer than this is a wedged engine: the liveness
        probe fails so the orchestrator restarts the process (0 = never).
    io_binding: run through ONNX Runtime's I/O binding with reused output buffers. None (auto)
        turns it on for CUDA only: on CPU a plain run measured faster (docs/gpu.md).
    trt: put the TensorRT execution provider before CUDA (CUDA only; falls back to CUDA with a
        warning when this onnxruntime build has no TensorRT).
    fp16: half precision. With trt, TensorRT's own FP16 mode; otherwise the model is converted
        once with onnxconverter-common (inputs and outputs stay FP32) and the result cached.
    trt_cache_dir: TensorRT engine and timing caches, so a restart does not rebuild engines
        (None: `trt` under build_cache_dir).
    build_cache_dir: converted FP16 models and, by default, TensorRT engines
        (None: $XDG_CACHE_HOME/batchserve, else ~/.cache/batchserve).
    cuda_graphs: capture a CUDA graph per power-of-two batch bucket and replay it; inputs are
        padded up to their bucket (CUDA only, needs I/O binding and fixed shapes but the batch).
    gpu_mem_limit_mb: cap on each session's CUDA memory arena (0 = no cap; CUDA only).
    input_formats: FP32 inputs that clients send as UINT8 or FP16 instead, cast and normalised
        by nodes added in front of the model's graph (runtime/input_prefix.py; cached under
        build_cache_dir).
    """

    instances: int = 1
    intra_op_threads: int = 0
    device: Device = field(default_factory=Device)
    spin: bool | None = None
    warmup: bool = True
    replace_after_failures: int = 5
    stall_timeout_s: float = 120.0
    io_binding: bool | None = None
    trt: bool = False
    fp16: bool = False
    trt_cache_dir: str | None = None
    build_cache_dir: str | None = None
    cuda_graphs: bool = False
    gpu_mem_limit_mb: int = 0
    input_formats: tuple[InputFormat, ...] = ()

    def __post_init__(self) -> None:
        _positive("instances", self.instances)
        _unique_inputs(self.input_formats)
        _non_negative("intra_op_threads", self.intra_op_threads)
        _non_negative("replace_after_failures", self.replace_after_failures)
        _non_negative("stall_timeout_s", self.stall_timeout_s)
        _non_negative("gpu_mem_limit_mb", self.gpu_mem_limit_mb)
        if self.device.kind != "cuda":
            for name, value in (
                ("trt", self.trt),
                ("cuda_graphs", self.cuda_graphs),
                ("gpu_mem_limit_mb", self.gpu_mem_limit_mb),
            ):
                if value:
                    raise ValueError(
                        f"{name} needs a CUDA device (--device cuda[:N]), got {self.device}"
                    )
        if self.cuda_graphs and self.io_binding is False:
            raise ValueError("cuda_graphs needs I/O binding: replayed graphs read fixed buffers")

    def resolved_spin(self, model_bytes: int) -> bool:
        return self.spin if self.spin is not None else model_bytes > SPIN_MODEL_BYTES

    def resolved_io_binding(self) -> bool:
        if self.io_binding is not None:
            return self.io_binding
        return self.device.kind == "cuda"

    def resolved_intra_op_threads(self) -> int:
        if self.intra_op_threads:
            return self.intra_op_threads
        if self.device.kind == "cuda":
            return 1
        return max(1, available_cpus() // self.instances)


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """The response cache (see docs/caching.md).

    size_mb: in-process LRU size in MiB of cached outputs (0 = no local tier).
    redis_url: shared tier, e.g. redis://host:6379/0, or rediss://:KEY@host:10000/0 over TLS
        (`?ssl_ca_certs=FILE` for a private CA) (None = no Redis).
    ttl_s: lifetime of Redis entries.
    redis_timeout_ms: a Redis call slower than this is a miss.
    redis_retry_after_s: how long the circuit stays open after repeated Redis failures.
    cacheable: False for models whose outputs are not a pure function of their inputs.
    """

    size_mb: float = 0.0
    redis_url: str | None = None
    ttl_s: float = 300.0
    redis_timeout_ms: float = 50.0
    redis_retry_after_s: float = 5.0
    cacheable: bool = True

    def __post_init__(self) -> None:
        _non_negative("size_mb", self.size_mb)
        _positive("ttl_s", self.ttl_s)
        _positive("redis_timeout_ms", self.redis_timeout_ms)
        _positive("redis_retry_after_s", self.redis_retry_after_s)
        _check_redis_url(self.redis_url)

    @property
    def enabled(self) -> bool:
        return self.cacheable and (self.size_mb > 0 or bool(self.redis_url))


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """The front ends: HTTP on `port`, gRPC on `grpc_port` (0: a free port the server reports;
    None: no gRPC), both on `host`."""

    host: str = "127.0.0.1"
    port: int = 8000
    grpc_port: int | None = 8001
    max_body_bytes: int = 64 * 1024 * 1024
    shutdown_grace_s: float = 30.0
    max_json_bytes: int = 16 * 1024 * 1024  # the JSON part of a request (binary tensors aside)
    access_log: bool = False  # one JSON line per request on the batchserve.access logger
    api_key: str | None = None  # bearer token required on every endpoint but health (and metrics)
    metrics_public: bool = True  # /metrics without the API key
    request_timeout_ms: float = 0.0  # default per-request deadline; 0 = none
    body_timeout_s: float = 30.0  # a client slower than this to send its body gets 408
    header_timeout_s: float = 30.0  # a connection slower than this over its headers: 408
    keepalive_timeout_s: float = 75.0  # an idle connection between requests is closed
    max_connections: int = 0  # past it new connections get 503 (0: from RLIMIT_NOFILE)
    max_active_requests: int = 128  # past it new requests wait unread, oldest first (0: no cap)
    max_inputs: int = 64  # input tensors per request
    max_tensor_elements: int = 1 << 24  # elements per input tensor (413 above)
    # A response body over this is refused (413): before the model runs when the outputs'
    # declared shapes tell their size, else while it is built (never much past the limit).
    max_response_bytes: int = 64 * 1024 * 1024
    max_loop_lag_ms: float = 50.0  # event loop this late: shed new requests (0 = never)
    reuse_port: bool = False  # share the port with other workers (SO_REUSEPORT, --workers)
    extra_port: int | None = None  # also listen here (a worker's own metrics port)

    @property
    def request_timeout_s(self) -> float | None:
        return self.request_timeout_ms / 1000.0 if self.request_timeout_ms > 0 else None

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if self.grpc_port is not None and not 0 <= self.grpc_port <= 65535:
            raise ValueError(f"grpc_port must be in 0..65535 or None, got {self.grpc_port}")
        _positive("max_body_bytes", self.max_body_bytes)
        _positive("max_json_bytes", self.max_json_bytes)
        _non_negative("shutdown_grace_s", self.shutdown_grace_s)
        _non_negative("request_timeout_ms", self.request_timeout_ms)
        _positive("body_timeout_s", self.body_timeout_s)
        _positive("header_timeout_s", self.header_timeout_s)
        _positive("keepalive_timeout_s", self.keepalive_timeout_s)
        _non_negative("max_connections", self.max_connections)
        _non_negative("max_active_requests", self.max_active_requests)
        _positive("max_inputs", self.max_inputs)
        _positive("max_tensor_elements", self.max_tensor_elements)
        _positive("max_response_bytes", self.max_response_bytes)
        _non_negative("max_loop_lag_ms", self.max_loop_lag_ms)
