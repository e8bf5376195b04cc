"""Request policies: API key, deadlines, load shedding with Retry-After (real server, real ORT)."""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

from batchserve import BatchConfig, DeadlineExceeded, Engine
from batchserve.front.lag import LoopLag
from batchserve.http import STATE

import models
from helpers import StartServer, StartServerProcess, slow_body, wait_until

BODY = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0.5] * 64}]}


async def test_api_key_protects_everything_but_probes_and_metrics(
    start_server: StartServer, mlp_path: Path, http: aiohttp.ClientSession
) -> None:
    server = await start_server(Engine(mlp_path, name="mlp"), api_key="s3cret")
    url = server.url
    for path in ("/v2", "/v2/models/mlp", "/v2/models/mlp/stats", "/v2/models/nope"):
        async with http.get(url + path) as r:
            assert r.status == 401, path
            assert "API key" in (await r.json())["error"]
            assert r.headers["WWW-Authenticate"].startswith("Bearer")
    async with http.post(f"{url}/v2/models/mlp/infer", json=BODY) as r:
        assert r.status == 401
    wrong = {"Authorization": "Bearer s3cre"}
    async with http.post(f"{url}/v2/models/mlp/infer", json=BODY, headers=wrong) as r:
        assert r.status == 401
    right = {"Authorization": "Bearer s3cret"}
    async with http.post(f"{url}/v2/models/mlp/infer", json=BODY, headers=right) as r:
        assert r.status == 200
    for path in ("/v2/health/live", "/v2/health/ready", "/metrics"):
        async with http.get(url + path) as r:
            assert r.status == 200, path


async def test_metrics_can_be_protected_too(
    start_server: StartServer, mlp_path: Path, http: aiohttp.ClientSession
) -> None:
    server = await start_server(Engine(mlp_path, name="mlp"), api_key="k", metrics_public=False)
    async with http.get(f"{server.url}/metrics") as r:
        assert r.status == 401
    async with http.get(f"{server.url}/metrics", headers={"Authorization": "Bearer k"}) as r:
        assert r.status == 200


@pytest.mark.slow
async def test_a_request_past_its_deadline_gets_504_and_no_inference(
    start_server: StartServer, slow_path: Path, http: aiohttp.ClientSession
) -> None:
    engine = Engine(slow_path, BatchConfig(max_batch_size=8192), name="slow")
    server = await start_server(engine)
    url = f"{server.url}/v2/models/slow/infer"
    data, headers = slow_body(4096)
    busy = asyncio.create_task(http.post(url, data=data, headers=headers))
    await wait_until(lambda: engine.statistics().batcher.in_flight_batches, "the big run")
    data, headers = slow_body(2, timeout=20_000)  # 20 ms, in microseconds as Triton reads it
    async with http.post(url, data=data, headers=headers) as r:
        assert r.status == 504
        assert "deadline" in (await r.json())["error"]
    response = await busy
    assert response.status == 200
    response.release()
    stats = engine.statistics().batcher
    assert stats.cancelled == 1  # withdrawn from the queue
    assert stats.rows == 4096  # its rows never reached a session


async def test_bad_timeouts_are_400(
    start_server: StartServer, mlp_path: Path, http: aiohttp.ClientSession
) -> None:
    server = await start_server(Engine(mlp_path, name="mlp"))
    for value in (-1, 0, "soon", 1.5):
        body = {**BODY, "parameters": {"timeout": value}}
        async with http.post(f"{server.url}/v2/models/mlp/infer", json=body) as r:
            assert r.status == 400, value


@pytest.mark.slow
async def test_the_server_default_deadline_applies(
    start_server: StartServer, slow_path: Path, http: aiohttp.ClientSession
) -> None:
    server = await start_server(
        Engine(slow_path, BatchConfig(max_batch_size=8192), name="slow"), request_timeout_ms=5
    )
    data, headers = slow_body(4096)  # about 68 GFLOP: far more than 5 ms on any CPU
    async with http.post(f"{server.url}/v2/models/slow/infer", data=data, headers=headers) as r:
        # Cut off once queued (504), or refused on arrival when the wait the request already
        # had (a busy machine) leaves its deadline no room (429): the deadline decided both.
        assert r.status in (429, 504)
        assert "deadline" in (await r.json())["error"]


@pytest.mark.slow
async def test_engine_deadline_raises(slow_path: Path) -> None:
    async with Engine(slow_path, BatchConfig(max_batch_size=8192)) as engine:
        with pytest.raises(DeadlineExceeded, match="deadline"):
            await engine.infer({"x": np.zeros((4096, 1024), np.float32)}, timeout_s=0.001)


@pytest.mark.slow
async def test_shed_requests_get_429_with_retry_after(
    start_server: StartServer, slow_path: Path, http: aiohttp.ClientSession
) -> None:
    engine = Engine(slow_path, BatchConfig(max_batch_size=8192, max_queue_rows=4), name="slow")
    server = await start_server(engine)
    url = f"{server.url}/v2/models/slow/infer"
    data, headers = slow_body(4096)
    busy = asyncio.create_task(http.post(url, data=data, headers=headers))
    await wait_until(lambda: engine.statistics().batcher.in_flight_batches, "the big run")
    queued_data, queued_headers = slow_body(4)
    queued = asyncio.create_task(http.post(url, data=queued_data, headers=queued_headers))
    await wait_until(lambda: engine.statistics().batcher.queued_rows, "4 rows queued")
    data, headers = slow_body(1)
    async with http.post(url, data=data, headers=headers) as r:
        assert r.status == 429
        assert r.headers["Retry-After"] == "1"
        assert "queue full" in (await r.json())["error"]
    for task in (busy, queued):
        response = await task
        assert response.status == 200
        response.release()


@pytest.mark.slow
async def test_sigterm_under_load_loses_nothing(
    mlp_path: Path, serve_process: StartServerProcess
) -> None:
    """Every request either completes with 200 or is refused before admission (503 or a
    refused connection); none fails or goes unanswered."""
    server = serve_process(str(mlp_path), "--name", "mlp", "--shutdown-grace-s", "20")
    outcomes: dict[str, int] = {}
    stop_sending = asyncio.Event()
    served = asyncio.Event()  # enough answers that SIGTERM lands in the middle of a load

    async def client(http: aiohttp.ClientSession) -> None:
        while not stop_sending.is_set():
            try:
                async with http.post(f"{server.url}/v2/models/mlp/infer", json=BODY) as r:
                    await r.read()
                    key = str(r.status)
            except aiohttp.ClientConnectionError:
                key = "refused"  # the listening socket is closed: never admitted
            outcomes[key] = outcomes.get(key, 0) + 1
            if outcomes.get("200", 0) >= 200:
                served.set()
            if key == "refused":
                return

    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=32)) as http:
            clients = [asyncio.create_task(client(http)) for _ in range(32)]
            await asyncio.wait_for(served.wait(), timeout=60)
            # The clients keep sending through the whole shutdown, until the process is gone.
            assert await asyncio.to_thread(server.stop) == 0
            stop_sending.set()
            await asyncio.wait_for(asyncio.gather(*clients), timeout=30)
    finally:
        server.kill()
    print(f"SIGTERM under load: {outcomes}")  # the figure in docs/reliability.md (pytest -s)
    assert outcomes.get("200", 0) >= 200
    assert set(outcomes) <= {"200", "503", "refused"}, outcomes


async def test_a_slow_client_gets_408_and_frees_its_slot(
    start_server: StartServer, mlp_path: Path
) -> None:
    server = await start_server(Engine(mlp_path, name="mlp"), body_timeout_s=0.3)
    host, port = server.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n"
        b'Content-Type: application/json\r\n\r\n{"inputs"'
    )  # and then nothing more: a slowloris
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
    assert head.startswith(b"HTTP/1.1 408")
    writer.close()


def tensor(name: str, shape: list[int]) -> dict[str, object]:
    count = int(np.prod(shape))
    return {"name": name, "shape": shape, "datatype": "FP32", "data": [0.0] * count}


async def test_request_size_limits_answer_before_building_tensors(
    start_server: StartServer, mlp_path: Path, http: aiohttp.ClientSession
) -> None:
    server = await start_server(Engine(mlp_path, name="mlp"), max_inputs=2, max_tensor_elements=100)
    url = f"{server.url}/v2/models/mlp/infer"
    cases: list[tuple[dict[str, object], int, str]] = [
        ({"inputs": [tensor(f"i{k}", [1]) for k in range(3)]}, 400, "3 inputs"),
        ({"inputs": [tensor("input", [2, 64])]}, 413, "128 elements; the limit is 100"),
        ({"inputs": [tensor("input", [1] * 33)]}, 400, "33 dimensions"),
        # Past numpy's own 64-dimension limit, which once escaped as a 500.
        ({"inputs": [{"name": "input", "shape": [0] * 100, "datatype": "FP32", "data": []}]},
         400, "100 dimensions"),
    ]  # fmt: skip
    for body, status, message in cases:
        async with http.post(url, json=body) as r:
            assert r.status == status, (body, await r.text())
            assert message in (await r.json())["error"]
    deep = b"[" * 5000 + b"]" * 5000  # orjson stops at 1024 levels: no recursion blow-up
    async with http.post(url, data=deep, headers={"Content-Type": "application/json"}) as r:
        assert r.status == 400
        assert "depth" in (await r.json())["error"]
    async with http.post(url, json=BODY) as r:  # within every limit
        assert r.status == 200


async def test_oversized_headers_are_refused_in_one_log_line(
    start_server: StartServer, mlp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = await start_server(Engine(mlp_path, name="mlp"))
    host, port = server.url.removeprefix("http://").split(":")
    for request in (
        b"GET /v2 HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n",
        b"GET /v2/" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    ):
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(request)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
        assert head.split(b" ")[1] == b"400"
        writer.close()
    refusals = [r for r in caplog.records if r.name == "batchserve.http.wire"]
    assert len(refusals) == 2
    assert all(r.levelname == "WARNING" and r.exc_info is None for r in refusals)
    assert "8190 bytes" in refusals[0].getMessage()
    async with aiohttp.ClientSession() as http, http.get(f"{server.url}/v2") as r:
        assert r.status == 200


async def test_the_lag_probe_tells_a_loop_that_stays_behind_from_one_long_iteration() -> None:
    now = 100.0
    lag = LoopLag(0.05, clock=lambda: now)
    lag.start()  # its timer never fires: nothing below yields; each tick is driven by hand

    def tick(late_s: float) -> None:
        nonlocal now
        now = lag._due + late_s
        lag._tick()

    try:
        tick(0.5)  # the first tick measures the start-up: not counted
        assert (lag.lag_s, lag.overloaded) == (0.0, False)
        tick(0.2)  # one long iteration (a burst, a collection pause) is not overload
        assert not lag.overloaded
        assert lag.smoothed_s > 0.04
        tick(0.0)
        for _ in range(2):
            tick(0.06)
        assert not lag.overloaded  # two late ticks: not yet sustained
        tick(0.06)  # three in a row, spanning more than the 100 ms window
        assert lag.overloaded
        tick(0.001)  # on time again: not overloaded, and the smoothed lag fades
        assert not lag.overloaded
        before = lag.smoothed_s
        tick(0.0)
        assert lag.smoothed_s < before
    finally:
        lag.stop()


async def test_a_loop_that_stays_behind_sheds_new_requests_until_it_catches_up(
    start_server: StartServer, mlp_path: Path, http: aiohttp.ClientSession
) -> None:
    server = await start_server(Engine(mlp_path, name="mlp"), max_loop_lag_ms=50)
    url = f"{server.url}/v2/models/mlp/infer"
    async with http.post(url, json=BODY) as r:
        assert r.status == 200
    # The loop has stayed behind, as behind a flood of requests: the probe's state says so,
    # set here (its readings are tested above) and stopped so that no tick of this quiet loop
    # resets it before the request is judged.
    lag = server.app[STATE].lag
    lag.stop()
    lag.overloaded = True
    async with http.post(url, json=BODY) as r:
        assert r.status == 429
        assert r.headers["Retry-After"] == "1"
        assert "event loop" in (await r.json())["error"]
    lag.start()  # its ticks find the loop on time and lift the state

    async def served() -> bool:
        async with http.post(url, json=BODY) as r:
            return r.status == 200

    await wait_until(served, "the loop to catch up: requests served again")
    async with http.get(f"{server.url}/metrics") as r:
        shed = re.search(r"^batchserve_lag_shed_requests_total (\S+)$", await r.text(), re.M)
    assert shed is not None
    assert float(shed.group(1)) >= 1  # the one above, and any refused before it lifted


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.slow
async def test_overload_sheds_the_excess_and_answers_everything_else_correctly(
    tmp_path: Path, serve_process: StartServerProcess
) -> None:
    """A real server process offered far more than it holds (64 callers back to back against
    32 rows per run and 8 queued rows): every answer is 200 with the right output, 429 with
    `Retry-After` and the reason, or 504 past the deadline; nothing else, and memory stays
    bounded. How many of each, and how fast, depends on the machine: those figures come from
    benchmarks/overload.py, not from here."""
    path = models.slow(tmp_path / "heavy.onnx", width=1024, layers=4)
    server = serve_process(str(path), "--name", "heavy", "--max-batch-size", "32",
                           "--max-queue-rows", "8", "--request-timeout-ms", "500")  # fmt: skip
    url = f"{server.url}/v2/models/heavy/infer"
    x = np.full((1, 1024), 0.5, np.float32)
    header = json.dumps({"inputs": [{"name": "x", "shape": [1, 1024], "datatype": "FP32",
                                     "parameters": {"binary_data_size": x.nbytes}}],
                         "outputs": [{"name": "y", "binary_data": False}]}).encode()  # fmt: skip
    headers = {"Inference-Header-Content-Length": str(len(header))}
    answers: list[tuple[int, str | None, Any]] = []

    async def caller(http: aiohttp.ClientSession) -> None:
        for _ in range(12):
            async with http.post(url, data=header + x.tobytes(), headers=headers) as r:
                answers.append((r.status, r.headers.get("Retry-After"), await r.json()))

    try:
        connector = aiohttp.TCPConnector(limit=64)
        async with aiohttp.ClientSession(connector=connector) as http:
            await asyncio.gather(caller(http))  # warm: the process's memory after one answer
            before = rss_mb(server.process.pid)
            await asyncio.wait_for(asyncio.gather(*(caller(http) for _ in range(64))), 300)
            after = rss_mb(server.process.pid)
        assert server.stop() == 0
    finally:
        server.kill()
    counts: dict[int, int] = {}
    for status, retry_after, body in answers:
        counts[status] = counts.get(status, 0) + 1
        if status == 200:
            (output,) = body["outputs"]
            assert (output["name"], output["shape"], len(output["data"])) == ("y", [1, 1024], 1024)
        elif status == 429:
            assert retry_after == "1"
            assert re.search("queue full|deadline", body["error"]), body
        else:
            assert status == 504, (status, body)
            assert "deadline" in body["error"]
    assert counts.get(200, 0) >= 12, counts
    assert counts.get(429, 0) > 0, counts  # 64 callers, room for 40: the excess is refused
    assert after - before < 100, (before, after)


@pytest.mark.slow
async def test_a_request_that_waited_for_the_event_loop_counts_that_wait_in_its_deadline(
    start_server: StartServer, mlp_path: Path, http: aiohttp.ClientSession
) -> None:
    """A client's deadline starts when it sends; a request that waited behind a busy event
    loop (socket buffers, the loop's backlog) has spent part of it before its handler runs.
    With every iteration of the loop held for 150 ms, the loop's lag alone is past 80% of a
    100 ms deadline: the request is refused at once with 429 instead of being admitted to
    miss its deadline. Without a deadline nothing is refused for it (the lag limit is off)."""
    hogging = True

    async def hog() -> None:  # the loop stays behind, every iteration, however fast the CPU
        while hogging:
            time.sleep(0.15)  # noqa: ASYNC251
            await asyncio.sleep(0)

    strict = await start_server(
        Engine(mlp_path, name="mlp"), request_timeout_ms=100, max_loop_lag_ms=0
    )
    lenient = await start_server(Engine(mlp_path, name="mlp"), max_loop_lag_ms=0)
    hogger = asyncio.create_task(hog())
    try:
        for _ in range(8):  # several lagging ticks: the smoothed lag is well past 80 ms
            await asyncio.sleep(0)
        async with http.post(f"{strict.url}/v2/models/mlp/infer", json=BODY) as r:
            assert r.status == 429
            assert r.headers["Retry-After"] == "1"
            assert "deadline" in (await r.json())["error"]
        async with http.post(f"{lenient.url}/v2/models/mlp/infer", json=BODY) as r:
            assert r.status == 200
    finally:
        hogging = False
        await hogger

    async def served() -> bool:  # the lag fades within a few ticks once the loop catches up
        async with http.post(f"{strict.url}/v2/models/mlp/infer", json=BODY) as r:
            return r.status == 200

    await wait_until(served, "the loop to catch up: requests within their deadline again")
