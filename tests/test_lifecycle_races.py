"""Model lifecycle under concurrent changes: a load while an unload still drains (single-file
and repository directory), unloads and loads racing polls, and hot reload of files replaced
with the same size and mtime (real server on 127.0.0.1, real ONNX Runtime, real files).

Requests are held in flight by a handler that waits on a gate the test opens, so every
interleaving is driven by events, not by timing."""

from __future__ import annotations

import asyncio
import importlib
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import aiohttp
import pytest

import batchserve.repository.repository as repository_module
from batchserve import BatchConfig, CacheConfig, RuntimeConfig
from batchserve.app import Server, engine_factory
from batchserve.config import ServerConfig
from batchserve.engine import Engine
from batchserve.errors import NotReady
from batchserve.handlers.config import HandlerConfig
from batchserve.http.routes import REPOSITORY
from batchserve.repository import ModelRepository
from batchserve.repository.source import file_digest, scan_directory
from batchserve.runtime.session import model_digest

import models
from helpers import wait_until

HANDLER = """
import threading

import numpy as np

GATE = threading.Event()  # opened by the test: held requests go on
ENTERED = threading.Semaphore(0)  # one release per held request in its preprocess
HOLD_SETUP = threading.Event()  # set: loading the model waits for GATE in the handler's setup
SETUP_ENTERED = threading.Semaphore(0)


class Held:
    media_types = frozenset({"text/plain"})

    def setup(self, metadata, options):
        if HOLD_SETUP.is_set():
            SETUP_ENTERED.release()
            GATE.wait(60)

    def preprocess(self, request):
        if request.parameters.get("hold"):
            ENTERED.release()
            GATE.wait(60)
        return {"x": np.ones((1, 4), np.float32)}

    def postprocess(self, outputs, request):
        return {"y": outputs["y"][0].tolist()}
"""

HELD = 3  # requests in flight while the model is unloaded and loaded again
Serve = Callable[..., Awaitable[tuple[str, ModelRepository]]]


@pytest.fixture
def gate(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Iterator[ModuleType]:
    """The handler module (spec `lifecycle_gate:Held`), its GATE and ENTERED."""
    code = tmp_path_factory.mktemp("code")
    (code / "lifecycle_gate.py").write_text(HANDLER)
    monkeypatch.syspath_prepend(str(code))
    monkeypatch.delitem(sys.modules, "lifecycle_gate", raising=False)
    module = importlib.import_module("lifecycle_gate")
    yield module
    module.GATE.set()  # never leave a handler thread waiting


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    servers: list[Server] = []

    async def start(repository: ModelRepository) -> tuple[str, ModelRepository]:
        server = Server(repository, ServerConfig(host="127.0.0.1", port=0, grpc_port=None))
        await server.start()
        servers.append(server)
        return server.url, server.app[REPOSITORY]

    yield start
    for server in reversed(servers):
        await server.aclose()


def handler_config() -> HandlerConfig:
    return HandlerConfig("lifecycle_gate:Held", workers=HELD + 2)


def factory(handler: HandlerConfig | None = None) -> Any:
    return engine_factory(
        BatchConfig(), RuntimeConfig(instances=1), CacheConfig(size_mb=0), handler
    )


async def until(condition: Callable[[], bool], what: str) -> None:
    """Wait for a state change that has no event of its own (bounded, generously)."""
    await wait_until(condition, what)


async def post(http: aiohttp.ClientSession, url: str, hold: bool = False) -> tuple[int, Any]:
    query = "?hold=1" if hold else ""
    async with http.post(
        f"{url}/v2/models/m/infer{query}", data=b"go", headers={"Content-Type": "text/plain"}
    ) as r:
        return r.status, await r.json()


async def status(http: aiohttp.ClientSession, url: str, path: str) -> int:
    method = http.get if path.startswith("/v2/health") else http.post
    async with method(url + path) as r:
        return r.status


def states(repository: ModelRepository) -> list[tuple[str, str]]:
    return [(row["version"], row["state"]) for row in repository.index()]


async def hold_requests(
    http: aiohttp.ClientSession, url: str, gate: ModuleType
) -> list[asyncio.Task[tuple[int, Any]]]:
    held = [asyncio.create_task(post(http, url, hold=True)) for _ in range(HELD)]
    for _ in range(HELD):
        assert await asyncio.to_thread(gate.ENTERED.acquire, True, 30)
    return held


async def load_during_drain(
    http: aiohttp.ClientSession,
    url: str,
    repository: ModelRepository,
    gate: ModuleType,
    factor: float,
) -> Engine:
    """Requests in flight; unload; load while the unload waits for them. Returns the engine
    that was unloaded."""
    answer = [factor] * 4
    old = repository.get("m")
    held = await hold_requests(http, url, gate)
    unload = asyncio.create_task(status(http, url, "/v2/repository/models/m/unload"))
    await until(lambda: states(repository) == [("1", "UNLOADING")], "the unload's drain")
    assert await status(http, url, "/v2/repository/models/m/load") == 200
    # The unload still waits for the held requests: the load built a new engine meanwhile.
    assert not unload.done()
    assert states(repository) == [("1", "READY")]
    assert await status(http, url, "/v2/health/ready") == 200
    assert await post(http, url) == (200, {"y": answer})
    new = repository.get("m")
    gate.GATE.set()
    assert await asyncio.gather(*held) == [(200, {"y": answer})] * HELD  # the old engine
    assert await unload == 200
    gate.GATE.clear()
    # The drain closed the old engine only: the new one answers, the states are true.
    assert states(repository) == [("1", "READY")]
    assert await status(http, url, "/v2/health/ready") == 200
    assert await post(http, url) == (200, {"y": answer})
    assert repository.get("m") is new
    assert new is not old
    assert new.ready
    assert not old.ready
    with pytest.raises(NotReady):
        old.statistics()  # its queue and sessions are gone
    return old


async def cycles(http: aiohttp.ClientSession, url: str, repository: ModelRepository) -> None:
    """Plain unload/load cycles still work afterwards."""
    for _ in range(3):
        assert await status(http, url, "/v2/repository/models/m/unload") == 200
        assert states(repository) == [("1", "UNAVAILABLE")]
        assert await status(http, url, "/v2/health/ready") == 503
        assert (await post(http, url))[0] == 503
        assert await status(http, url, "/v2/repository/models/m/load") == 200
        assert states(repository) == [("1", "READY")]
        assert await status(http, url, "/v2/health/ready") == 200
        assert (await post(http, url))[0] == 200


async def test_single_file_load_during_an_unloads_drain_serves_a_fresh_engine(
    tmp_path: Path, gate: ModuleType, serve: Serve, http: aiohttp.ClientSession
) -> None:
    path = models.scaled(tmp_path / "m.onnx", 1.0)
    engine = Engine(path, BatchConfig(), RuntimeConfig(instances=1), name="m",
                    handler=handler_config())  # fmt: skip
    url, repository = await serve(ModelRepository([engine], drain_timeout_s=60.0))
    first = await load_during_drain(http, url, repository, gate, 1.0)
    assert first is engine
    second = await load_during_drain(http, url, repository, gate, 1.0)  # and again
    assert second is not first
    await cycles(http, url, repository)


async def test_directory_load_during_an_unloads_drain_serves_a_fresh_engine(
    tmp_path: Path, gate: ModuleType, serve: Serve, http: aiohttp.ClientSession
) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.toml").write_text('handler = "lifecycle_gate:Held"\n')
    models.scaled(tmp_path / "m" / "1" / "model.onnx", 1.0)
    build = factory(handler_config())
    repository = ModelRepository.from_directory(tmp_path, build, drain_timeout_s=60.0)
    url, repository = await serve(repository)
    await load_during_drain(http, url, repository, gate, 1.0)
    # A poll racing the drain changes nothing: the load's view is the newest.
    held = await hold_requests(http, url, gate)
    unload = asyncio.create_task(status(http, url, "/v2/repository/models/m/unload"))
    await until(lambda: states(repository) == [("1", "UNLOADING")], "the unload's drain")
    await repository.poll()  # an unloaded model stays unloaded
    assert states(repository) == [("1", "UNLOADING")]
    gate.GATE.set()
    assert [s for s, _ in await asyncio.gather(*held)] == [200] * HELD
    assert await unload == 200
    await repository.poll()
    assert states(repository) == [("1", "UNAVAILABLE")]
    assert await status(http, url, "/v2/repository/models/m/load") == 200
    await cycles(http, url, repository)


def same_stat_replacement(path: Path, factor: float, in_place: bool) -> None:
    """Put a different model of the same size at `path`, with the old mtime restored (as
    `cp -p`, `rsync -a` or a reproducible build with a fixed mtime leave it)."""
    before = path.stat()
    replacement = path.with_name(".replacement.onnx")
    models.scaled(replacement, factor)
    assert replacement.stat().st_size == before.st_size
    assert replacement.read_bytes() != path.read_bytes()
    if in_place:  # rewritten through the same inode
        path.write_bytes(replacement.read_bytes())
        replacement.unlink()
    else:
        os.replace(replacement, path)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    assert (after.st_ino == before.st_ino) == in_place


@pytest.mark.parametrize("in_place", [False, True], ids=["os-replace", "in-place"])
async def test_a_replacement_with_the_same_size_and_mtime_is_reloaded(
    tmp_path: Path, serve: Serve, http: aiohttp.ClientSession, in_place: bool
) -> None:
    path = models.scaled(tmp_path / "m" / "1" / "model.onnx", 2.0)
    url, repository = await serve(ModelRepository.from_directory(tmp_path, factory()))
    body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1] * 4}]}

    async def answer() -> list[float]:
        async with http.post(f"{url}/v2/models/m/infer", json=body) as r:
            assert r.status == 200
            data: list[float] = (await r.json())["outputs"][0]["data"]
            return data

    assert await answer() == [2.0] * 4
    same_stat_replacement(path, 3.0, in_place)
    await repository.poll()  # what the --repository-poll-s timer runs
    assert await answer() == [3.0] * 4
    assert repository.get("m").digest == model_digest(path.read_bytes())
    assert states(repository) == [("1", "READY")]


async def test_a_file_changed_within_its_timestamp_tick_is_checked_by_content(
    tmp_path: Path, serve: Serve, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a filesystem with coarse timestamps a rewrite can leave the stat exactly as the
    scan that loaded the file saw it: a version loaded from a file that recent is checked by
    content on the next poll. A touch (new stat, same bytes) reloads nothing."""
    path = models.scaled(tmp_path / "m" / "1" / "model.onnx", 2.0)
    url, repository = await serve(ModelRepository.from_directory(tmp_path, factory()))
    loaded = repository.get("m")
    os.utime(path)  # same bytes: the engine stays
    await repository.poll()
    assert repository.get("m") is loaded
    assert loaded.digest == file_digest(path) == model_digest(path.read_bytes())
    stale = scan_directory(tmp_path)
    assert "1" in stale["m"].racy  # written moments ago: its stat cannot be trusted alone
    models.scaled(path, 5.0)
    # The coarse clock: the rewrite does not show in the stat the poll reads.
    monkeypatch.setattr(repository_module, "scan_directory", lambda root: stale)
    await repository.poll()
    reloaded = repository.get("m")
    assert reloaded is not loaded
    assert reloaded.digest == file_digest(path)
    body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1] * 4}]}
    async with http.post(f"{url}/v2/models/m/infer", json=body) as r:
        assert (r.status, (await r.json())["outputs"][0]["data"]) == (200, [5.0] * 4)
    await repository.poll()  # checked once more, unchanged: no reload
    assert repository.get("m") is reloaded


def repository_of(mode: str, root: Path) -> ModelRepository:
    """Model `m` behind the gate handler: one file, or a repository directory."""
    if mode == "single-file":
        path = models.scaled(root / "m.onnx", 1.0)
        engine = Engine(path, BatchConfig(), RuntimeConfig(instances=1), name="m",
                        handler=handler_config())  # fmt: skip
        return ModelRepository([engine], drain_timeout_s=60.0)
    (root / "m").mkdir()
    (root / "m" / "config.toml").write_text('handler = "lifecycle_gate:Held"\n')
    models.scaled(root / "m" / "1" / "model.onnx", 1.0)
    return ModelRepository.from_directory(root, factory(handler_config()), drain_timeout_s=60.0)


@pytest.mark.parametrize("mode", ["single-file", "directory"])
async def test_a_load_whose_caller_goes_away_still_completes(
    tmp_path: Path, gate: ModuleType, serve: Serve, http: aiohttp.ClientSession, mode: str
) -> None:
    url, repository = await serve(repository_of(mode, tmp_path))
    await repository.unload("m")
    gate.HOLD_SETUP.set()
    load = asyncio.create_task(repository.load("m"))
    assert await asyncio.to_thread(gate.SETUP_ENTERED.acquire, True, 30)
    assert states(repository) == [("1", "LOADING")]
    load.cancel()  # what the server does to a request whose client disconnects
    with pytest.raises(asyncio.CancelledError):
        await load
    gate.HOLD_SETUP.clear()
    gate.GATE.set()
    await until(lambda: states(repository) == [("1", "READY")], "the load to finish")
    assert await status(http, url, "/v2/health/ready") == 200
    assert await post(http, url) == (200, {"y": [1.0] * 4})
    gate.GATE.clear()
    await cycles(http, url, repository)


@pytest.mark.parametrize("mode", ["single-file", "directory"])
async def test_an_unload_whose_caller_goes_away_still_drains_and_closes(
    tmp_path: Path, gate: ModuleType, serve: Serve, http: aiohttp.ClientSession, mode: str
) -> None:
    url, repository = await serve(repository_of(mode, tmp_path))
    old = repository.get("m")
    held = await hold_requests(http, url, gate)
    unload = asyncio.create_task(repository.unload("m"))
    await until(lambda: states(repository) == [("1", "UNLOADING")], "the unload's drain")
    unload.cancel()
    with pytest.raises(asyncio.CancelledError):
        await unload
    gate.GATE.set()
    assert [s for s, _ in await asyncio.gather(*held)] == [200] * HELD
    await until(lambda: not old.ready, "the unloaded engine to close")
    await until(lambda: states(repository) == [("1", "UNAVAILABLE")], "the unload to end")
    gate.GATE.clear()
    assert await status(http, url, "/v2/repository/models/m/load") == 200
    await cycles(http, url, repository)
