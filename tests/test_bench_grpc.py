"""`batchserve bench` over gRPC: unary ModelInfer calls and ModelStreamInfer streams, open and
closed loop, against real servers with gRPC on ephemeral ports (in-process, or a `batchserve
serve` process), reported as the HTTP modes report."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import numpy as np
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from batchserve import Engine
from batchserve.bench.errors import BenchError
from batchserve.bench.grpc_client import (
    STREAM_ERROR,
    GrpcTarget,
    StreamClient,
    UnaryClient,
    call_metadata,
    parse_target,
    stream_status,
)
from batchserve.bench.measure import choose_protocol
from batchserve.bench.workload import Workload, build_workload

from helpers import ServerProcess, StartServer, StartServerProcess, wait_until

CLI = [sys.executable, "-m", "batchserve"]
SHORT = ("--duration", "1", "--warmup", "0.3")
SERVICE = "inference.GRPCInferenceService"

# --------------------------------------------------------------------------------------------
# targets, metadata, statuses


def test_parse_target() -> None:
    assert parse_target("grpc://127.0.0.1:9001") == GrpcTarget("127.0.0.1:9001")
    assert parse_target("127.0.0.1:9001") == GrpcTarget("127.0.0.1:9001")
    assert parse_target("grpcs://models.example") == GrpcTarget("models.example:8001", tls=True)
    assert parse_target("grpc://[::1]:9001").address == "[::1]:9001"
    assert parse_target("grpc://h:9001").url == "grpc://h:9001"


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:8001", "grpc://:9001", "grpc://h:9001/v2", "grpc://h:99999"]
)
def test_parse_target_rejects(url: str) -> None:
    with pytest.raises(BenchError, match="grpc://HOST:PORT"):
        parse_target(url)


def test_headers_become_lower_case_metadata() -> None:
    headers = {"Authorization": "Bearer k", "X-Trace": "1"}
    assert call_metadata(headers) == (("authorization", "Bearer k"), ("x-trace", "1"))


@pytest.mark.parametrize("name", ["grpc-timeout", "Content-Type", "te", "x-data-bin", "a!b"])
def test_headers_gRPC_sets_or_cannot_carry_are_refused(name: str) -> None:
    with pytest.raises(BenchError):
        call_metadata({name: "v"})


def test_stream_status() -> None:
    assert stream_status("") == "OK"
    assert stream_status("NOT_FOUND: unknown model 'x'") == "NOT_FOUND"
    assert stream_status("input 'x': shape [1, 3] does not fit") == STREAM_ERROR
    assert stream_status("OK: odd") == STREAM_ERROR


def test_choose_protocol() -> None:
    assert choose_protocol("http://h:8000", None, False) == "http"
    assert choose_protocol("grpc://h:8001", None, False) == "grpc"
    assert choose_protocol("grpcs://h", None, True) == "grpc-stream"
    assert choose_protocol("h:8001", "grpc", True) == "grpc-stream"
    with pytest.raises(BenchError, match="--protocol grpc"):
        choose_protocol("http://h:8000", None, True)


# --------------------------------------------------------------------------------------------
# the clients against an in-process server


async def mlp_workload(port: int, metadata: tuple[tuple[str, str], ...] = ()) -> Workload:
    """The bench's own workload for the served mlp, shaped by a raw ModelMetadata stub call."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        request = service_pb2.ModelMetadataRequest(name="mlp")
        answer = await stub.ModelMetadata(request, metadata=metadata)
    inputs = [
        {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in answer.inputs
    ]
    return build_workload(f"grpc://127.0.0.1:{port}", "mlp", {"inputs": inputs}, protocol="grpc")


@pytest.fixture
async def mlp_grpc(start_server: StartServer, mlp_path: Path) -> int:
    server = await start_server(Engine(mlp_path), grpc_port=0)
    return server.grpc_port


@pytest.mark.parametrize("kind", [UnaryClient, StreamClient])
async def test_a_client_sends_the_workload_and_counts_statuses(
    mlp_grpc: int, kind: type[UnaryClient | StreamClient]
) -> None:
    workload = await mlp_workload(mlp_grpc)
    request = service_pb2.ModelInferRequest.FromString(workload.body(0).raw)
    request.model_name = "nope"
    target = GrpcTarget(f"127.0.0.1:{mlp_grpc}")
    async with asyncio.timeout(30), kind(target, (), 8, timeout_s=10) as client:
        assert await client.post(workload.body(0).raw) == "OK"
        statuses = await asyncio.gather(*(client.post(workload.body(i).raw) for i in range(32)))
        assert statuses == ["OK"] * 32  # 8 in flight at most, the rest waiting for a slot
        refused = await client.post(request.SerializeToString())
        # A unary call ends with its code; a stream answers the error in the stream.
        assert refused == ("NOT_FOUND" if kind is UnaryClient else STREAM_ERROR)
        assert await client.post(workload.body(1).raw) == "OK"  # the stream goes on


@pytest.mark.parametrize("kind", [UnaryClient, StreamClient])
async def test_the_api_key_goes_as_metadata(
    start_server: StartServer, mlp_path: Path, kind: type[UnaryClient | StreamClient]
) -> None:
    server = await start_server(Engine(mlp_path), grpc_port=0, api_key="sesame")
    key = call_metadata({"Authorization": "Bearer sesame"})
    raw = (await mlp_workload(server.grpc_port, key)).body(0).raw
    target = GrpcTarget(f"127.0.0.1:{server.grpc_port}")
    async with asyncio.timeout(30):
        async with kind(target, (), 2, timeout_s=10) as client:
            assert await client.post(raw) == "UNAUTHENTICATED"
        async with kind(target, key, 2, timeout_s=10) as client:
            assert await client.post(raw) == "OK"


class SilentServer:
    """A gRPC server whose ModelInfer and ModelStreamInfer never answer; it records the calls
    that the client cancelled (a stream given up on must be dropped, not reused)."""

    def __init__(self) -> None:
        self.cancelled = 0

    async def _never(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        await self._wait()
        return b""

    async def _never_stream(
        self, requests: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        await self._wait()
        yield b""

    async def _wait(self) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise

    async def __aenter__(self) -> GrpcTarget:
        self._server = grpc.aio.server()
        handlers = {
            "ModelInfer": grpc.unary_unary_rpc_method_handler(self._never),
            "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(self._never_stream),
        }
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, handlers),)
        )
        port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()
        return GrpcTarget(f"127.0.0.1:{port}")

    async def __aexit__(self, *exc: object) -> None:
        await self._server.stop(grace=None)


@pytest.mark.parametrize("kind", [UnaryClient, StreamClient])
async def test_a_request_past_its_deadline_is_deadline_exceeded(
    kind: type[UnaryClient | StreamClient],
) -> None:
    silent = SilentServer()
    async with asyncio.timeout(30), silent as target, kind(target, (), 1, timeout_s=0.3) as client:
        # The behaviour is the status; asyncio.timeout(30) above only names a hang.
        assert await client.post(b"") == "DEADLINE_EXCEEDED"
        # The server saw the call end: a deadline for a unary call, a cancelled stream.
        await wait_until(lambda: silent.cancelled == 1, "the call withdrawn on the server")
        assert await client.post(b"") == "DEADLINE_EXCEEDED"  # on a new stream
        await wait_until(lambda: silent.cancelled == 2, "the second call withdrawn")


async def test_connection_refused_is_unavailable() -> None:
    with socket.socket() as held:  # bound, never listening: connecting is refused
        held.bind(("127.0.0.1", 0))
        target = GrpcTarget(f"127.0.0.1:{held.getsockname()[1]}")
        async with asyncio.timeout(30), UnaryClient(target, (), 1, timeout_s=10) as client:
            assert await client.post(b"") == "UNAVAILABLE"


# --------------------------------------------------------------------------------------------
# the command against a `batchserve serve` process


@pytest.fixture(scope="module")
def grpc_server(tmp_path_factory: pytest.TempPathFactory, mlp_path: Path) -> Iterator[str]:
    server = ServerProcess.start(str(mlp_path), log_dir=tmp_path_factory.mktemp("s"), grpc=True)
    yield f"grpc://127.0.0.1:{server.grpc_port}"
    server.stop()


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


def bench_json(tmp_path: Path, *args: str) -> dict[str, Any]:
    out = tmp_path / "out.json"
    done = run_cli("bench", *args, "--json", str(out))
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def one_error_line(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 2, (done.returncode, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


def assert_clean(report: dict[str, Any]) -> None:
    assert report["achieved_rps"] > 0
    assert report["ok"] == report["requests"] > 0
    assert report["errors_by_status"] == {}
    assert report["errors_by_exception"] == {}


STREAMING = pytest.mark.parametrize(
    ("flags", "protocol"),
    [((), "grpc"), (("--streaming",), "grpc-stream")],
    ids=["unary", "stream"],
)


@pytest.mark.slow
@STREAMING
def test_closed_loop(
    tmp_path: Path, grpc_server: str, flags: tuple[str, ...], protocol: str
) -> None:
    out = bench_json(tmp_path, grpc_server, "-m", "mlp", "--concurrency", "4", *flags, *SHORT)
    assert out["protocol"] == protocol
    assert out["binary"] is True
    report = out["report"]
    assert_clean(report)
    assert report["mode"] == "closed"
    assert report["concurrency"] == 4
    # from the ModelStatistics RPC, before and after the run
    assert report["server"]["runs"] > 0
    assert report["server"]["mean_batch_rows"] >= 1


@pytest.mark.slow
@STREAMING
def test_open_loop(tmp_path: Path, grpc_server: str, flags: tuple[str, ...], protocol: str) -> None:
    out = bench_json(tmp_path, grpc_server, "-m", "mlp", "--rate", "200", *flags, *SHORT)
    report = out["report"]
    assert_clean(report)
    assert report["mode"] == "open"
    assert 190 <= report["requests"] <= 210  # 1 s at 200 req/s on a constant schedule


@pytest.mark.slow
@STREAMING
def test_several_processes(
    tmp_path: Path, grpc_server: str, flags: tuple[str, ...], protocol: str
) -> None:
    address = grpc_server.removeprefix("grpc://")  # a bare HOST:PORT with --protocol grpc
    out = bench_json(
        tmp_path, address, "--protocol", "grpc", "-m", "mlp", "--concurrency", "4",
        "--processes", "2", "--rows", "3", *flags, *SHORT,
    )  # fmt: skip
    assert out["protocol"] == protocol
    assert out["report"]["processes"] == 2
    assert_clean(out["report"])


@pytest.mark.slow
@pytest.mark.parametrize(
    ("flags", "status"), [((), "INVALID_ARGUMENT"), (("--streaming",), STREAM_ERROR)]
)
def test_refusals_are_counted_by_status_code_name(
    tmp_path: Path, grpc_server: str, flags: tuple[str, ...], status: str
) -> None:
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((1, 63), np.float32))  # mlp takes 64 features
    out = bench_json(
        tmp_path, grpc_server, "-m", "mlp", "--input", str(bad), "--concurrency", "2",
        "--duration", "0.5", "--warmup", "0", *flags,
    )  # fmt: skip
    report = out["report"]
    assert report["ok"] == 0
    assert report["errors_by_status"] == {status: report["requests"]}
    assert report["errors_by_exception"] == {}
    assert "p50" in report["refused_latency_ms"]  # the refusals were timed, apart from the 200s


@pytest.mark.slow
def test_an_unknown_model_is_one_line(grpc_server: str) -> None:
    line = one_error_line(run_cli("bench", grpc_server, "-m", "nope", *SHORT))
    assert "NOT_FOUND" in line


@pytest.mark.slow
def test_the_api_key_reaches_metadata_statistics_and_calls(
    tmp_path: Path, serve_process: StartServerProcess, mlp_path: Path
) -> None:
    server = serve_process(str(mlp_path), "--api-key", "sesame", grpc=True)
    url = f"grpc://127.0.0.1:{server.grpc_port}"
    line = one_error_line(run_cli("bench", url, "-m", "mlp", *SHORT))
    assert "UNAUTHENTICATED" in line
    out = bench_json(tmp_path, url, "-m", "mlp", "--api-key", "sesame", "--streaming", *SHORT)
    assert_clean(out["report"])
    assert out["report"]["server"]["runs"] > 0


def test_streaming_over_http_is_refused() -> None:
    line = one_error_line(run_cli("bench", "http://127.0.0.1:1", "-m", "m", "--streaming"))
    assert "--protocol grpc" in line


@pytest.mark.slow
@pytest.mark.parametrize("flags", [(), ("--streaming",)], ids=["unary", "stream"])
def test_noop(tmp_path: Path, flags: tuple[str, ...]) -> None:
    out = bench_json(tmp_path, "--noop", "--protocol", "grpc", "--concurrency", "2", *flags, *SHORT)
    assert out["url"].startswith("grpc://")
    assert_clean(out["report"])
    assert out["report"]["server"] == {}  # the no-op server has no ModelStatistics
