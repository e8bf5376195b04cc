from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from batchserve import Engine, ServerConfig
from batchserve.app import Server
from batchserve.examples import write_example
from batchserve.repository import ModelRepository

import models


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


StartServer = Callable[..., Awaitable[Server]]


@pytest.fixture
async def start_server() -> AsyncIterator[StartServer]:
    """Start a real server on 127.0.0.1, an ephemeral port; stopped at the end of the test."""
    servers: list[Server] = []

    async def start(*engines: Engine, **config: object) -> Server:
        settings = {"host": "127.0.0.1", "port": 0, **config}
        server = Server(ModelRepository(list(engines)), ServerConfig(**settings))  # type: ignore[arg-type]
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in reversed(servers):
        await server.aclose()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


class RedisProcess:
    """A real `redis-server` on 127.0.0.1 and a free port, in a temp dir; can be killed and
    restarted on the same port to simulate an outage."""

    def __init__(self, binary: str, directory: Path) -> None:
        self.binary = binary
        self.directory = directory
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.directory), "--protected-mode", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.02)
        raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


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


async def wait_until(condition: Callable[[], object], what: str, timeout_s: float = 30.0) -> Any:
    """Poll `condition` (where no event exists to await: another process, a background write)
    until it gives a true value, which is returned; it may be a coroutine function (an HTTP
    check). A generous bound, so a machine busy with other work only makes it slower."""
    import asyncio
    import inspect

    deadline = time.monotonic() + timeout_s
    while True:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"still waiting after {timeout_s:g} s: {what}")
        await asyncio.sleep(0.005)


def wait_for_exits(pids: Iterable[int], timeout_s: float = 30.0) -> set[int]:
    """Wait, on the processes' own exit events (pidfds), until every one of `pids` has ended
    or `timeout_s` passed; returns those still running. Works for processes that are not our
    children (a killed server's workers), which `waitpid` cannot wait for."""
    import select

    fds: dict[int, int] = {}
    try:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):  # already gone
                fds[os.pidfd_open(pid)] = pid
        deadline = time.monotonic() + timeout_s
        while fds and (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select(list(fds), [], [], left)
            for fd in ready:
                fds.pop(fd)
                os.close(fd)
        return set(fds.values())
    finally:
        for fd in fds:
            os.close(fd)
