"""GPU runtime features, tested on CPU where they can be: provider options, TensorRT fallback,
I/O binding with reused buffers, FP16 conversion, the flags. CUDA-only checks are skipped
without onnxruntime-gpu and an NVIDIA GPU."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from batchserve import BatchConfig, Engine
from batchserve.cli import build_parser, main
from batchserve.config import Device, RuntimeConfig
from batchserve.errors import DeviceUnavailable, ModelLoadError
from batchserve.runtime.binding import CpuBinding, CudaBinding, OutputBuffers, bucket_rows
from batchserve.runtime.cuda import CudaRuntime, CudaStream
from batchserve.runtime.metadata import ModelMetadata
from batchserve.runtime.pool import SessionPool
from batchserve.runtime.providers import (
    TRT_MISSING,
    check_device,
    cuda_options,
    provider_chain,
    use_tensorrt,
)
from batchserve.runtime.session import ManagedSession, SessionBuilder


def cuda_runs() -> bool:
    """A tiny real session that ORT really put on CUDA: PyPI's onnxruntime-gpu lists the CUDA
    provider on machines without a GPU or driver too (and then gives a CPU session)."""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    try:
        session = ort.InferenceSession(
            model.SerializeToString(), providers=["CUDAExecutionProvider"], enable_fallback=0
        )
    except Exception:  # no driver, no GPU, CUDA or cuDNN libraries missing
        return False
    return bool(session.get_providers()[0] == "CUDAExecutionProvider")


HAS_CUDA = cuda_runs()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs onnxruntime-gpu and an NVIDIA GPU")
CUDA = Device("cuda", 1)


def plain_session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def rows_of(rows: int, seed: int, width: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, width), dtype=np.float32)


# -- provider options ---------------------------------------------------------------------


def test_cuda_options_with_a_stream_of_its_own() -> None:
    config = RuntimeConfig(device=CUDA, gpu_mem_limit_mb=512, cuda_graphs=True)
    assert cuda_options(config, stream=94_000_000_000) == {
        "device_id": "1",
        "arena_extend_strategy": "kSameAsRequested",
        "cudnn_conv_algo_search": "HEURISTIC",
        "gpu_mem_limit": str(512 * 1024 * 1024),
        "do_copy_in_default_stream": "0",
        "has_user_compute_stream": "1",
        "user_compute_stream": "94000000000",
        "enable_cuda_graph": "1",
    }


def test_cuda_options_without_a_stream_leave_the_defaults() -> None:
    assert cuda_options(RuntimeConfig(device=CUDA)) == {
        "device_id": "1",
        "arena_extend_strategy": "kSameAsRequested",
        "cudnn_conv_algo_search": "HEURISTIC",
    }


def test_tensorrt_chain_puts_tensorrt_then_cuda_then_cpu(tmp_path: Path) -> None:
    config = RuntimeConfig(device=CUDA, trt=True, fp16=True)
    chain = provider_chain(config, stream=7, tensorrt=True, trt_cache_dir=tmp_path)
    assert chain == [
        (
            "TensorrtExecutionProvider",
            {
                "device_id": "1",
                "trt_fp16_enable": "True",
                "trt_engine_cache_enable": "True",
                "trt_engine_cache_path": str(tmp_path),
                "trt_timing_cache_enable": "True",
                "trt_timing_cache_path": str(tmp_path),
                "trt_max_workspace_size": str(4 << 30),
                # The Python API rejects has_user_compute_stream for TensorRT.
                "user_compute_stream": "7",
            },
        ),
        ("CUDAExecutionProvider", cuda_options(config, 7)),
        "CPUExecutionProvider",
    ]


def test_cpu_chain_is_cpu_alone() -> None:
    assert provider_chain(RuntimeConfig()) == ["CPUExecutionProvider"]


def test_cuda_without_its_provider_is_a_clear_error() -> None:
    with pytest.raises(DeviceUnavailable, match="install onnxruntime-gpu"):
        check_device(CUDA, ["CPUExecutionProvider"])
    check_device(Device(), ["CPUExecutionProvider"])  # CPU needs nothing more


def test_tensorrt_fallback_says_so_once(caplog: pytest.LogCaptureFixture) -> None:
    config = RuntimeConfig(device=CUDA, trt=True)
    with caplog.at_level(logging.WARNING, logger="batchserve.runtime"):
        assert not use_tensorrt(config, ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert [r.getMessage() for r in caplog.records] == [
        f"{TRT_MISSING}: not in this onnxruntime build"
    ]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="batchserve.runtime"):
        assert use_tensorrt(config, ["TensorrtExecutionProvider", "CUDAExecutionProvider"])
        assert not use_tensorrt(RuntimeConfig(device=CUDA), ["CUDAExecutionProvider"])
    assert caplog.records == []


# -- configuration and flags ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"trt": True}, "trt needs a CUDA device"),
        ({"cuda_graphs": True}, "cuda_graphs needs a CUDA device"),
        ({"gpu_mem_limit_mb": 64}, "gpu_mem_limit_mb needs a CUDA device"),
        ({"device": CUDA, "cuda_graphs": True, "io_binding": False}, "needs I/O binding"),
        ({"device": CUDA, "gpu_mem_limit_mb": -1}, "gpu_mem_limit_mb must be >= 0"),
    ],
)
def test_runtime_config_refuses_what_cannot_work(settings: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RuntimeConfig(**settings)  # type: ignore[arg-type]


def test_io_binding_auto_is_on_for_cuda_only() -> None:
    assert RuntimeConfig(device=CUDA).resolved_io_binding()
    assert not RuntimeConfig().resolved_io_binding()
    assert RuntimeConfig(io_binding=True).resolved_io_binding()
    assert not RuntimeConfig(device=CUDA, io_binding=False).resolved_io_binding()


def test_trt_on_cpu_is_a_usage_error(mlp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", str(mlp_path), "--trt"]) == 2
    assert "batchserve: error: trt needs a CUDA device" in capsys.readouterr().err


def test_gpu_flags_parse() -> None:
    flags = ["--device", "cuda:1", "--io-binding", "off", "--trt", "--fp16", "--cuda-graphs"]
    paths = ["--trt-cache-dir", "/c/trt", "--build-cache-dir", "/c", "--gpu-mem-limit-mb", "2048"]
    args = build_parser().parse_args(["serve", "m.onnx", *flags, *paths])
    assert (args.device, args.io_binding, args.trt, args.fp16) == (CUDA, "off", True, True)
    assert (args.trt_cache_dir, args.build_cache_dir) == ("/c/trt", "/c")
    assert (args.cuda_graphs, args.gpu_mem_limit_mb) == (True, 2048)
    defaults = build_parser().parse_args(["serve", "m.onnx"])
    assert (defaults.io_binding, defaults.trt, defaults.fp16, defaults.cuda_graphs) == (
        "auto",
        False,
        False,
        False,
    )
    assert (defaults.trt_cache_dir, defaults.build_cache_dir, defaults.gpu_mem_limit_mb) == (
        None,
        None,
        0,
    )


def test_gpu_flags_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {
        "IO_BINDING": "on",
        "TRT": "1",
        "FP16": "true",
        "TRT_CACHE_DIR": "/e/trt",
        "BUILD_CACHE_DIR": "/e",
        "CUDA_GRAPHS": "yes",
        "GPU_MEM_LIMIT_MB": "1024",
    }.items():
        monkeypatch.setenv(f"BATCHSERVE_{name}", value)
    args = build_parser().parse_args(["serve", "m.onnx"])
    assert (args.io_binding, args.trt, args.fp16, args.cuda_graphs) == ("on", True, True, True)
    assert (args.trt_cache_dir, args.build_cache_dir, args.gpu_mem_limit_mb) == (
        "/e/trt",
        "/e",
        1024,
    )


def test_cuda_graphs_on_cpu_is_refused_by_the_command(mlp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "batchserve", "serve", str(mlp_path), "--port", "0"],
        env={"BATCHSERVE_CUDA_GRAPHS": "1", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "cuda_graphs needs a CUDA device" in done.stderr


# -- I/O binding on CPU ----------------------------------------------------------------------


def test_bucket_rows_are_powers_of_two() -> None:
    assert [bucket_rows(n) for n in (0, 1, 2, 3, 4, 5, 64, 65)] == [1, 1, 2, 4, 4, 8, 64, 128]


def test_output_buffers_are_reused_only_when_no_view_is_left() -> None:
    buffers = OutputBuffers(per_size=2)
    dtype = np.dtype(np.float32)
    first = buffers.lend(dtype, (3, 4))
    address = first.ctypes.data
    row = first[1:2]  # what a request's answer holds
    del first
    second = buffers.lend(dtype, (4, 4))  # same size class, but `row` still uses the first
    assert second.ctypes.data != address
    third = buffers.lend(dtype, (4, 4))  # both pooled buffers lent: a fresh, unpooled array
    assert buffers.unpooled == 1
    assert third.ctypes.data not in (address, second.ctypes.data)
    del row
    assert buffers.lend(dtype, (4, 4)).ctypes.data == address
    assert buffers.buffers == 2


def test_cpu_binding_matches_a_plain_run_across_batch_sizes(mlp_path: Path) -> None:
    session = plain_session(mlp_path)
    metadata = ModelMetadata.from_session(session)
    binding = CpuBinding(session, metadata)
    kept = []  # every answer stays referenced, as while a response is being encoded
    for step, rows in enumerate([1, 3, 8, 5, 64, 2, 3, 33, 1, 7, 7, 7]):
        x = rows_of(rows, step)
        (out,) = binding.run([x])
        (expected,) = session.run(None, {"input": x})
        np.testing.assert_array_equal(out, expected)
        kept.append((out[: rows // 2 + 1], expected[: rows // 2 + 1]))
    for view, expected in kept:  # no later batch wrote into an earlier batch's answer
        np.testing.assert_array_equal(view, expected)
    stats = binding.statistics()
    assert stats.runs == 12
    assert stats.buffers + stats.unpooled >= 4


def test_cpu_binding_reuses_buffers_once_answers_are_gone(mlp_path: Path) -> None:
    session = plain_session(mlp_path)
    binding = CpuBinding(session, ModelMetadata.from_session(session))
    for step in range(50):
        (out,) = binding.run([rows_of(8, step)])
        del out
    assert binding.statistics().buffers == 1


def test_cpu_binding_with_fixed_shapes_and_several_outputs(
    fixed_path: Path, two_inputs_path: Path
) -> None:
    fixed = plain_session(fixed_path)
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    (y,) = CpuBinding(fixed, ModelMetadata.from_session(fixed)).run([x])
    np.testing.assert_array_equal(y, 2 * x)

    two = plain_session(two_inputs_path)
    binding = CpuBinding(two, ModelMetadata.from_session(two))
    for rows in (1, 4, 3):
        a = np.random.default_rng(rows).standard_normal((rows, 3), dtype=np.float32)
        b = np.arange(rows * 2, dtype=np.int64).reshape(rows, 2)
        total, twice = binding.run([a, b])
        expected = two.run(None, {"a": a, "b": b})
        np.testing.assert_array_equal(total, expected[0])
        np.testing.assert_array_equal(twice, expected[1])
        assert twice.dtype == np.int64


def test_cpu_binding_with_outputs_only_the_run_can_size(variable_path: Path) -> None:
    session = plain_session(variable_path)
    binding = CpuBinding(session, ModelMetadata.from_session(session))
    earlier = []
    for n in (2, 5, 3):
        x = rows_of(4, n, width=n)
        (y,) = binding.run([x])
        earlier.append((y, 3 * x))
    for y, expected in earlier:  # ORT-allocated outputs stay valid after later runs
        np.testing.assert_array_equal(y, expected)


async def test_engine_with_io_binding_never_mixes_up_answers(mlp_path: Path) -> None:
    session = plain_session(mlp_path)
    requests = [rows_of(1 + i % 4, i) for i in range(300)]
    expected = [session.run(None, {"input": x})[0] for x in requests]
    batch = BatchConfig(max_batch_size=16, max_latency_ms=1.0)
    runtime = RuntimeConfig(instances=3, intra_op_threads=1, io_binding=True)
    async with Engine(mlp_path, batch, runtime) as engine:
        answers = await asyncio.gather(*(engine.infer({"input": x}) for x in requests))
        stats = engine.statistics()
    assert stats.batcher.batches < len(requests)  # requests really shared runs
    for answer, want in zip(answers, expected, strict=True):
        # Batches of other sizes may round differently in the last bit; another request's row
        # would differ completely.
        np.testing.assert_allclose(answer["probabilities"], want, rtol=1e-5, atol=1e-7)


async def test_bound_sessions_are_released_when_the_pool_closes(mlp_path: Path) -> None:
    sessions, metadata = SessionBuilder(
        mlp_path, RuntimeConfig(instances=2, io_binding=True)
    ).load()
    assert all(isinstance(s, ManagedSession) for s in sessions)
    assert all(isinstance(s.binding, CpuBinding) for s in sessions)
    async with SessionPool(sessions, metadata.input_names) as pool:
        await pool.run_each([rows_of(2, 0)])
    assert all(s.session is None for s in sessions)


def test_default_cpu_sessions_stay_plain(mlp_path: Path) -> None:
    sessions, _ = SessionBuilder(mlp_path, RuntimeConfig()).load()
    assert all(type(s) is ort.InferenceSession for s in sessions)


# -- FP16 ----------------------------------------------------------------------------------


def test_fp16_conversion_is_close_cached_and_said(
    mlp_path: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = RuntimeConfig(fp16=True, build_cache_dir=str(tmp_path))
    x = rows_of(16, 3)
    (reference,) = plain_session(mlp_path).run(None, {"input": x})
    with caplog.at_level(logging.INFO, logger="batchserve.runtime"):
        builder = SessionBuilder(mlp_path, config)
        (session,), metadata = builder.load()
    assert [r.getMessage() for r in caplog.records if "FP16" in r.getMessage()] == [
        f"converted {mlp_path} to FP16 (inputs and outputs stay FP32), cached at "
        f"{tmp_path / 'fp16' / (builder.digest + '.onnx')}"
    ]
    assert metadata.inputs[0].datatype == "FP32"  # clients see the same model
    (half,) = session.run(None, {"input": x})
    assert half.dtype == np.float32
    assert not np.array_equal(half, reference)  # it really runs in half precision
    np.testing.assert_allclose(half, reference, atol=2e-3)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="batchserve.runtime"):
        SessionBuilder(mlp_path, config).load()  # a restart
    assert any("using the FP16 conversion" in r.getMessage() for r in caplog.records)
    assert not any(r.getMessage().startswith("converted") for r in caplog.records)


def test_fp16_without_the_converter_is_a_clear_error(
    mlp_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "onnxconverter_common", None)  # as if not installed
    config = RuntimeConfig(fp16=True, build_cache_dir=str(tmp_path))
    with pytest.raises(ModelLoadError, match=r"pip install 'batchserve\[gpu\]'"):
        SessionBuilder(mlp_path, config).load()


# -- CUDA ----------------------------------------------------------------------------------


@pytest.mark.skipif(HAS_CUDA, reason="checks the error a machine without CUDA gives")
def test_streams_without_cuda_are_a_clear_error() -> None:
    with pytest.raises(DeviceUnavailable, match="CUDA"):
        CudaStream(CudaRuntime(), 0)


@needs_cuda
def test_each_session_gets_its_own_stream_and_releases_it() -> None:
    runtime = CudaRuntime()
    streams = [CudaStream(runtime, 0) for _ in range(3)]
    assert len({s.handle for s in streams}) == 3
    assert all(s.handle for s in streams)
    for stream in streams:
        stream.close()
        assert stream.handle == 0


@needs_cuda
@pytest.mark.parametrize("graphs", [False, True], ids=["binding", "cuda-graphs"])
async def test_cuda_engine_answers_like_the_cpu(mlp_path: Path, graphs: bool) -> None:
    session = plain_session(mlp_path)
    # 40 rows: over the largest batch, so it runs alone, in a bucket without a graph.
    requests = [rows_of(1 + i % 5, i) for i in range(64)] + [rows_of(40, 99)]
    expected = [session.run(None, {"input": x})[0] for x in requests]
    runtime = RuntimeConfig(instances=2, device=Device("cuda", 0), cuda_graphs=graphs)
    async with Engine(mlp_path, BatchConfig(max_batch_size=16), runtime) as engine:
        answers = await asyncio.gather(*(engine.infer({"input": x}) for x in requests))
        assert engine.statistics().pool.failures == 0
    for answer, want in zip(answers, expected, strict=True):
        np.testing.assert_allclose(answer["probabilities"], want, rtol=1e-3, atol=1e-5)


@needs_cuda
async def test_cuda_graphs_are_captured_at_load_for_every_bucket_and_never_later(
    mlp_path: Path,
) -> None:
    runtime = RuntimeConfig(instances=2, device=Device("cuda", 0), cuda_graphs=True)
    async with Engine(mlp_path, BatchConfig(max_batch_size=12), runtime) as engine:
        sessions = [slot.session for slot in engine._pool._slots]  # type: ignore[union-attr]
        bindings = [s.binding for s in sessions]
        assert all(isinstance(b, CudaBinding) for b in bindings)
        assert [b.graphs() for b in bindings] == [[1, 2, 4, 8, 16]] * 2
        await asyncio.gather(*(engine.infer({"input": rows_of(n, n)}) for n in (3, 30, 1)))
        assert [b.graphs() for b in bindings] == [[1, 2, 4, 8, 16]] * 2  # 30 rows: no capture


@needs_cuda
def test_tensorrt_fallback_is_logged_once_per_load(
    mlp_path: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = RuntimeConfig(
        instances=3, device=Device("cuda", 0), trt=True, build_cache_dir=str(tmp_path)
    )
    with caplog.at_level(logging.WARNING, logger="batchserve.runtime"):
        sessions, _ = SessionBuilder(mlp_path, config).load()
    firsts = {s.get_providers()[0] for s in sessions}
    warned = [r.getMessage() for r in caplog.records if r.getMessage().startswith(TRT_MISSING)]
    if firsts == {"TensorrtExecutionProvider"}:
        assert warned == []  # TensorRT's libraries are installed: it really runs
    else:
        assert firsts == {"CUDAExecutionProvider"}
        assert len(warned) == 1, warned
