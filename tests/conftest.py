from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path

import aiohttp
import pytest

from batchserve import Engine, ServerConfig
from batchserve.app import Server
from batchserve.examples import write_example
from batchserve.repository import ModelRepository

import models
from helpers import RedisProcess, ServerProcess, StartServer, StartServerProcess


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def mlp_path(model_dir: Path) -> Path:
    return write_example("mlp", model_dir / "mlp.onnx")


@pytest.fixture(scope="session")
def echo_path(model_dir: Path) -> Path:
    return models.echo(model_dir / "echo.onnx")


@pytest.fixture(scope="session")
def two_inputs_path(model_dir: Path) -> Path:
    return models.two_inputs(model_dir / "two_inputs.onnx")


@pytest.fixture(scope="session")
def fixed_path(model_dir: Path) -> Path:
    return models.fixed(model_dir / "fixed.onnx")


@pytest.fixture(scope="session")
def variable_path(model_dir: Path) -> Path:
    return models.variable(model_dir / "variable.onnx")


@pytest.fixture(scope="session")
def slow_path(model_dir: Path) -> Path:
    return models.slow(model_dir / "slow.onnx")


@pytest.fixture(scope="session")
def gather_path(model_dir: Path) -> Path:
    return models.gather(model_dir / "gather.onnx")


@pytest.fixture
async def start_server() -> AsyncIterator[StartServer]:
    """Start a real server on 127.0.0.1, an ephemeral port; stopped at the end of the test.
    gRPC is off unless the test asks for it (`grpc_port=0`: an ephemeral port too)."""
    servers: list[Server] = []

    async def start(*engines: Engine, **config: object) -> Server:
        settings = {"host": "127.0.0.1", "port": 0, "grpc_port": None, **config}
        server = Server(ModelRepository(list(engines)), ServerConfig(**settings))  # type: ignore[arg-type]
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in reversed(servers):
        await server.aclose()


@pytest.fixture
def serve_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StartServerProcess]:
    """Start `batchserve serve ARGS` child processes, each returned once ready (see
    helpers.ServerProcess); any still running at the end of the test is killed by PID and
    waited for. Their logs go to a directory of their own, never into the test's tmp_path
    (which may be a model repository)."""
    logs = tmp_path_factory.mktemp("serve")
    started: list[ServerProcess] = []

    def start(
        *args: str, env: Mapping[str, str] | None = None, grpc: bool = False
    ) -> ServerProcess:
        server = ServerProcess.start(*args, log_dir=logs, env=env, grpc=grpc)
        started.append(server)
        return server

    yield start
    for server in reversed(started):
        server.kill()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisProcess]:
    binary = shutil.which("redis-server")
    if binary is None:
        if os.environ.get("BATCHSERVE_REQUIRE_REDIS"):
            pytest.fail("redis-server is required here (BATCHSERVE_REQUIRE_REDIS is set)")
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    server = RedisProcess(binary, tmp_path)
    server.start()
    yield server
    server.kill()
