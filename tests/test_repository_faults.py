"""Model repository under faults: broken rollouts, model code that raises, odd version names,
reloads racing polls and in-flight handler requests, teardown without the cyclic collector,
and the API under --workers (real engines, real files, real HTTP on 127.0.0.1)."""

from __future__ import annotations

import asyncio
import gc
import importlib
import shutil
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import onnxruntime as ort
import pytest

import batchserve.repository.repository as repository_module
from batchserve import BatchConfig, CacheConfig, RuntimeConfig
from batchserve.app import HandlerLimits, Server, engine_factory
from batchserve.config import ServerConfig
from batchserve.engine import Engine
from batchserve.handlers.config import HandlerConfig
from batchserve.repository import EngineFactory, ModelConfig, ModelRepository, VersionPolicy
from batchserve.repository.config import parse_model_config, version_order

from helpers import add_version, check_version, infer, wait_until, write_config

Serve = Callable[..., Awaitable[tuple[str, ModelRepository]]]

HANDLER = """
import threading

import numpy as np

# A request with the `gate` parameter sets `entered` when its preprocess begins and is held
# there until `release` is set: the test decides when it ends, not a sleep's length.
entered = threading.Event()
release = threading.Event()


class Slow:
    media_types = frozenset({"text/plain"})

    def preprocess(self, request):
        if request.parameters.get("gate"):
            entered.set()
            release.wait(60)
        return {"x": np.ones((1, 4), np.float32)}

    def postprocess(self, outputs, request):
        return {"y": outputs["y"][0].tolist()}
"""


def factory() -> EngineFactory:
    return engine_factory(BatchConfig(), RuntimeConfig(instances=1), CacheConfig(size_mb=0))


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    servers: list[Server] = []

    async def start(
        root: Path, build: EngineFactory | None = None, **options: Any
    ) -> tuple[str, ModelRepository]:
        repository = ModelRepository.from_directory(root, build or factory(), **options)
        server = Server(repository, ServerConfig(host="127.0.0.1", port=0, grpc_port=None))
        await server.start()
        servers.append(server)
        return server.url, repository

    yield start
    for server in reversed(servers):
        await server.aclose()


@pytest.fixture
def handler_module(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> str:
    code = tmp_path_factory.mktemp("code")
    (code / "faults_handler.py").write_text(HANDLER)
    monkeypatch.syspath_prepend(str(code))
    return "faults_handler:Slow"


async def index(http: aiohttp.ClientSession, url: str) -> list[dict[str, str]]:
    async with http.post(f"{url}/v2/repository/index") as r:
        assert r.status == 200
        rows: list[dict[str, str]] = await r.json()
        return rows


def corrupt(root: Path, model: str, version: str) -> None:
    staging = root / model / f".staging-{version}"
    staging.mkdir(parents=True)
    (staging / "model.onnx").write_bytes(b"not an onnx model")
    staging.rename(root / model / version)


async def test_a_broken_new_version_never_retires_the_serving_one(
    tmp_path: Path, serve: Serve, http: aiohttp.ClientSession
) -> None:
    add_version(tmp_path, "m", "1", 1.0)
    url, repository = await serve(tmp_path)
    corrupt(tmp_path, "m", "2")
    await repository.poll()
    status, answer = await infer(http, f"{url}/v2/models/m/infer")
    assert (status, check_version(answer)) == (200, "1")
    async with http.get(f"{url}/v2/health/ready") as r:
        assert r.status == 200
    rows = {row["version"]: row for row in await index(http, url)}
    assert rows["1"]["state"] == "READY"
    assert "kept serving: version 2 did not load" in rows["1"]["reason"]
    assert rows["2"]["state"] == "UNAVAILABLE"
    assert "not a valid ONNX model" in rows["2"]["reason"]
    # The fixed rollout replaces it, and the stand-in goes.
    shutil.rmtree(tmp_path / "m" / "2")
    add_version(tmp_path, "m", "2", 2.0)
    await repository.poll()
    status, answer = await infer(http, f"{url}/v2/models/m/infer")
    assert (status, check_version(answer)) == (200, "2")
    assert [(r["version"], r["state"]) for r in await index(http, url)] == [("2", "READY")]


async def test_a_version_whose_new_file_is_broken_stays_ready_on_the_old_file(
    tmp_path: Path, serve: Serve, http: aiohttp.ClientSession
) -> None:
    add_version(tmp_path, "m", "1", 1.0)
    url, repository = await serve(tmp_path)
    staged = tmp_path / "staged.onnx"
    staged.write_bytes(b"not an onnx model")
    staged.replace(tmp_path / "m" / "1" / "model.onnx")
    await repository.poll()
    status, answer = await infer(http, f"{url}/v2/models/m/versions/1/infer")
    assert (status, check_version(answer)) == (200, "1")
    (row,) = await index(http, url)
    assert row["state"] == "READY"
    assert row["reason"].startswith("reload failed, still serving the previous file: ")
    assert repository.load_failures == {"m": 1}
    async with http.get(f"{url}/metrics") as r:
        text = await r.text()
    assert 'batchserve_model_version_state{model="m",state="READY",version="1"} 1.0' in text
    assert 'batchserve_model_load_failures_total{model="m"} 1.0' in text


def raising_for(model: str, build: EngineFactory) -> EngineFactory:
    """A factory whose model code has a bug for one model (not a load error it expects)."""

    def create(name: str, version: str, path: Path, config: ModelConfig) -> Engine:
        if name == model:
            return {"oops": 1}["missing"]  # type: ignore[return-value]
        return build(name, version, path, config)

    return create


async def test_any_error_from_a_model_fails_that_model_only(
    tmp_path: Path, serve: Serve, http: aiohttp.ClientSession
) -> None:
    add_version(tmp_path, "bad", "1", 1.0)
    add_version(tmp_path, "good", "1", 1.0)
    url, repository = await serve(tmp_path, raising_for("bad", factory()))
    status, answer = await infer(http, f"{url}/v2/models/good/infer")
    assert (status, check_version(answer)) == (200, "1")
    rows = {(r["name"], r["version"]): r for r in await index(http, url)}
    assert rows["bad", "1"]["state"] == "UNAVAILABLE"
    assert rows["bad", "1"]["reason"] == "KeyError: 'missing'"
    # At runtime: a model sorted after the broken one is still picked up, the broken one is
    # not rebuilt on every pass, and the load API answers 400, not 500.
    add_version(tmp_path, "zz", "1", 1.0)
    shutil.rmtree(tmp_path / "bad" / "1")
    add_version(tmp_path, "bad", "1", 1.0)
    await repository.poll()
    status, answer = await infer(http, f"{url}/v2/models/zz/infer")
    assert (status, check_version(answer)) == (200, "1")
    failures = repository.load_failures["bad"]
    await repository.poll()
    assert repository.load_failures["bad"] == failures
    async with http.post(f"{url}/v2/repository/models/bad/load") as r:
        assert r.status == 400
        assert "KeyError" in (await r.json())["error"]


async def test_only_numbered_versions_compete_for_latest(
    tmp_path: Path, serve: Serve, http: aiohttp.ClientSession
) -> None:
    add_version(tmp_path, "m", "1", 1.0)
    add_version(tmp_path, "m", "2", 2.0)
    add_version(tmp_path, "m", "1.bak", 3.0)  # a leftover backup
    add_version(tmp_path, "m", "²", 4.0)  # not a version at all: ignored
    add_version(tmp_path, "named", "3", 3.0)
    add_version(tmp_path, "named", "canary", 5.0)
    write_config(tmp_path, "named", '[version_policy]\nspecific = ["3", "canary"]\n')
    url, _repository = await serve(tmp_path)
    status, answer = await infer(http, f"{url}/v2/models/m/infer")
    assert (status, check_version(answer)) == (200, "2")
    status, answer = await infer(http, f"{url}/v2/models/named/infer")
    assert (status, check_version(answer)) == (200, "3")  # the default is the number
    status, answer = await infer(http, f"{url}/v2/models/named/versions/canary/infer")
    assert (status, answer["outputs"][0]["data"]) == (200, [5.0, 10.0, 15.0, 20.0])
    assert [(r["name"], r["version"]) for r in await index(http, url)] == [
        ("m", "2"), ("named", "canary"), ("named", "3"),
    ]  # fmt: skip


def test_version_order_and_policies_with_named_versions() -> None:
    assert sorted(["10", "b", "2", "a", "1"], key=version_order) == ["a", "b", "1", "2", "10"]
    assert version_order("²") == (0, "²")  # no crash: just a name
    versions = ["1", "2", "1.bak", "old"]
    assert VersionPolicy().select(versions) == ["2"]
    assert VersionPolicy(latest=3).select(versions) == ["1", "2"]
    assert VersionPolicy(latest=None, all=True).select(versions) == ["1", "2"]
    assert VersionPolicy(latest=None, specific=("old", "1")).select(versions) == ["old", "1"]


async def test_a_poll_never_applies_a_scan_older_than_a_load(
    tmp_path: Path, serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    add_version(tmp_path, "m", "1", 1.0)
    add_version(tmp_path, "m", "2", 2.0)
    _url, repository = await serve(tmp_path)
    assert repository.get("m").version == "2"
    scanned, release = threading.Event(), threading.Event()
    real_scan = repository_module.scan_directory

    def slow_scan(root: Path) -> Any:  # a large repository on a network filesystem
        result = real_scan(root)
        scanned.set()
        release.wait(10)
        return result

    monkeypatch.setattr(repository_module, "scan_directory", slow_scan)
    poll = asyncio.create_task(repository.poll())
    try:
        assert await asyncio.to_thread(scanned.wait, 10)
        shutil.rmtree(tmp_path / "m" / "2")  # rollback, while the poll holds its old view
        await repository.load("m")
        assert repository.get("m").version == "1"
    finally:
        release.set()
        await poll
    assert repository.get("m").version == "1"
    assert repository.index() == [{"name": "m", "version": "1", "state": "READY"}]


async def test_a_reload_waits_for_requests_in_preprocess_without_blocking_other_models(
    tmp_path: Path, serve: Serve, http: aiohttp.ClientSession, handler_module: str
) -> None:
    write_config(tmp_path, "slow", f'handler = "{handler_module}"\n')
    add_version(tmp_path, "slow", "1", 1.0)
    add_version(tmp_path, "other", "1", 1.0)
    url, repository = await serve(tmp_path, drain_timeout_s=60.0)
    gate = importlib.import_module(handler_module.partition(":")[0])  # the server's own module
    gate.entered.clear()
    gate.release.clear()

    async def slow_request() -> tuple[int, Any]:
        async with http.post(
            f"{url}/v2/models/slow/infer?gate=1",
            data=b"go",
            headers={"Content-Type": "text/plain"},
        ) as r:
            return r.status, await r.json()

    request = asyncio.create_task(slow_request())
    try:
        async with asyncio.timeout(60):  # a hang guard only: nothing here waits on time
            assert await asyncio.to_thread(gate.entered.wait, 30)  # in its preprocess now
            old = repository.get("slow")
            reload = asyncio.create_task(http.post(f"{url}/v2/repository/models/slow/load"))
            # The new engine serves: the reload is now draining the old one, which the held
            # request keeps busy for as long as the test wants.
            await wait_until(lambda: repository.get("slow") is not old, "the reload's swap")
            async with http.post(f"{url}/v2/repository/models/other/load") as r:
                assert r.status == 200  # not held up by the slow model's drain
            assert not request.done()
            assert not reload.done()  # the reload waits for the request in its preprocess
            gate.release.set()
            assert await request == (200, {"y": [1.0, 1.0, 1.0, 1.0]})
            async with await reload as r:
                assert r.status == 200
    finally:
        gate.release.set()


@pytest.mark.slow
async def test_reloads_free_their_sessions_without_the_cyclic_collector(
    tmp_path: Path, serve: Serve
) -> None:
    add_version(tmp_path, "m", "1", 1.0)
    _url, repository = await serve(tmp_path)

    def sessions() -> int:
        # type(), not isinstance(): some libraries keep proxies whose __class__ raises.
        return sum(1 for o in gc.get_objects() if issubclass(type(o), ort.InferenceSession))

    gc.collect()
    before = sessions()
    gc.disable()
    try:
        for _ in range(20):
            await repository.load("m")
        after = sessions()
    finally:
        gc.enable()
    assert after <= before, f"{after - before} retired sessions still alive"


async def test_the_load_and_unload_api_is_refused_when_workers_share_the_port(
    tmp_path: Path, serve: Serve, http: aiohttp.ClientSession
) -> None:
    add_version(tmp_path, "m", "1", 1.0)
    url, _repository = await serve(tmp_path, shared=True)
    for action in ("load", "unload"):
        async with http.post(f"{url}/v2/repository/models/m/{action}") as r:
            assert r.status == 409
            assert "--repository-poll-s" in (await r.json())["error"]
    status, answer = await infer(http, f"{url}/v2/models/m/infer")  # still served
    assert (status, check_version(answer)) == (200, "1")
    assert len(await index(http, url)) == 1  # the index is this worker's


async def test_config_toml_handlers_run_with_the_servers_executor_settings(
    tmp_path: Path,
) -> None:
    config = parse_model_config({"handler": "pkg.mod:H", "handler_options": {"k": "v"}})
    path = add_model(tmp_path)
    server_handler = HandlerConfig("other:H", executor="process", workers=1, max_pending=1)
    build = engine_factory(BatchConfig(), RuntimeConfig(), CacheConfig(), server_handler)
    assert build("m", "1", path, config).handler_config == HandlerConfig(
        "pkg.mod:H", (("k", "v"),), "process", 1, 1
    )
    # Without --handler, the flags still reach config.toml handlers.
    limits = HandlerLimits("process", 2, 3)
    build = engine_factory(BatchConfig(), RuntimeConfig(), CacheConfig(), handler_limits=limits)
    assert build("m", "1", path, config).handler_config == HandlerConfig(
        "pkg.mod:H", (("k", "v"),), "process", 2, 3
    )
    with pytest.raises(ValueError, match="workers"):
        HandlerLimits(workers=-1)


def add_model(root: Path) -> Path:
    add_version(root, "m", "1", 1.0)
    return root / "m" / "1" / "model.onnx"
