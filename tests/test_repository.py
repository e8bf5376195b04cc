"""Model repository: versions, per-model config, hot reload, rollback, traffic splitting, the
repository API and broken models (real server on 127.0.0.1, real ONNX Runtime)."""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from batchserve import BatchConfig, CacheConfig, RuntimeConfig
from batchserve.app import HandlerLimits, Server, engine_factory
from batchserve.config import ServerConfig
from batchserve.errors import ModelLoadError
from batchserve.repository import ModelRepository, VersionPolicy
from batchserve.repository.config import parse_model_config

import models
from helpers import (
    StartServerProcess,
    X,
    add_version,
    check_version,
    infer,
    run_cli,
    wait_until,
    write_config,
)

StartRepository = Callable[..., Awaitable[str]]


@pytest.fixture
async def start_repository() -> AsyncIterator[StartRepository]:
    servers: list[Server] = []

    async def start(root: Path, poll_s: float = 0.0, **config: Any) -> str:
        factory = engine_factory(BatchConfig(), RuntimeConfig(), CacheConfig(size_mb=4))
        repository = ModelRepository.from_directory(root, factory, poll_s=poll_s)
        server = Server(
            repository, ServerConfig(host="127.0.0.1", port=0, grpc_port=None, **config)
        )
        await server.start()
        servers.append(server)
        return server.url

    yield start
    for server in reversed(servers):
        await server.aclose()


async def test_two_models_and_two_versions_are_served_at_once(
    tmp_path: Path, start_repository: StartRepository, http: aiohttp.ClientSession
) -> None:
    write_config(tmp_path, "alpha", "[version_policy]\nall = true\n")
    add_version(tmp_path, "alpha", "1", 1.0)
    add_version(tmp_path, "alpha", "2", 2.0)
    add_version(tmp_path, "beta", "7", 7.0)
    url = await start_repository(tmp_path)
    async with http.get(f"{url}/v2/models/alpha") as r:
        assert (await r.json())["versions"] == ["1", "2"]
    async with http.get(f"{url}/v2/models/alpha/versions/1") as r:
        meta = await r.json()
        assert meta["versions"] == ["1"]
        assert meta["inputs"][0]["name"] == "x"
    for path, status in (("/v2/models/alpha/versions/3", 404), ("/v2/models/gamma", 404)):
        async with http.get(url + path) as r:
            assert r.status == status
    status, answer = await infer(http, f"{url}/v2/models/alpha/infer")  # no version: latest
    assert (status, check_version(answer)) == (200, "2")
    status, answer = await infer(http, f"{url}/v2/models/alpha/versions/1/infer")
    assert (status, check_version(answer)) == (200, "1")
    status, answer = await infer(http, f"{url}/v2/models/beta/infer")
    assert (status, check_version(answer)) == (200, "7")
    status, answer = await infer(http, f"{url}/v2/models/alpha/versions/3/infer")
    assert status == 404
    assert "no version '3'" in answer["error"]
    async with http.post(f"{url}/v2/repository/index") as r:
        index = await r.json()
    assert [(e["name"], e["version"], e["state"]) for e in index] == [
        ("alpha", "1", "READY"), ("alpha", "2", "READY"), ("beta", "7", "READY"),
    ]  # fmt: skip


def switched_once(answers: list[str], old: str, new: str, in_flight: int = 8) -> bool:
    """Old answers, then new ones: only requests already routed when the switch happened (at
    most one per client) may still come back from the old version after the first new one."""
    first_new = answers.index(new)
    return set(answers[:first_new]) == {old} and answers[first_new:].count(old) <= in_flight


async def test_new_version_then_rollback_under_load_loses_no_request(
    tmp_path: Path, start_repository: StartRepository, http: aiohttp.ClientSession
) -> None:
    """Polling picks up version 2 (warmed up before it takes traffic), then its removal moves
    traffic back to version 1; clients sending all along see no failure, and every answer's
    model_version matches its outputs."""
    add_version(tmp_path, "alpha", "1", 1.0)
    url = await start_repository(tmp_path, poll_s=0.05)
    seen: list[str] = []
    failures: list[tuple[int, Any]] = []
    stop = asyncio.Event()

    async def client() -> None:
        while not stop.is_set():
            status, answer = await infer(http, f"{url}/v2/models/alpha/infer")
            if status != 200:
                failures.append((status, answer))
            else:
                seen.append(check_version(answer))

    async def until(condition: Callable[[], bool]) -> None:
        await wait_until(condition, "the clients' answers")

    clients = [asyncio.create_task(client()) for _ in range(8)]
    try:
        await until(lambda: len(seen) > 50)
        added_at = len(seen)
        add_version(tmp_path, "alpha", "2", 2.0)
        await until(lambda: seen[-1] == "2")
        await until(lambda: len(seen) > added_at + 100)
        removed_at = len(seen)
        shutil.rmtree(tmp_path / "alpha" / "2")  # rollback
        await until(lambda: seen[-1] == "1")
        await until(lambda: len(seen) > removed_at + 100)
    finally:
        stop.set()
        await asyncio.gather(*clients)
    assert failures == []
    assert set(seen[:added_at]) == {"1"}
    assert switched_once(seen[added_at:removed_at], "1", "2")
    assert switched_once(seen[removed_at:], "2", "1")
    async with http.post(f"{url}/v2/repository/index") as r:
        assert [(e["version"], e["state"]) for e in await r.json()] == [("1", "READY")]


@pytest.mark.slow
async def test_a_90_10_split_lands_within_bounds_and_sticky_keys_stay_put(
    tmp_path: Path, start_repository: StartRepository, http: aiohttp.ClientSession
) -> None:
    write_config(
        tmp_path, "alpha",
        '[version_policy]\nall = true\n[traffic]\nweights = { "1" = 90, "2" = 10 }\n'
        'sticky_header = "X-User-Id"\n',
    )  # fmt: skip
    add_version(tmp_path, "alpha", "1", 1.0)
    add_version(tmp_path, "alpha", "2", 2.0)
    url = await start_repository(tmp_path)
    counts: Counter[str] = Counter()
    for _ in range(20):
        answers = await asyncio.gather(
            *(infer(http, f"{url}/v2/models/alpha/infer") for _ in range(100))
        )
        counts.update(check_version(a) for _, a in answers)
    # 2,000 draws at p = 0.1: mean 200, sd 13.4; 5 sd either side fails by chance < 1e-6.
    assert 133 <= counts["2"] <= 267, counts
    assert counts["1"] + counts["2"] == 2000
    by_user: dict[str, set[str]] = {}
    for user in range(40):
        for _ in range(5):
            _status, answer = await infer(
                http, f"{url}/v2/models/alpha/infer", {"X-User-Id": f"user-{user}"}
            )
            by_user.setdefault(f"user-{user}", set()).add(check_version(answer))
    assert all(len(versions) == 1 for versions in by_user.values()), by_user
    # A named version bypasses the split.
    _, answer = await infer(http, f"{url}/v2/models/alpha/versions/2/infer")
    assert check_version(answer) == "2"


async def test_a_broken_model_is_reported_and_the_others_keep_working(
    tmp_path: Path,
    start_repository: StartRepository,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    add_version(tmp_path, "good", "1", 1.0)
    (tmp_path / "broken" / "1").mkdir(parents=True)
    (tmp_path / "broken" / "1" / "model.onnx").write_bytes(b"not an onnx model")
    write_config(tmp_path, "misconfigured", "max_batch_size = -3\n")
    add_version(tmp_path, "misconfigured", "1", 1.0)
    with caplog.at_level(logging.ERROR, logger="batchserve.repository"):
        url = await start_repository(tmp_path)
    assert any("cannot serve broken version 1" in r.getMessage() for r in caplog.records)
    async with http.get(f"{url}/v2/health/ready") as r:
        assert r.status == 200  # the working model keeps the server ready
    status, answer = await infer(http, f"{url}/v2/models/good/infer")
    assert (status, check_version(answer)) == (200, "1")
    async with http.post(f"{url}/v2/repository/index") as r:
        index = {(e["name"], e["version"]): e for e in await r.json()}
    assert index["broken", "1"]["state"] == "UNAVAILABLE"
    assert "not a valid ONNX model" in index["broken", "1"]["reason"]
    assert index["misconfigured", ""]["state"] == "UNAVAILABLE"
    assert "max_batch_size" in index["misconfigured", ""]["reason"]
    status, answer = await infer(http, f"{url}/v2/models/broken/infer")
    assert status == 503
    assert "not a valid ONNX model" in answer["error"]
    async with http.post(f"{url}/v2/repository/models/broken/load") as r:
        assert r.status == 400
        assert "failed to load model 'broken'" in (await r.json())["error"]
    async with http.get(f"{url}/metrics") as r:
        text = await r.text()
    assert (
        'batchserve_model_version_state{model="broken",state="UNAVAILABLE",version="1"} 1.0' in text
    )
    assert 'batchserve_model_load_failures_total{model="broken"}' in text
    assert 'batchserve_model_version_state{model="good",state="READY",version="1"} 1.0' in text


async def test_unload_and_load_through_the_api_behind_the_api_key(
    tmp_path: Path, start_repository: StartRepository, http: aiohttp.ClientSession
) -> None:
    add_version(tmp_path, "alpha", "1", 1.0)
    url = await start_repository(tmp_path, api_key="k")
    auth = {"Authorization": "Bearer k"}
    async with http.post(f"{url}/v2/repository/models/alpha/unload") as r:
        assert r.status == 401
    async with http.post(f"{url}/v2/repository/models/alpha/unload", headers=auth) as r:
        assert r.status == 200
    status, answer = await infer(http, f"{url}/v2/models/alpha/infer", auth)
    assert status == 503
    assert "unloaded" in answer["error"]
    add_version(tmp_path, "alpha", "2", 2.0)  # appears while unloaded: the load picks it up
    async with http.post(f"{url}/v2/repository/models/alpha/load", headers=auth) as r:
        assert r.status == 200
    status, answer = await infer(http, f"{url}/v2/models/alpha/infer", auth)
    assert (status, check_version(answer)) == (200, "2")
    async with http.post(f"{url}/v2/repository/models/nope/load", headers=auth) as r:
        assert r.status == 404


async def test_a_file_replaced_in_place_is_reloaded_and_never_served_from_the_old_cache(
    tmp_path: Path, start_repository: StartRepository, http: aiohttp.ClientSession
) -> None:
    add_version(tmp_path, "alpha", "1", 1.0)
    url = await start_repository(tmp_path)
    _status, answer = await infer(http, f"{url}/v2/models/alpha/infer")
    assert answer["outputs"][0]["data"] == X[0]
    staged = tmp_path / "staged.onnx"
    models.scaled(staged, 3.0)  # same version number, new weights
    staged.replace(tmp_path / "alpha" / "1" / "model.onnx")
    async with http.post(f"{url}/v2/repository/models/alpha/load") as r:
        assert r.status == 200
    _, answer = await infer(http, f"{url}/v2/models/alpha/infer")
    assert answer["outputs"][0]["data"] == [3 * v for v in X[0]]


def test_version_policies_and_config_validation() -> None:
    assert VersionPolicy().select(["1", "10", "2"]) == ["10"]
    assert VersionPolicy(latest=2).select(["1", "10", "2"]) == ["2", "10"]
    assert VersionPolicy(latest=None, specific=("1",)).select(["1", "2"]) == ["1"]
    assert VersionPolicy(latest=None, all=True).select(["2", "1"]) == ["1", "2"]
    config = parse_model_config({"max_batch_size": 8, "device": "cpu", "cache": False})
    assert config.batch(BatchConfig(max_batch_size=64, max_queue_rows=100)).max_batch_size == 8
    assert config.batch(BatchConfig(max_queue_rows=100)).max_queue_rows == 100
    # Settings config.toml has no key for keep the server's (--max-shape-groups).
    assert config.batch(BatchConfig(max_shape_groups=7)).max_shape_groups == 7
    for raw, message in (
        ({"max_batch_size": "8"}, "must be a int"),
        ({"unknown": 1}, "unknown key"),
        ({"device": "tpu"}, "device must be"),
        ({"version_policy": {"latest": 0}}, "latest must be"),
        ({"version_policy": {"latest": 1, "all": True}}, "exactly one"),
        ({"traffic": {"weights": {"1": -1}}}, ">= 0"),
        ({"traffic": {"weights": {"1": 0}}}, "must not all be 0"),
    ):
        with pytest.raises(ModelLoadError, match=message):
            parse_model_config(raw)


@pytest.mark.slow
async def test_the_command_serves_a_repository_directory(
    tmp_path: Path, serve_process: StartServerProcess
) -> None:
    add_version(tmp_path, "alpha", "1", 1.0)
    add_version(tmp_path, "alpha", "2", 2.0)
    server = serve_process("--model-repository", str(tmp_path), "--repository-poll-s", "0.1")
    try:
        async with aiohttp.ClientSession() as http:
            status, answer = await infer(http, f"{server.url}/v2/models/alpha/infer")
            assert (status, check_version(answer)) == (200, "2")
        assert server.stop() == 0
    finally:
        server.kill()
    for args in ((), ("x.onnx", "--model-repository", str(tmp_path))):
        result = run_cli("serve", *args)
        assert result.returncode == 2
        assert "--model-repository" in result.stderr
    result = run_cli("serve", "--model-repository", str(tmp_path / "missing"))
    assert result.returncode == 2
    assert "is not a directory" in result.stderr


async def test_a_model_config_can_name_a_handler_with_options(
    tmp_path: Path,
    start_repository: StartRepository,
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    code = tmp_path / "code"
    code.mkdir()
    (code / "csv_handler.py").write_text(
        "import numpy as np\n"
        "class Csv:\n"
        "    media_types = frozenset({'text/csv'})\n"
        "    def setup(self, metadata, options):\n"
        "        self.scale = float(options['scale'])\n"
        "    def preprocess(self, request):\n"
        "        row = [float(v) for v in request.body.decode().split(',')]\n"
        "        return {'x': np.array([row], dtype=np.float32)}\n"
        "    def postprocess(self, outputs, request):\n"
        "        return {'y': (outputs['y'][0] * self.scale).tolist()}\n"
    )
    monkeypatch.syspath_prepend(str(code))
    root = tmp_path / "models"
    write_config(root, "alpha", 'handler = "csv_handler:Csv"\n[handler_options]\nscale = "10"\n')
    add_version(root, "alpha", "1", 2.0)
    url = await start_repository(root)
    async with http.post(
        f"{url}/v2/models/alpha/infer", data=b"1,2,3,4", headers={"Content-Type": "text/csv"}
    ) as r:
        assert r.status == 200, await r.text()
        assert await r.json() == {"y": [20.0, 40.0, 60.0, 80.0]}


def test_handler_limits_carry_the_servers_size_limits_to_config_toml_handlers() -> None:
    # A handler named in config.toml runs under --max-tensor-elements and --max-response-mb.
    limits = HandlerLimits(max_elements=1000, max_answer_bytes=2048)
    config = limits.apply("image-classification", ())
    assert (config.max_elements, config.max_answer_bytes) == (1000, 2048)
