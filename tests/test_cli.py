"""The `batchserve` command as a real subprocess: serve, answer, drain on SIGTERM, clear errors."""

from __future__ import annotations

import asyncio
import io
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import numpy as np
import onnxruntime as ort
import pytest

CLI = [sys.executable, "-m", "batchserve"]


class Running:
    """A `batchserve serve` process on an ephemeral port; killed by PID if a test fails."""

    def __init__(self, *args: str) -> None:
        self.process = subprocess.Popen(
            [*CLI, "serve", *args, "--host", "127.0.0.1", "--port", "0"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.log: list[str] = []
        self.url = self._wait_for_url(timeout=60)

    def _wait_for_url(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        assert self.process.stderr is not None
        while time.monotonic() < deadline:
            line = self.process.stderr.readline()
            if not line:
                break
            self.log.append(line)
            found = re.search(r"listening on (http://\S+)", line)
            if found:
                return found.group(1)
        self.process.kill()
        raise AssertionError("server did not start:\n" + "".join(self.log))

    def stop(self, timeout: float = 30) -> int:
        self.process.send_signal(signal.SIGTERM)
        _, rest = self.process.communicate(timeout=timeout)
        self.log.append(rest)
        return self.process.returncode

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def serve() -> Iterator[type[Running]]:
    started: list[Running] = []

    class Tracked(Running):
        def __init__(self, *args: str) -> None:
            super().__init__(*args)
            started.append(self)

    yield Tracked
    for running in started:
        running.kill()


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=60)


async def test_serve_infer_and_exit_cleanly_on_sigterm(
    serve: type[Running], mlp_path: Path
) -> None:
    server = serve(str(mlp_path), "--name", "clf", "--max-batch-size", "16", "--instances", "2")
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
    assert "stopped" in "".join(server.log)


async def test_sigterm_finishes_in_flight_requests(serve: type[Running], slow_path: Path) -> None:
    server = serve(str(slow_path), "--name", "slow", "--max-batch-size", "4096")
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
        for _ in range(3000):  # bounded: until the request is being served when the signal lands
            async with http.get(f"{server.url}/metrics") as r:
                if "batchserve_in_flight_requests 1.0" in await r.text():
                    break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("the request never reached its handler")
        stopping = asyncio.create_task(asyncio.to_thread(server.stop))
        response = await request
        assert response.status == 200
        assert (await response.json())["outputs"][0]["shape"] == [2048, 1024]
        assert await stopping == 0


def test_missing_model_is_one_line_and_exit_2(tmp_path: Path) -> None:
    result = run_cli("serve", str(tmp_path / "absent.onnx"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"batchserve: error: model file not found: {tmp_path / 'absent.onnx'}"
    ]


def test_non_onnx_file_is_one_line_and_exit_2(tmp_path: Path) -> None:
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00\x01 definitely not protobuf")
    result = run_cli("serve", str(junk), "--log-level", "error")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"batchserve: error: {junk} is not a valid ONNX model")
    assert "Traceback" not in result.stderr


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
def test_cuda_without_provider_is_one_line_and_exit_2(mlp_path: Path) -> None:
    result = run_cli("serve", str(mlp_path), "--device", "cuda:0")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "needs ONNX Runtime's CUDAExecutionProvider" in lines[0]


def test_bad_flag_values_exit_2() -> None:
    result = run_cli("serve", "m.onnx", "--device", "tpu")
    assert result.returncode == 2
    assert "device must be 'cpu' or 'cuda[:N]'" in result.stderr
    result = run_cli("serve", "m.onnx", "--max-batch-size", "0")
    assert result.returncode == 2
    assert result.stderr.strip() == "batchserve: error: max_batch_size must be > 0, got 0"


def test_environment_variables_set_flags(mlp_path: Path) -> None:
    env = {**os.environ, "BATCHSERVE_MAX_BATCH_SIZE": "0"}
    result = subprocess.run(
        [*CLI, "serve", str(mlp_path)], capture_output=True, text=True, timeout=60, env=env
    )
    assert result.returncode == 2
    assert "max_batch_size must be > 0" in result.stderr


def test_example_model_command_writes_a_servable_model(tmp_path: Path) -> None:
    result = run_cli("example-model", "mlp", "-o", str(tmp_path / "m" / "mlp.onnx"))
    assert result.returncode == 0, result.stderr
    session = ort.InferenceSession(str(tmp_path / "m" / "mlp.onnx"))
    assert [i.name for i in session.get_inputs()] == ["input"]
    result = run_cli("example-model", "nope", "-o", str(tmp_path / "x.onnx"))
    assert result.returncode == 2
    assert "unknown example model 'nope'" in result.stderr


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


async def test_workers_refuse_the_repository_api_they_cannot_apply_to_each_other(
    serve: type[Running], mlp_path: Path, tmp_path: Path
) -> None:
    server = serve(
        "--model-repository", _one_model_repository(tmp_path, mlp_path), "--workers", "2"
    )
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{server.url}/v2/repository/models/m/unload") as r:
            assert r.status == 409
            assert "--repository-poll-s" in (await r.json())["error"]
        async with http.get(f"{server.url}/v2/models/m/ready") as r:
            assert r.status == 200  # still served by every worker
    assert server.stop() == 0
