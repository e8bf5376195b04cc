"""Building ONNX Runtime sessions: providers, threading, streams, I/O binding and clear errors."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
import onnxruntime as ort

from batchserve.config import RuntimeConfig
from batchserve.errors import DeviceUnavailable, ModelLoadError
from batchserve.runtime.binding import CpuBinding, CudaBinding, bindable
from batchserve.runtime.cuda import CudaRuntime, CudaStream, PinnedAllocator
from batchserve.runtime.fp16 import default_build_cache_dir, fp16_model
from batchserve.runtime.metadata import ModelMetadata, TensorSpec
from batchserve.runtime.providers import (
    CUDA,
    ProviderChain,
    check_device,
    provider_chain,
    use_tensorrt,
)

log = logging.getLogger("batchserve.runtime")

Runner = CpuBinding | CudaBinding


class ManagedSession:
    """An ONNX Runtime session with what it owns: its CUDA stream, its pinned buffers and its
    I/O binding. It runs like an InferenceSession; `close` releases them (the pool calls it)."""

    def __init__(
        self,
        session: ort.InferenceSession,
        runner: Runner | None = None,
        stream: CudaStream | None = None,
        pinned: PinnedAllocator | None = None,
    ) -> None:
        self.session: ort.InferenceSession | None = session
        self.runner = runner
        self._stream = stream
        self._pinned = pinned
        self._inputs = tuple(node.name for node in session.get_inputs())
        self._outputs = tuple(node.name for node in session.get_outputs())

    def run(self, output_names: list[str] | None, feeds: dict[str, Any]) -> list[np.ndarray]:
        session = self.session
        if session is None:
            raise RuntimeError("the session is closed")
        if self.runner is None:
            result: list[np.ndarray] = session.run(output_names, feeds)
            return result
        outputs = self.runner.run([feeds[name] for name in self._inputs])
        if output_names is None:
            return outputs
        return [outputs[self._outputs.index(name)] for name in output_names]

    def get_inputs(self) -> Any:
        return self._live().get_inputs()

    def get_outputs(self) -> Any:
        return self._live().get_outputs()

    def get_providers(self) -> list[str]:
        providers: list[str] = self._live().get_providers()
        return providers

    def _live(self) -> ort.InferenceSession:
        if self.session is None:
            raise RuntimeError("the session is closed")
        return self.session

    def close(self) -> None:
        """Release in dependency order: the session before the stream and memory it uses."""
        if self.runner is not None:
            self.runner.close()
            self.runner = None
        self.session = None
        if self._pinned is not None:
            self._pinned.close()
        if self._stream is not None:
            self._stream.close()


# ORT's own type is untyped (Any) to mypy; the alias still says what a pool may hold.
Session: TypeAlias = "ort.InferenceSession | ManagedSession"


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
        self._cuda: CudaRuntime | None = None
        self._tensorrt = False
        self._trt_cache: Path | None = None

    def load(self) -> tuple[list[Session], ModelMetadata]:
        """Build `config.instances` sessions (blocking: call it off the event loop)."""
        model = read_model(self.path)
        self.digest = model_digest(model)
        config = self.config
        available = ort.get_available_providers()
        check_device(config.device, available)
        if config.device.kind == "cuda":
            _preload_cuda()
            self._cuda = CudaRuntime()
            self._tensorrt = use_tensorrt(config, available)
            if self._tensorrt:
                self._trt_cache = self._cache_dir("trt", config.trt_cache_dir)
        model = self._prepare(model)
        sessions: list[Session] = []
        try:
            for _ in range(config.instances):
                sessions.append(self._session(model))
        except BaseException:
            for session in sessions:
                close_session(session)
            raise
        metadata = ModelMetadata.from_session(sessions[0])
        if not metadata.batched:
            log.warning("model %s has no variable batch dimension: batching is off", self.path)
        return sessions, metadata

    def rebuild(self) -> Session:
        """One more session of the loaded model (blocking)."""
        model = read_model(self.path)
        if model_digest(model) != self.digest:
            raise ModelLoadError(f"{self.path} changed since it was loaded; restart to serve it")
        return self._session(self._prepare(model))

    def _cache_dir(self, kind: str, configured: str | None) -> Path:
        root = Path(self.config.build_cache_dir or default_build_cache_dir())
        # Keyed by the model's digest: engines built for one file never serve another.
        path = (Path(configured) if configured else root / kind) / self.digest
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ModelLoadError(f"cannot create the {kind} cache directory {path}: {err}") from err
        return path

    def _prepare(self, model: bytes) -> bytes:
        config = self.config
        if not config.fp16 or self._tensorrt:
            return model  # with TensorRT, its own FP16 mode does it (trt_fp16_enable)
        root = Path(config.build_cache_dir or default_build_cache_dir())
        return fp16_model(model, self.digest, root, str(self.path))

    def _session(self, model: bytes) -> Session:
        config = self.config
        stream = CudaStream(self._cuda, config.device.index) if self._cuda is not None else None
        session = None
        try:
            providers = provider_chain(
                config,
                stream=stream.handle if stream is not None else None,
                tensorrt=self._tensorrt,
                trt_cache_dir=self._trt_cache,
            )
            session = _build(model, self.path, config, providers)
            if config.device.kind == "cuda" and CUDA not in session.get_providers():
                raise DeviceUnavailable(f"ONNX Runtime could not start CUDA on {config.device}")
            return self._manage(session, stream)
        except BaseException:
            session = None  # drop the session before the stream it was given
            if stream is not None:
                stream.close()
            raise

    def _manage(self, session: ort.InferenceSession, stream: CudaStream | None) -> Session:
        config = self.config
        metadata = ModelMetadata.from_session(session)
        binding = config.resolved_io_binding() and bindable(metadata)
        if config.cuda_graphs and not binding:
            raise ModelLoadError("--cuda-graphs needs I/O binding, which string tensors lack")
        if not binding and stream is None:
            return session  # the plain CPU path: nothing to own, nothing in the way
        if not binding:
            return ManagedSession(session, stream=stream)
        if self._cuda is None:
            return ManagedSession(session, CpuBinding(session, metadata))
        pinned = PinnedAllocator(self._cuda)
        runner = CudaBinding(
            session, metadata, config.device.index, pinned, graphs=config.cuda_graphs
        )
        return ManagedSession(session, runner, stream, pinned)


def load_sessions(
    path: str | os.PathLike[str], config: RuntimeConfig
) -> tuple[list[Session], ModelMetadata]:
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


def close_session(session: Session) -> None:
    """Release what a session owns (CUDA stream, pinned memory); plain sessions own nothing."""
    if isinstance(session, ManagedSession):
        session.close()


def run_session(
    session: Session, arrays: list[np.ndarray], names: tuple[str, ...]
) -> list[np.ndarray]:
    """One run; `names` are the model's input names in the order of `arrays`."""
    outputs: list[np.ndarray] = session.run(None, dict(zip(names, arrays, strict=True)))
    return outputs


def describe(metadata: ModelMetadata) -> dict[str, Any]:
    return {
        "inputs": [t.as_dict() for t in metadata.inputs],
        "outputs": [t.as_dict() for t in metadata.outputs],
    }
