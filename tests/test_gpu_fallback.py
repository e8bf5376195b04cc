"""How a GPU load decides and reports, checked on CPU: TensorRT tried and dropped with ORT's
reason, CUDA failures that say why and what to install, no silent provider fallback, the
libcudart search order, CUDA graph capture one session at a time, the FP16 cache message.

ONNX Runtime's *failures* are faked by a session factory that raises as the GPU build does;
every session that is built is a real CPU one."""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from batchserve.config import Device, RuntimeConfig
from batchserve.errors import DeviceUnavailable, ModelLoadError
from batchserve.runtime.binding import bucket_rows, capture_rows
from batchserve.runtime.cuda import cudart_candidates
from batchserve.runtime.fp16 import fp16_model
from batchserve.runtime.pool import SessionPool
from batchserve.runtime.providers import TENSORRT, TRT_MISSING, ProviderChain, provider_chain
from batchserve.runtime.session import (
    Session,
    build_session,
    check_providers,
    first_session,
    ort_session,
)

CUDA0 = Device("cuda", 0)
# What onnxruntime-gpu 1.31.1 raises for the TensorRT chain where TensorRT's libraries are absent.
TRT_ERROR = (
    "/onnxruntime_src/onnxruntime/python/onnxruntime_pybind_state.cc:1234 void "
    "onnxruntime::python::RegisterTensorRTPluginsAsCustomOps(...) Please install TensorRT "
    "libraries as mentioned in the GPU requirements page.\n"
    "more detail\nand more\nand a fourth line nobody needs"
)
CUDA_ERROR = (
    "[ONNXRuntimeError] : 1 : FAIL : Failed to load libcudnn.so.9: cannot open shared object"
)


def names(providers: ProviderChain) -> list[str]:
    return [p[0] if isinstance(p, tuple) else p for p in providers]


class OrtOnCpu:
    """A session factory: raises as ORT does for the chains in `fail`, else builds a real CPU
    session (the options a GPU chain carries mean nothing to the CPU build)."""

    def __init__(self, fail: dict[str, str]) -> None:
        self.fail = fail
        self.chains: list[list[str]] = []

    def __call__(
        self, model: bytes, options: ort.SessionOptions, providers: ProviderChain
    ) -> ort.InferenceSession:
        chain = names(providers)
        self.chains.append(chain)
        for provider, message in self.fail.items():
            if provider in chain:
                raise RuntimeError(message)
        return ort_session(model, options, ["CPUExecutionProvider"])


def builder(
    path: Path, config: RuntimeConfig, factory: OrtOnCpu, tmp_path: Path
) -> tuple[Any, Any]:
    """`first_session`'s build and prepare, as SessionBuilder wires them (without streams)."""
    prepared: list[bytes] = []

    def build(model: bytes, tensorrt: bool) -> Session:
        chain = provider_chain(config, tensorrt=tensorrt, trt_cache_dir=tmp_path)
        return build_session(model, path, config, chain, factory)

    def prepare(model: bytes) -> bytes:
        prepared.append(model)
        return fp16_model(model, "digest", tmp_path, str(path))

    return build, prepare


def trt_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(TRT_MISSING)]


# -- TensorRT is decided by building -------------------------------------------------------


def test_tensorrt_that_fails_falls_back_to_cuda_once_with_its_reason_and_fp16(
    mlp_path: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = RuntimeConfig(device=CUDA0, trt=True, fp16=True)
    factory = OrtOnCpu({TENSORRT: TRT_ERROR})
    build, prepare = builder(mlp_path, config, factory, tmp_path)
    model = mlp_path.read_bytes()
    with caplog.at_level(logging.WARNING, logger="batchserve.runtime"):
        session, used, tensorrt = first_session(model, True, build, prepare)
    assert not tensorrt
    assert factory.chains == [
        [TENSORRT, "CUDAExecutionProvider", "CPUExecutionProvider"],
        ["CUDAExecutionProvider", "CPUExecutionProvider"],
    ]
    (warning,) = trt_warnings(caplog)
    assert "Please install TensorRT libraries" in warning
    assert "and more" in warning  # the first three lines of ORT's message, on one line
    assert "fourth line" not in warning
    # TensorRT's FP16 mode is gone, so the model was converted for CUDA instead.
    assert used != model
    x = np.random.default_rng(0).standard_normal((4, 64), dtype=np.float32)
    (half,) = session.run(None, {"input": x})
    (full,) = ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(
        None, {"input": x}
    )
    assert not np.array_equal(half, full)
    np.testing.assert_allclose(half, full, atol=2e-3)


def test_tensorrt_that_starts_is_kept_and_does_its_own_fp16(
    mlp_path: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = RuntimeConfig(device=CUDA0, trt=True, fp16=True)
    factory = OrtOnCpu({})
    build, prepare = builder(mlp_path, config, factory, tmp_path)
    model = mlp_path.read_bytes()
    with caplog.at_level(logging.WARNING, logger="batchserve.runtime"):
        _, used, tensorrt = first_session(model, True, build, prepare)
    assert tensorrt
    assert used == model  # trt_fp16_enable converts, not batchserve
    assert factory.chains == [[TENSORRT, "CUDAExecutionProvider", "CPUExecutionProvider"]]
    assert trt_warnings(caplog) == []


def test_cuda_that_fails_is_device_unavailable_with_reason_and_hint(
    mlp_path: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = RuntimeConfig(device=CUDA0, trt=True)
    factory = OrtOnCpu({TENSORRT: TRT_ERROR, "CUDAExecutionProvider": CUDA_ERROR})
    build, prepare = builder(mlp_path, config, factory, tmp_path)
    with (
        caplog.at_level(logging.WARNING, logger="batchserve.runtime"),
        pytest.raises(DeviceUnavailable) as raised,
    ):
        first_session(mlp_path.read_bytes(), True, build, prepare)
    message = raised.value.message
    assert f"cannot build an ONNX Runtime session for {mlp_path} on cuda:0" in message
    assert "Failed to load libcudnn.so.9" in message  # ORT's reason
    assert "cuDNN 9" in message
    assert "preload_dlls" in message
    assert "not a valid ONNX model" not in message
    assert len(trt_warnings(caplog)) == 1


# -- errors name the device, and only bad files are "not a valid ONNX model" ------------------


@pytest.mark.parametrize("device", [Device(), CUDA0], ids=str)
def test_a_bad_file_is_not_a_valid_model_on_any_device(tmp_path: Path, device: Device) -> None:
    config = RuntimeConfig(device=device)
    chain, junk = provider_chain(config), tmp_path / "junk.onnx"
    with pytest.raises(ModelLoadError, match=r"junk\.onnx is not a valid ONNX model: .*protobuf"):
        build_session(b"\x00\x01 not protobuf", junk, config, chain, OrtOnCpu({}))


def test_other_failures_name_the_device(mlp_path: Path) -> None:
    factory = OrtOnCpu({"CPUExecutionProvider": "[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : oom"})
    config = RuntimeConfig()
    with pytest.raises(ModelLoadError) as raised:
        build_session(b"m", mlp_path, config, provider_chain(config), factory)
    assert raised.value.message == (
        f"cannot build an ONNX Runtime session for {mlp_path} on cpu: "
        "[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : oom"
    )


def test_sessions_do_not_fall_back_silently(mlp_path: Path) -> None:
    session = ort_session(mlp_path.read_bytes(), ort.SessionOptions(), ["CPUExecutionProvider"])
    # The Python wrapper's own flag: ORT would otherwise retry a failed run on CPU for good.
    assert session._enable_fallback is False


@pytest.mark.skipif(
    "CUDAExecutionProvider" in ort.get_available_providers(), reason="needs the CPU-only build"
)
def test_a_cuda_request_that_gets_a_cpu_session_is_refused(mlp_path: Path) -> None:
    config = RuntimeConfig(device=CUDA0)
    # The real CPU build: ORT warns and builds a CPU session, as the GPU build does when the
    # CUDA provider's libraries do not load.
    with pytest.warns(UserWarning, match="not in available provider"):
        session = build_session(mlp_path.read_bytes(), mlp_path, config, provider_chain(config))
    with pytest.raises(DeviceUnavailable, match=r"could not start CUDA on cuda:0.*cuDNN 9"):
        check_providers(session.get_providers(), CUDA0)
    with pytest.raises(DeviceUnavailable, match="did not start TensorRT"):
        check_providers(["CUDAExecutionProvider", "CPUExecutionProvider"], CUDA0, tensorrt=True)
    check_providers(["CUDAExecutionProvider", "CPUExecutionProvider"], CUDA0)
    check_providers(["CPUExecutionProvider"], Device())


# -- libcudart: ORT's own CUDA major, the loaded copy first ---------------------------------


def test_cudart_candidates_keep_to_ort_cuda_major(tmp_path: Path) -> None:
    for folder, name in [("cu13", "libcudart.so.13"), ("cuda_runtime", "libcudart.so.12")]:
        lib = tmp_path / "nvidia" / folder / "lib"
        lib.mkdir(parents=True)
        (lib / name).touch()
    root = str(tmp_path / "nvidia")
    loaded = os.RTLD_NOLOAD | os.RTLD_LAZY
    assert cudart_candidates("13", [root]) == [
        ("libcudart.so.13", loaded),
        ("libcudart.so.13", ctypes.DEFAULT_MODE),
        (f"{root}/cu13/lib/libcudart.so.13", ctypes.DEFAULT_MODE),
    ]
    assert [c for c, _ in cudart_candidates("12", [root])][-1].endswith("libcudart.so.12")
    unknown = cudart_candidates(None, [root])  # a build that does not say: newest first
    assert unknown[:3] == [(f"libcudart.so.{m}", loaded) for m in ("13", "12", "11.0")]


# -- CUDA graphs: every bucket, one session at a time ------------------------------------------


@pytest.mark.parametrize(
    ("max_rows", "rows"),
    [(1, [1]), (2, [1, 2]), (16, [1, 2, 4, 8, 16]), (24, [1, 2, 4, 8, 16, 24])],
)
def test_capture_rows_reach_every_bucket(max_rows: int, rows: list[int]) -> None:
    assert capture_rows(max_rows) == rows
    reached = {bucket_rows(n) for n in rows}
    assert reached == {bucket_rows(n) for n in range(1, max_rows + 1)}


class Recorder:
    """Wraps a real session; records which thread ran it and how many ran at once."""

    def __init__(self, session: ort.InferenceSession, log: list[tuple[int, str]], index: int):
        self.session = session
        self.log = log
        self.index = index

    def run(self, output_names: Any, feeds: dict[str, np.ndarray]) -> Any:
        self.log.append((self.index, threading.current_thread().name))
        time.sleep(0.05)  # long enough that concurrent runs would interleave in the log
        result = self.session.run(output_names, feeds)
        self.log.append((self.index, "done"))
        return result


async def test_run_in_turn_runs_each_session_alone_on_its_own_thread(mlp_path: Path) -> None:
    session = ort.InferenceSession(str(mlp_path), providers=["CPUExecutionProvider"])
    log: list[tuple[int, str]] = []
    sessions = [Recorder(session, log, i) for i in range(3)]
    async with SessionPool(sessions, ("input",)) as pool:
        await pool.run_in_turn([np.zeros((2, 64), np.float32)])
        pool.stop_capturing()  # plain sessions: nothing to stop, and no error
    assert log == [
        entry for i in range(3) for entry in [(i, f"batchserve-session-{i}_0"), (i, "done")]
    ]


# -- FP16 cache ----------------------------------------------------------------------------


def test_fp16_says_when_it_could_not_cache(
    mlp_path: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache directory would go")
    with caplog.at_level(logging.INFO, logger="batchserve.runtime"):
        fp16_model(mlp_path.read_bytes(), "d", blocker, str(mlp_path))
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("cannot cache the FP16 model") for m in messages)
    assert f"converted {mlp_path} to FP16 (inputs and outputs stay FP32), not cached" in messages
    assert not any("cached at" in m for m in messages)
