"""The `batchserve` command as a real subprocess: serve, answer, drain on SIGTERM, clear errors."""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import re
import subprocess
from pathlib import Path

import aiohttp
import numpy as np
import onnxruntime as ort
import pytest

from batchserve.app import build_server
from batchserve.cli import build_parser
from batchserve.config import ServerConfig
from batchserve.settings import ServeSettings

from helpers import CLI, StartServerProcess, run_cli, wait_until

README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.mark.slow
async def test_serve_infer_and_exit_cleanly_on_sigterm(
    serve_process: StartServerProcess, mlp_path: Path
) -> None:
    server = serve_process(
        str(mlp_path), "--name", "clf", "--max-batch-size", "16", "--instances", "2"
    )
    x = np.random.default_rng(9).standard_normal((2, 64)).astype(np.float32)
    body = {
        "inputs": [
            {"name": "input", "shape": [2, 64], "datatype": "FP32", "data": x.ravel().tolist()}
        ]
    }
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{server.url}/v2/models/clf/infer", json=body) as r,
    ):
        assert r.status == 200
        answer = await r.json()
    expected = ort.InferenceSession(str(mlp_path)).run(None, {"input": x})[0]
    got = np.array(answer["outputs"][0]["data"], dtype=np.float32).reshape(2, 10)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert await asyncio.to_thread(server.stop) == 0
    assert "stopped" in server.log


@pytest.mark.slow
async def test_sigterm_finishes_in_flight_requests(
    serve_process: StartServerProcess, slow_path: Path
) -> None:
    server = serve_process(str(slow_path), "--name", "slow", "--max-batch-size", "4096")
    x = np.zeros((2048, 1024), dtype=np.float32)
    header = (
        b'{"inputs":[{"name":"x","shape":[2048,1024],"datatype":"FP32",'
        b'"parameters":{"binary_data_size":%d}}]}' % x.nbytes
    )
    headers = {"Inference-Header-Content-Length": str(len(header))}
    async with aiohttp.ClientSession() as http:
        request = asyncio.create_task(
            http.post(
                f"{server.url}/v2/models/slow/infer",
                data=io.BytesIO(header + x.tobytes()),
                headers=headers,
            )
        )

        async def in_flight() -> bool:  # the request is being served when the signal lands
            async with http.get(f"{server.url}/metrics") as r:
                return "batchserve_in_flight_requests 1.0" in await r.text()

        await wait_until(in_flight, "the request to reach its handler")
        stopping = asyncio.create_task(asyncio.to_thread(server.stop))
        response = await request
        assert response.status == 200
        assert (await response.json())["outputs"][0]["shape"] == [2048, 1024]
        assert await stopping == 0


@pytest.mark.slow
def test_missing_model_is_one_line_and_exit_2(tmp_path: Path) -> None:
    result = run_cli("serve", str(tmp_path / "absent.onnx"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"batchserve: error: model file not found: {tmp_path / 'absent.onnx'}"
    ]


@pytest.mark.slow
def test_non_onnx_file_is_one_line_and_exit_2(tmp_path: Path) -> None:
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00\x01 definitely not protobuf")
    result = run_cli("serve", str(junk), "--log-level", "error")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"batchserve: error: {junk} is not a valid ONNX model")
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_unreadable_model_path_is_one_line_and_exit_2(tmp_path: Path) -> None:
    result = run_cli("serve", str(tmp_path))  # a directory cannot be read as a model
    assert result.returncode == 2
    assert result.stderr.strip() == f"batchserve: error: model path is not a file: {tmp_path}"
    if os.geteuid() != 0:  # root reads files whatever their mode
        locked = tmp_path / "locked.onnx"
        locked.write_bytes(b"x")
        locked.chmod(0)
        result = run_cli("serve", str(locked))
        assert result.returncode == 2
        assert "cannot read model file" in result.stderr


@pytest.mark.skipif(
    "CUDAExecutionProvider" in ort.get_available_providers(),
    reason="this ONNX Runtime has CUDA; the error path needs a CPU-only build",
)
@pytest.mark.slow
def test_cuda_without_provider_is_one_line_and_exit_2(mlp_path: Path) -> None:
    result = run_cli("serve", str(mlp_path), "--device", "cuda:0")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "needs ONNX Runtime's CUDAExecutionProvider" in lines[0]


@pytest.mark.slow
def test_bad_flag_values_exit_2() -> None:
    result = run_cli("serve", "m.onnx", "--device", "tpu")
    assert result.returncode == 2
    assert "device must be 'cpu' or 'cuda[:N]'" in result.stderr
    result = run_cli("serve", "m.onnx", "--max-batch-size", "0")
    assert result.returncode == 2
    assert result.stderr.strip() == "batchserve: error: max_batch_size must be > 0, got 0"


@pytest.mark.slow
def test_environment_variables_set_flags(mlp_path: Path) -> None:
    env = {**os.environ, "BATCHSERVE_MAX_BATCH_SIZE": "0"}
    result = subprocess.run(
        [*CLI, "serve", str(mlp_path)], capture_output=True, text=True, timeout=60, env=env
    )
    assert result.returncode == 2
    assert "max_batch_size must be > 0" in result.stderr


@pytest.mark.slow
def test_example_model_command_writes_a_servable_model(tmp_path: Path) -> None:
    result = run_cli("example-model", "mlp", "-o", str(tmp_path / "m" / "mlp.onnx"))
    assert result.returncode == 0, result.stderr
    session = ort.InferenceSession(str(tmp_path / "m" / "mlp.onnx"))
    assert [i.name for i in session.get_inputs()] == ["input"]
    result = run_cli("example-model", "nope", "-o", str(tmp_path / "x.onnx"))
    assert result.returncode == 2
    assert "unknown example model 'nope'" in result.stderr


@pytest.mark.slow
def test_invalid_environment_values_are_one_line_naming_the_variable(mlp_path: Path) -> None:
    env = {**os.environ, "BATCHSERVE_DEVICE": "gpu"}
    result = subprocess.run(
        [*CLI, "serve", str(mlp_path)], capture_output=True, text=True, timeout=60, env=env
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "device must be 'cpu' or 'cuda[:N]', got 'gpu'" in result.stderr
    env = {**os.environ, "BATCHSERVE_MAX_BATCH_SIZE": "abc"}
    result = subprocess.run(
        [*CLI, "serve", str(mlp_path)], capture_output=True, text=True, timeout=60, env=env
    )
    assert result.returncode == 2
    assert result.stderr.strip() == "batchserve: error: BATCHSERVE_MAX_BATCH_SIZE='abc' is invalid"


def _one_model_repository(root: Path, model: Path) -> str:
    version = root / "repo" / "m" / "1"
    version.mkdir(parents=True)
    (version / "model.onnx").write_bytes(model.read_bytes())
    return str(root / "repo")


@pytest.mark.slow
async def test_workers_refuse_the_repository_api_they_cannot_apply_to_each_other(
    serve_process: StartServerProcess, mlp_path: Path, tmp_path: Path
) -> None:
    server = serve_process(
        "--model-repository", _one_model_repository(tmp_path, mlp_path), "--workers", "2"
    )
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{server.url}/v2/repository/models/m/unload") as r:
            assert r.status == 409
            assert "--repository-poll-s" in (await r.json())["error"]
        async with http.get(f"{server.url}/v2/models/m/ready") as r:
            assert r.status == 200  # still served by every worker
    assert server.stop() == 0


async def test_build_server_serves_what_the_settings_describe(mlp_path: Path) -> None:
    settings = ServeSettings(
        model=str(mlp_path), name="clf", server=ServerConfig(port=0, grpc_port=None)
    )
    body = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0.0] * 64}]}
    async with (
        build_server(settings) as server,
        aiohttp.ClientSession() as http,
        http.post(f"{server.url}/v2/models/clf/infer", json=body) as r,
    ):
        assert r.status == 200
        assert (await r.json())["outputs"][0]["shape"] == [1, 10]


def _serve_parser(monkeypatch: pytest.MonkeyPatch) -> argparse.ArgumentParser:
    for name in [name for name in os.environ if name.startswith("BATCHSERVE_")]:
        monkeypatch.delenv(name)
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    parser: argparse.ArgumentParser = commands.choices["serve"]
    return parser


def _readme_flag_rows() -> list[tuple[list[str], str, str]]:
    """(flags, default, description) of each row of the README's `serve` flag table."""
    section = README.read_text().split("## Serve a model", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        if line.startswith("| `--"):
            names, default, what = (cell.strip() for cell in line.strip().strip("|").split(" | "))
            rows.append((re.findall(r"`(--[a-z0-9-]+)", names), default, what))
    return rows


DESCRIBED = object()  # a default the README describes in words rather than states


def _stated(text: str) -> object:
    number = re.fullmatch(r"`?(\d[\d,]*(?:\.\d+)?)`?(?: \(.*\))?", text)
    if number:
        return float(number.group(1).replace(",", ""))
    if text in ("off", "none"):
        return {"off": False, "none": None}[text]
    word = re.fullmatch(r"`([^`]+)`", text)
    return word.group(1) if word else DESCRIBED


def test_readme_flag_table_matches_the_parser(monkeypatch: pytest.MonkeyPatch) -> None:
    parser = _serve_parser(monkeypatch)
    visible = {
        option: action
        for action in parser._actions
        if action.help != argparse.SUPPRESS and action.dest != "help"
        for option in action.option_strings
    }
    rows = _readme_flag_rows()
    table = " ".join(" ".join(names) + " " + what for names, _, what in rows)
    assert set(re.findall(r"--[a-z0-9-]+", table)) >= set(visible), "a flag the README omits"
    help_text = parser.format_help()
    described = set()
    for names, default, _ in rows:
        defaults = default.split(", ") if len(names) > 1 else [default]
        assert len(defaults) == len(names), names
        for name, text in zip(names, defaults, strict=True):
            assert name in visible, f"{name} is in the README but not a serve flag"
            assert name in help_text
            stated, actual = _stated(text), visible[name].default
            if stated is DESCRIBED or (isinstance(stated, str) and actual is None):
                described.add(name)  # e.g. a path named after another setting
            elif isinstance(stated, float):
                assert not isinstance(actual, bool), name
                assert float(actual) == stated, name
            elif isinstance(stated, str):
                assert str(actual) == stated, name
            else:
                assert actual is stated, name
    # Defaults that depend on other settings or on the host, explained in words; any other
    # README default is stated and must be the parser's.
    assert described == {
        "--name", "--trt-cache-dir", "--build-cache-dir", "--max-active-requests",
        "--max-connections",
    }  # fmt: skip
