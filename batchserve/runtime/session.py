"""Building ONNX Runtime sessions: providers, threading, streams, I/O binding and clear errors."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
import onnxruntime as ort

from batchserve.config import Device, RuntimeConfig
from batchserve.errors import BatchserveError, DeviceUnavailable, ModelLoadError
from batchserve.runtime.binding import CpuBinding, CudaBinding, bindable
from batchserve.runtime.cuda import CudaRuntime, CudaStream, PinnedAllocator, ort_cuda_major
from batchserve.runtime.driver import (
    DriverVersionReader,
    installed_driver_version,
    warn_if_old_driver,
)
from batchserve.runtime.fp16 import default_build_cache_dir, fp16_model
from batchserve.runtime.input_prefix import prefixed_model
from batchserve.runtime.metadata import ModelMetadata, TensorSpec
from batchserve.runtime.providers import (
    CUDA,
    TENSORRT,
    TRT_MISSING,
    ProviderChain,
    check_device,
    provider_chain,
    use_tensorrt,
)

log = logging.getLogger("batchserve.runtime")

# Runs a session's batches through I/O binding (pinned buffers, CUDA graphs on GPU).
Binding = CpuBinding | CudaBinding
# Builds an InferenceSession from the model's bytes (tests inject one that fails on purpose).
SessionFactory = Callable[[bytes, ort.SessionOptions, ProviderChain], ort.InferenceSession]
# ORT error codes (and a message) that mean the file itself is not a usable ONNX model.
MODEL_ERRORS = ("INVALID_PROTOBUF", "INVALID_GRAPH", "NO_MODEL", "No graph was found")


class ManagedSession:
    """An ONNX Runtime session with what it owns: its CUDA stream, its pinned buffers and its
    I/O binding. It runs like an InferenceSession; `close` releases them (the pool calls it)."""

    def __init__(
        self,
        session: ort.InferenceSession,
        binding: Binding | None = None,
        stream: CudaStream | None = None,
        pinned: PinnedAllocator | None = None,
    ) -> None:
        self.session: ort.InferenceSession | None = session
        self.binding = binding
        self._stream = stream
        self._pinned = pinned
        self._inputs = tuple(node.name for node in session.get_inputs())
        self._outputs = tuple(node.name for node in session.get_outputs())

    def run(self, output_names: list[str] | None, feeds: dict[str, Any]) -> list[np.ndarray]:
        session = self.session
        if session is None:
            raise RuntimeError("the session is closed")
        if self.binding is None:
            result: list[np.ndarray] = session.run(output_names, feeds)
            return result
        outputs = self.binding.run([feeds[name] for name in self._inputs])
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

    def stop_capturing(self) -> None:
        """No CUDA graph captures from now on (see CudaBinding.stop_capturing)."""
        if isinstance(self.binding, CudaBinding):
            self.binding.stop_capturing()

    def _live(self) -> ort.InferenceSession:
        if self.session is None:
            raise RuntimeError("the session is closed")
        return self.session

    def close(self) -> None:
        """Release in dependency order: the session before the stream and memory it uses."""
        if self.binding is not None:
            self.binding.close()
            self.binding = None
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

    def __init__(
        self,
        path: str | os.PathLike[str],
        config: RuntimeConfig,
        *,
        factory: SessionFactory | None = None,
        driver_version: DriverVersionReader = installed_driver_version,
    ) -> None:
        self.path = path
        self.config = config
        self.digest = ""
        self._factory = factory or ort_session
        self._driver_version = driver_version
        self._cuda: CudaRuntime | None = None
        self._tensorrt = False
        self._trt_cache: Path | None = None

    def load(self) -> tuple[list[Session], ModelMetadata]:
        """Build `config.instances` sessions (blocking: call it off the event loop)."""
        model = read_model(self.path)
        self.digest = model_digest(model)
        config = self.config
        available = ort.get_available_providers()
        if config.device.kind == "cuda":
            # Before anything CUDA can fail: an old driver is the likeliest reason it would.
            major = ort_cuda_major()
            warn_if_old_driver(self._driver_version, int(major) if major else None)
        check_device(config.device, available)
        if config.device.kind == "cuda":
            _preload_cuda()
            self._cuda = CudaRuntime()
            self._tensorrt = use_tensorrt(config, available)
            if self._tensorrt:
                self._trt_cache = self._cache_dir("trt", config.trt_cache_dir)
        sessions: list[Session] = []
        try:
            first, model, self._tensorrt = first_session(
                model, self._tensorrt, self._session, self._prepare, self._prepare_trt
            )
            sessions.append(first)
            for _ in range(config.instances - 1):
                sessions.append(self._session(model, self._tensorrt))
        except BaseException:
            for session in sessions:
                close_session(session)
            raise
        metadata = ModelMetadata.from_session(sessions[0])
        if not metadata.batched:
            log.warning("model %s has no variable batch dimension: batching is off", self.path)
        return sessions, metadata

    def rebuild(self) -> Session:
        """One more session of the loaded model (blocking). It captures no CUDA graphs: other
        sessions are serving meanwhile, and a capture must not overlap their CUDA calls."""
        model = read_model(self.path)
        # By content, as the model repository's hot reload decides (see repository.source):
        # a replacement that kept the size and mtime is refused here and reloaded there.
        if model_digest(model) != self.digest:
            raise ModelLoadError(
                f"{self.path} changed since it was loaded; it is served once loaded again "
                "(a restart, or the model repository's next poll or load)"
            )
        model = self._prepare(model, self._tensorrt)
        session = self._session(model, self._tensorrt)
        stop_capturing(session)
        return session

    def _cache_dir(self, kind: str, configured: str | None) -> Path:
        root = Path(self.config.build_cache_dir or default_build_cache_dir())
        # Keyed by the model's digest: engines built for one file never serve another.
        path = (Path(configured) if configured else root / kind) / self.digest
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ModelLoadError(f"cannot create the {kind} cache directory {path}: {err}") from err
        return path

    def _prepare(self, model: bytes, tensorrt: bool = False) -> bytes:
        """The model as the sessions run it: converted to FP16 without TensorRT (with it,
        its own FP16 mode, trt_fp16_enable, does the conversion), then with the prefixes of
        the inputs clients send as UINT8 or FP16 (input_prefix.py)."""
        config = self.config
        root = Path(config.build_cache_dir or default_build_cache_dir())
        fp16 = config.fp16 and not tensorrt

        def converted() -> bytes:
            return fp16_model(model, self.digest, root, str(self.path)) if fp16 else model

        if not config.input_formats:
            return converted()
        return prefixed_model(
            converted, config.input_formats, digest=self.digest, cache_dir=root,
            source=str(self.path), fp16=fp16,
        )  # fmt: skip

    def _prepare_trt(self, model: bytes) -> bytes:
        return self._prepare(model, tensorrt=True)

    def _session(self, model: bytes, tensorrt: bool) -> Session:
        config = self.config
        stream = CudaStream(self._cuda, config.device.index) if self._cuda is not None else None
        session = None
        try:
            providers = provider_chain(
                config,
                stream=stream.handle if stream is not None else None,
                tensorrt=tensorrt,
                trt_cache_dir=self._trt_cache,
            )
            session = build_session(model, self.path, config, providers, self._factory)
            check_providers(session.get_providers(), config.device, tensorrt=tensorrt)
            return self._manage(session, stream)
        except BaseException:
            session = None  # drop the session before the stream it was given
            if stream is not None:
                stream.close()
            raise

    def _manage(self, session: ort.InferenceSession, stream: CudaStream | None) -> Session:
        config = self.config
        metadata = ModelMetadata.from_session(session)
        use_binding = config.resolved_io_binding() and bindable(metadata)
        if config.cuda_graphs and not use_binding:
            raise ModelLoadError("--cuda-graphs needs I/O binding, which string tensors lack")
        if not use_binding and stream is None:
            return session  # the plain CPU path: nothing to own, nothing in the way
        if not use_binding:
            return ManagedSession(session, stream=stream)
        if self._cuda is None:
            return ManagedSession(session, CpuBinding(session, metadata))
        pinned = PinnedAllocator(self._cuda)
        binding = CudaBinding(
            session, metadata, config.device.index, pinned, graphs=config.cuda_graphs
        )
        return ManagedSession(session, binding, stream, pinned)


def model_digest(model: bytes) -> str:
    """Identifies a model file's content (cache keys carry it; rebuilds check it)."""
    return hashlib.blake2b(model).hexdigest()[:32]


def first_session(
    model: bytes,
    tensorrt: bool,
    build: Callable[[bytes, bool], Session],
    prepare: Callable[[bytes], bytes],
    prepare_trt: Callable[[bytes], bytes] | None = None,
) -> tuple[Session, bytes, bool]:
    """A load's first session, and what it decided: the model bytes the other sessions use and
    whether TensorRT runs. PyPI's onnxruntime-gpu always lists TensorRT, so only a build tells
    whether its libraries load: when the TensorRT chain fails, say why once and build with CUDA
    (after `prepare`, the FP16 conversion, which TensorRT's own FP16 mode would have done).
    `prepare_trt` makes what TensorRT runs (the input prefixes, no conversion)."""
    if tensorrt:
        trt_model = prepare_trt(model) if prepare_trt is not None else model
        try:
            return build(trt_model, True), trt_model, True
        except BatchserveError as err:
            cause = err.__cause__
            log.warning("%s: %s", TRT_MISSING, ort_reason(cause) if cause else err.message)
    prepared = prepare(model)
    return build(prepared, False), prepared, False


def check_providers(providers: list[str], device: Device, *, tensorrt: bool = False) -> None:
    """DeviceUnavailable unless the built session really runs on the requested providers:
    ORT only warns, and gives a CPU session, when the CUDA provider's libraries do not load."""
    if tensorrt and providers[:1] != [TENSORRT]:
        raise DeviceUnavailable(f"ONNX Runtime did not start TensorRT on {device}: {providers}")
    if device.kind == "cuda" and CUDA not in providers:
        raise DeviceUnavailable(
            f"ONNX Runtime could not start CUDA on {device} (the session got {providers}; "
            f"ONNX Runtime's warning on stderr says which library failed). {cuda_hint()}"
        )


def cuda_hint() -> str:
    major = ort_cuda_major() or "13"
    return (
        f"onnxruntime-gpu {ort.__version__} needs CUDA {major} and cuDNN 9 where its loader "
        "finds them: pip install 'onnxruntime-gpu[cuda,cudnn]' (onnxruntime.preload_dlls() "
        "loads pip's nvidia-* packages next to the onnxruntime package), or put their lib "
        "directories on LD_LIBRARY_PATH"
    )


def ort_reason(err: BaseException, lines: int = 3, limit: int = 600) -> str:
    """The first lines of an ORT error on one line (ORT's messages can run to pages)."""
    text = [line.strip() for line in str(err).splitlines() if line.strip()]
    if not text:
        return type(err).__name__
    reason = " | ".join(text[:lines])
    return reason if len(reason) <= limit else reason[: limit - 3] + "..."


def ort_session(
    model: bytes, options: ort.SessionOptions, providers: ProviderChain
) -> ort.InferenceSession:
    """An InferenceSession that fails rather than falls back: by default ORT retries a failed
    build on fewer providers without their options (and, at run time, switches to CPU for
    good), telling only stdout."""
    session = ort.InferenceSession(model, options, providers=providers, enable_fallback=0)
    disable = getattr(session, "disable_fallback", None)
    if disable is not None:
        disable()
    return session


def build_session(
    model: bytes,
    path: str | os.PathLike[str],
    config: RuntimeConfig,
    providers: ProviderChain,
    factory: SessionFactory = ort_session,
) -> ort.InferenceSession:
    """A session, or one clear error: ModelLoadError for a file that is no valid model, else
    the device's failure with ORT's reason (DeviceUnavailable, with the fix, for CUDA)."""
    try:
        options = session_options(config, len(model))
        return factory(model, options, providers)
    except Exception as err:  # ORT raises its own untyped errors; translate at the boundary
        raise build_error(err, path, config.device) from err


def build_error(
    err: BaseException, path: str | os.PathLike[str], device: Device
) -> ModelLoadError | DeviceUnavailable:
    reason = ort_reason(err)
    if any(code in str(err) for code in MODEL_ERRORS):
        return ModelLoadError(f"{path} is not a valid ONNX model: {reason}")
    message = f"cannot build an ONNX Runtime session for {path} on {device}: {reason}"
    if device.kind == "cuda":
        return DeviceUnavailable(f"{message}. {cuda_hint()}")
    return ModelLoadError(message)


def _preload_cuda() -> None:
    # onnxruntime-gpu >= 1.21 finds CUDA and cuDNN from pip's nvidia-* packages only when asked.
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        try:
            preload()
        except Exception as err:  # the system's libraries may still be found by the loader
            log.debug("onnxruntime.preload_dlls failed: %s", err)


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


def stop_capturing(session: Session) -> None:
    """No CUDA graph captures by this session from now on (plain sessions capture none)."""
    if isinstance(session, ManagedSession):
        session.stop_capturing()


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
