"""Building ONNX Runtime sessions: providers, threading and the checks that give clear errors."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from batchserve.config import Device, RuntimeConfig
from batchserve.errors import DeviceUnavailable, ModelLoadError
from batchserve.runtime.metadata import ModelMetadata, TensorSpec

log = logging.getLogger("batchserve.runtime")

ProviderChain = list[str | tuple[str, dict[str, str]]]


def provider_chain(device: Device, available: list[str] | None = None) -> ProviderChain:
    """Execution providers for a device, or DeviceUnavailable when its provider is missing."""
    available = ort.get_available_providers() if available is None else available
    if device.kind == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in available:
        raise DeviceUnavailable(
            f"--device {device} needs ONNX Runtime's CUDAExecutionProvider, but this install "
            f"offers {available}: install onnxruntime-gpu in place of onnxruntime"
        )
    # Each session builds its own CUDA provider instance and so its own compute stream:
    # K sessions give K streams whose batches overlap copy and compute.
    options = {
        "device_id": str(device.index),
        "arena_extend_strategy": "kSameAsRequested",
        "cudnn_conv_algo_search": "HEURISTIC",
    }
    return [("CUDAExecutionProvider", options), "CPUExecutionProvider"]


def session_options(config: RuntimeConfig, model_bytes: int = 0) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = config.resolved_intra_op_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 4  # ORT would print run errors to stderr; we report them
    spin = "1" if config.resolved_spin(model_bytes) else "0"
    options.add_session_config_entry("session.intra_op.allow_spinning", spin)
    options.add_session_config_entry("session.inter_op.allow_spinning", spin)
    return options


def read_model(path: str | os.PathLike[str]) -> bytes:
    """The model file's bytes, or ModelLoadError with one clear sentence."""
    model_path = Path(path)
    if not model_path.exists():
        raise ModelLoadError(f"model file not found: {model_path}")
    if not model_path.is_file():
        raise ModelLoadError(f"model path is not a file: {model_path}")
    try:
        return model_path.read_bytes()
    except OSError as err:
        raise ModelLoadError(f"cannot read model file {model_path}: {err.strerror}") from err


class SessionBuilder:
    """Builds the sessions of one model file: the pool at load, and replacements later.

    A replacement re-reads the file and refuses it if its bytes changed since the load, so a
    rebuilt session always computes what the metadata and the cache keys say it does."""

    def __init__(self, path: str | os.PathLike[str], config: RuntimeConfig) -> None:
        self.path = path
        self.config = config
        self.digest = ""

    def load(self) -> tuple[list[ort.InferenceSession], ModelMetadata]:
        """Build `config.instances` sessions (blocking: call it off the event loop)."""
        model = read_model(self.path)
        self.digest = model_digest(model)
        config = self.config
        if config.device.kind == "cuda":
            _preload_cuda()
        providers = provider_chain(config.device)
        sessions = [_build(model, self.path, config, providers) for _ in range(config.instances)]
        metadata = ModelMetadata.from_session(sessions[0])
        if (
            config.device.kind == "cuda"
            and "CUDAExecutionProvider" not in sessions[0].get_providers()
        ):
            raise DeviceUnavailable(f"ONNX Runtime could not start CUDA on {config.device}")
        if not metadata.batched:
            log.warning("model %s has no variable batch dimension: batching is off", self.path)
        return sessions, metadata

    def rebuild(self) -> ort.InferenceSession:
        """One more session of the loaded model (blocking)."""
        model = read_model(self.path)
        if model_digest(model) != self.digest:
            raise ModelLoadError(f"{self.path} changed since it was loaded; restart to serve it")
        return _build(model, self.path, self.config, provider_chain(self.config.device))


def load_sessions(
    path: str | os.PathLike[str], config: RuntimeConfig
) -> tuple[list[ort.InferenceSession], ModelMetadata]:
    """Build `config.instances` sessions of one model (blocking: call it off the event loop)."""
    return SessionBuilder(path, config).load()


def model_digest(model: bytes) -> str:
    """Identifies a model file's content (cache keys carry it; rebuilds check it)."""
    return hashlib.blake2b(model).hexdigest()[:32]


def _preload_cuda() -> None:
    # onnxruntime-gpu >= 1.21 finds CUDA and cuDNN from pip's nvidia-* packages only when asked.
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        try:
            preload()
        except Exception as err:  # the system's libraries may still be found by the loader
            log.debug("onnxruntime.preload_dlls failed: %s", err)


def _build(
    model: bytes, path: str | os.PathLike[str], config: RuntimeConfig, providers: ProviderChain
) -> ort.InferenceSession:
    try:
        options = session_options(config, len(model))
        return ort.InferenceSession(model, options, providers=providers)
    except Exception as err:  # ORT raises its own untyped errors; translate at the boundary
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelLoadError(f"{path} is not a valid ONNX model: {first_line}") from err


def sample_inputs(metadata: ModelMetadata, rows: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    """Generated inputs of the right shapes and dtypes (variable dims become 1, batch = rows)."""
    rng = np.random.default_rng(seed)
    return {spec.name: _sample(spec, rows, rng, metadata.batched) for spec in metadata.inputs}


def _sample(spec: TensorSpec, rows: int, rng: np.random.Generator, batched: bool) -> np.ndarray:
    shape = [d if d >= 0 else 1 for d in spec.shape]
    if batched:
        shape[0] = rows
    dtype = spec.dtype
    if dtype.kind == "O":
        return np.full(shape, "x", dtype=object)
    if dtype.kind in "biu":
        # Zeros: integer inputs are often indices or token ids, and 0 is valid for nearly all.
        return np.zeros(shape, dtype=dtype)
    result: np.ndarray = rng.standard_normal(size=shape).astype(dtype)
    return result


def run_session(
    session: ort.InferenceSession, arrays: list[np.ndarray], names: tuple[str, ...]
) -> list[np.ndarray]:
    """One run; `names` are the model's input names in the order of `arrays`."""
    outputs: list[np.ndarray] = session.run(None, dict(zip(names, arrays, strict=True)))
    return outputs


def describe(metadata: ModelMetadata) -> dict[str, Any]:
    return {
        "inputs": [t.as_dict() for t in metadata.inputs],
        "outputs": [t.as_dict() for t in metadata.outputs],
    }
