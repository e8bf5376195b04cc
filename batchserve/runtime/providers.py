"""Execution provider chains and their option dicts: pure functions, testable without a GPU."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from batchserve.config import Device, RuntimeConfig
from batchserve.errors import DeviceUnavailable

log = logging.getLogger("batchserve.runtime")

ProviderChain = list[str | tuple[str, dict[str, str]]]

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
# Logged with the reason: "not in this onnxruntime build", or why ORT could not start it.
TRT_MISSING = "TensorRT execution provider unavailable, serving with CUDA"
# TensorRT's scratch space while it picks tactics; larger lets it consider more of them.
TRT_WORKSPACE_BYTES = 4 << 30


def check_device(device: Device, available: Sequence[str]) -> None:
    """DeviceUnavailable when the device's execution provider is not in this install."""
    if device.kind == "cuda" and CUDA not in available:
        raise DeviceUnavailable(
            f"--device {device} needs ONNX Runtime's CUDAExecutionProvider, but this install "
            f"offers {list(available)}: install onnxruntime-gpu in place of onnxruntime"
        )


def use_tensorrt(config: RuntimeConfig, available: Sequence[str]) -> bool:
    """Whether to try TensorRT first; logs the fallback when this build lacks it (call it once
    per model load). True is only a try: PyPI's onnxruntime-gpu always lists TensorRT, which
    then fails to start without the TensorRT libraries; the first session built decides."""
    if not config.trt:
        return False
    if TENSORRT in available:
        return True
    log.warning("%s: %s", TRT_MISSING, "not in this onnxruntime build")
    return False


def cuda_options(config: RuntimeConfig, stream: int | None = None) -> dict[str, str]:
    """CUDA provider options for one session; `stream` is its own CUDA stream's handle."""
    options = {
        "device_id": str(config.device.index),
        "arena_extend_strategy": "kSameAsRequested",
        "cudnn_conv_algo_search": "HEURISTIC",
    }
    if config.gpu_mem_limit_mb:
        options["gpu_mem_limit"] = str(config.gpu_mem_limit_mb * 1024 * 1024)
    if stream is not None:
        # Copies go on the session's stream too, so one session's copies overlap another's
        # compute instead of queueing on the device's default stream.
        options["do_copy_in_default_stream"] = "0"
        options["has_user_compute_stream"] = "1"
        options["user_compute_stream"] = str(stream)
    if config.cuda_graphs:
        options["enable_cuda_graph"] = "1"
    return options


def tensorrt_options(
    config: RuntimeConfig, cache_dir: Path, stream: int | None = None
) -> dict[str, str]:
    """TensorRT provider options: engines and timings cached on disk across restarts."""
    options = {
        "device_id": str(config.device.index),
        "trt_fp16_enable": str(config.fp16),
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": str(cache_dir),
        "trt_timing_cache_enable": "True",
        "trt_timing_cache_path": str(cache_dir),
        "trt_max_workspace_size": str(TRT_WORKSPACE_BYTES),
    }
    if stream is not None:
        # Only this key: the Python API rejects has_user_compute_stream for TensorRT (it sets
        # it itself from user_compute_stream).
        options["user_compute_stream"] = str(stream)
    if config.cuda_graphs:
        options["trt_cuda_graph_enable"] = "True"
    return options


def provider_chain(
    config: RuntimeConfig,
    *,
    stream: int | None = None,
    tensorrt: bool = False,
    trt_cache_dir: Path | None = None,
) -> ProviderChain:
    """Providers in priority order for one session: [TensorRT,] CUDA, CPU, or CPU alone."""
    if config.device.kind == "cpu":
        return [CPU]
    chain: ProviderChain = []
    if tensorrt:
        if trt_cache_dir is None:
            raise ValueError("TensorRT needs an engine cache directory")
        chain.append((TENSORRT, tensorrt_options(config, trt_cache_dir, stream)))
    # CPU last: ops CUDA has no kernel for still run (ORT copies around them).
    chain += [(CUDA, cuda_options(config, stream)), CPU]
    return chain
