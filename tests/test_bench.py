"""`batchserve bench`: the sweep and report logic, the lean transport, and the CLI end to end
against real `batchserve serve` subprocesses (127.0.0.1, ephemeral ports, stopped by PID)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import json
import os
import socket
import ssl
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from batchserve.bench.errors import BenchError
from batchserve.bench.loadgen import LoadConfig, RawResult, callers_of, run_load, send_times
from batchserve.bench.measure import get_json, listening_url, request_headers, sweep
from batchserve.bench.report import Report, summarize
from batchserve.bench.transport import (
    Aborted,
    ConnectionPool,
    Disconnected,
    RequestTimeout,
    encode_post,
)
from batchserve.bench.workload import Body, Workload

from helpers import ServerProcess, block_until, wait_until

CLI = [sys.executable, "-m", "batchserve"]

# --------------------------------------------------------------------------------------------
# helpers


@pytest.fixture(scope="module")
def mlp_server(tmp_path_factory: pytest.TempPathFactory, mlp_path: Path) -> Iterator[str]:
    logs = tmp_path_factory.mktemp("mlp_server")
    server = ServerProcess.start(str(mlp_path), log_dir=logs)  # model name: the file stem, "mlp"
    yield server.url
    server.stop()


@pytest.fixture
def refusing_port() -> Iterator[int]:
    """A port bound but never listened on: connecting is refused, and nobody else can take it
    while the test runs (unlike a port closed right after it was picked)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    yield sock.getsockname()[1]
    sock.close()


def cli_env(**extra: str) -> dict[str, str]:
    """This environment without an API key of its own, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k != "BATCHSERVE_API_KEY"}
    return {**env, **extra}


def run_cli(
    *args: str, timeout: float = 60, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=timeout, env=env or cli_env()
    )


def bench_json(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    out = tmp_path / "out.json"
    done = run_cli("bench", *args, "--json", str(out), env=env)
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def report(
    rate: float | None, p99_ms: float | None, *, requests: int = 100, ok: int | None = None
) -> Report:
    ok = requests if ok is None else ok
    latency = {} if p99_ms is None else {"p50": p99_ms / 2, "p99": p99_ms}
    return Report(
        mode="open",
        target_rate=rate,
        concurrency=None,
        duration_s=1.0,
        processes=1,
        requests=requests,
        ok=ok,
        achieved_rps=float(ok),
        latency_ms=latency,
        errors_by_status={"503": requests - ok} if requests > ok else {},
        errors_by_exception={},
        delayed_by_cap=0,
    )


def fake_run(behaviour: Callable[[float], Report]) -> tuple[Callable[[float], Report], list[float]]:
    calls: list[float] = []

    def run(rate: float) -> Report:
        calls.append(rate)
        return behaviour(rate)

    return run, calls


def capacity(limit: float) -> Callable[[float], Report]:
    """A server whose p99 is 10 ms below `limit` req/s and 500 ms from it on."""
    return lambda rate: report(rate, 10.0 if rate < limit else 500.0)


# --------------------------------------------------------------------------------------------
# sweep


def test_sweep_steps_up_then_bisects_to_the_best_rate_under_the_slo() -> None:
    run, calls = fake_run(capacity(700))
    curve, best = sweep(run, slo_p99_ms=100, start_rate=100, max_rate=100_000, bisect_steps=4)
    # doubling 100, 200, 400 hold, 800 fails; bisect 600 ok, 700 fails, 650 ok, 675 ok
    assert calls == [100, 200, 400, 800, 600, 700, 650, 675]
    assert best is not None
    assert best.target_rate == 675
    assert [r.target_rate for r in curve] == [100, 200, 400, 600, 650, 675, 700, 800]


def test_sweep_uses_the_factor() -> None:
    run, calls = fake_run(capacity(2000))
    _, best = sweep(run, 100, start_rate=100, max_rate=100_000, bisect_steps=1, factor=3.0)
    assert calls == [100, 300, 900, 2700, 1800]
    assert best is not None
    assert best.target_rate == 1800


def test_sweep_stops_at_max_rate_without_bisecting_when_everything_holds() -> None:
    run, calls = fake_run(capacity(float("inf")))
    curve, best = sweep(run, 100, start_rate=100, max_rate=1000, bisect_steps=4)
    assert calls == [100, 200, 400, 800]
    assert best is not None
    assert best.target_rate == 800
    assert [r.target_rate for r in curve] == calls


def test_sweep_counts_errors_as_failing_the_slo() -> None:
    # From 400 req/s on, p99 is tiny but some requests fail: that rate does not hold.
    def behaviour(rate: float) -> Report:
        return report(rate, 1.0, requests=100, ok=90 if rate >= 400 else 100)

    run, calls = fake_run(behaviour)
    curve, best = sweep(run, 100, start_rate=100, max_rate=100_000, bisect_steps=2)
    assert calls == [100, 200, 400, 300, 350]
    assert best is not None
    assert best.target_rate == 350
    assert all(r.errors == 0 for r in curve if r.target_rate and r.target_rate <= 350)


def test_sweep_p99_equal_to_the_slo_does_not_hold_and_no_latencies_never_hold() -> None:
    run, _ = fake_run(lambda rate: report(rate, 100.0))
    assert sweep(run, 100, start_rate=100, max_rate=1000, bisect_steps=1)[1] is None
    # every request failed: no latencies at all, p99 counts as infinite
    run, _ = fake_run(lambda rate: report(rate, None, requests=10, ok=0))
    assert sweep(run, 100, start_rate=100, max_rate=1000, bisect_steps=1)[1] is None


def test_sweep_with_no_rate_holding_returns_none_and_a_sorted_curve() -> None:
    run, calls = fake_run(capacity(0))
    curve, best = sweep(run, 100, start_rate=100, max_rate=100_000, bisect_steps=4)
    assert best is None
    assert calls == [100, 50, 25, 12.5, 6.25]  # bisects down from 0..start_rate
    assert [r.target_rate for r in curve] == [6.25, 12.5, 25, 50, 100]


def test_sweep_with_start_above_max_runs_nothing() -> None:
    run, calls = fake_run(capacity(1e9))
    assert sweep(run, 100, start_rate=500, max_rate=100) == ([], None)
    assert calls == []


# --------------------------------------------------------------------------------------------
# summarize


def test_summarize_percentiles_errors_and_achieved_rate() -> None:
    config = LoadConfig(rate=50, duration_s=2.0, warmup_s=0)
    first = RawResult(
        requests=54,
        latencies=[i / 1000 for i in range(1, 51)],  # 1..50 ms
        statuses=Counter({503: 2, 429: 1}),
        exceptions=Counter({"Disconnected": 1}),
        window_start=100.0,
        last_completion=101.5,
        delayed_by_cap=3,
    )
    second = RawResult(
        requests=53,
        latencies=[i / 1000 for i in range(51, 101)],  # 51..100 ms
        exceptions=Counter({"ConnectionResetError": 2, "Disconnected": 1}),
        window_start=100.0,
        last_completion=101.9,
        delayed_by_cap=1,
    )
    r = summarize([first, second], config)
    assert r.mode == "open"
    assert r.target_rate == 50
    assert r.ok == 100
    assert r.requests == 107
    assert r.errors == 7
    assert r.errors_by_status == {"429": 1, "503": 2}
    assert r.errors_by_exception == {"ConnectionResetError": 2, "Disconnected": 2}
    assert r.delayed_by_cap == 4
    lat = r.latency_ms
    # numpy's linear interpolation over 1..100 ms
    assert lat["p50"] == pytest.approx(50.5)
    assert lat["p90"] == pytest.approx(90.1)
    assert lat["p95"] == pytest.approx(95.05)
    assert lat["p99"] == pytest.approx(99.01)
    assert lat["p99.9"] == pytest.approx(99.901)
    assert lat["max"] == pytest.approx(100.0)
    assert lat["mean"] == pytest.approx(50.5)
    assert r.p99_ms == pytest.approx(99.01)
    # all finished inside the 2 s window: rate over the window
    assert r.achieved_rps == pytest.approx(100 / 2.0)


def test_summarize_late_completions_stretch_the_window() -> None:
    config = LoadConfig(concurrency=4, duration_s=2.0, warmup_s=0)
    result = RawResult(requests=60, latencies=[0.01] * 60, window_start=10.0, last_completion=13.0)
    r = summarize([result], config)
    assert r.mode == "closed"
    assert r.concurrency == 4
    assert r.achieved_rps == pytest.approx(60 / 3.0)
    assert r.errors == 0


def test_summarize_without_successes() -> None:
    config = LoadConfig(rate=10, duration_s=1.0, warmup_s=0)
    result = RawResult(
        requests=10, exceptions=Counter({"ConnectionRefusedError": 10}), window_start=5.0
    )
    r = summarize([result], config)
    assert r.ok == 0
    assert r.requests == 10
    assert r.achieved_rps == 0.0
    assert r.latency_ms == {}
    assert r.p99_ms == float("inf")
    assert "ConnectionRefusedError" in r.text()


def test_summarize_puts_timeouts_in_the_percentiles_and_counts_them() -> None:
    config = LoadConfig(rate=10, duration_s=1.0, warmup_s=0)
    result = RawResult(
        requests=100,
        latencies=[0.01] * 98,
        timeout_latencies=[2.0, 2.1],
        exceptions=Counter({"RequestTimeout": 1, "NotCompleted": 1}),
        window_start=0.0,
        last_completion=0.9,
    )
    r = summarize([result], config)
    assert (r.requests, r.ok, r.errors, r.timed_out) == (100, 98, 2, 2)
    assert r.latency_ms["p50"] == pytest.approx(10.0)
    assert r.latency_ms["p99"] > 2000.0  # the two given up on are the top of the distribution
    assert r.latency_ms["max"] == pytest.approx(2100.0)
    assert r.achieved_rps == pytest.approx(98.0)
    assert "2 timed-out request(s)" in r.text()


# --------------------------------------------------------------------------------------------
# LoadConfig


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "exactly one"),
        ({"rate": 10, "concurrency": 2}, "exactly one"),
        ({"rate": 0}, "rate must be > 0"),
        ({"rate": -1}, "rate must be > 0"),
        ({"concurrency": 0}, "concurrency must be >= 1"),
        ({"concurrency": 1, "duration_s": 0}, "duration"),
        ({"concurrency": 1, "warmup_s": -0.1}, "warm-up"),
        ({"concurrency": 1, "processes": 0}, "processes"),
        ({"rate": 10, "max_outstanding": 0}, "max_outstanding"),
        ({"rate": 10, "max_outstanding": 1, "processes": 2}, "max_outstanding"),
    ],
)
def test_load_config_rejects(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LoadConfig(**kwargs)


def test_load_config_accepts_both_modes() -> None:
    assert LoadConfig(rate=10).open_loop
    assert not LoadConfig(concurrency=1, warmup_s=0).open_loop


@pytest.mark.parametrize("timeout_s", [0.0, -1.0])
def test_load_config_rejects_a_non_positive_timeout(timeout_s: float) -> None:
    # BUG: LoadConfig does not validate timeout_s. With `--timeout 0` the pool's sweeper spins
    # (asyncio.sleep(min(0.5, 0))) and times out every request at once: the run "succeeds"
    # with exit 0, 0 req/s and every request counted as RequestTimeout.
    with pytest.raises(ValueError, match="timeout"):
        LoadConfig(concurrency=1, timeout_s=timeout_s)


# --------------------------------------------------------------------------------------------
# transport


def mlp_request(base_url: str) -> bytes:
    body = json.dumps(
        {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0.5] * 64}]}
    ).encode()
    headers = {"Content-Type": "application/json"}
    return encode_post(f"{base_url}/v2/models/mlp/infer", body, headers)


def test_encode_post_bytes() -> None:
    raw = encode_post("http://h:81/v2/models/m/infer?x=1", b"{}", {"Content-Type": "a/b"})
    assert raw == (
        b"POST /v2/models/m/infer?x=1 HTTP/1.1\r\nHost: h:81\r\nContent-Length: 2\r\n"
        b"Content-Type: a/b\r\n\r\n{}"
    )


@pytest.mark.slow
async def test_pool_posts_to_a_real_server(mlp_server: str) -> None:
    raw = mlp_request(mlp_server)
    async with asyncio.timeout(20), ConnectionPool(mlp_server, 4, timeout_s=10) as pool:
        assert await pool.post(raw) == 200
        # keep-alive reuse, and several in flight at once
        assert await asyncio.gather(*(pool.post(raw) for _ in range(16))) == [200] * 16
        bad = encode_post(f"{mlp_server}/v2/models/nope/infer", b"{}", {})
        assert await pool.post(bad) == 404


async def test_pool_against_a_closed_port_raises_oserror(refusing_port: int) -> None:
    url = f"http://127.0.0.1:{refusing_port}"
    async with asyncio.timeout(10), ConnectionPool(url, 2, timeout_s=5) as pool:
        with pytest.raises(OSError):  # noqa: PT011 - any OSError subclass is the contract
            await pool.post(encode_post(url + "/v2/models/m/infer", b"{}", {}))


class RawServer:
    """A TCP server on 127.0.0.1 whose handler reads one request and then does `then`; its
    handlers are awaited on exit so no socket outlives the test's event loop."""

    def __init__(self, then: Callable[[asyncio.StreamReader], Any]) -> None:
        self._then = then
        self._handlers: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> str:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.append(task)
        try:
            await reader.read(1 << 16)
            await self._then(reader)
        finally:
            writer.close()
            await writer.wait_closed()

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()
        await self._server.wait_closed()
        await asyncio.gather(*self._handlers, return_exceptions=True)


async def until_client_hangs_up(reader: asyncio.StreamReader) -> None:
    await reader.read()


async def hang_up(reader: asyncio.StreamReader) -> None:
    return None


async def test_pool_times_out_a_server_that_never_answers() -> None:
    async with (
        asyncio.timeout(10),
        RawServer(until_client_hangs_up) as url,
        ConnectionPool(url, 1, timeout_s=0.4) as pool,
    ):
        # The behaviour is the RequestTimeout itself; asyncio.timeout(10) above only names a hang.
        with pytest.raises(RequestTimeout):
            await pool.post(encode_post(url + "/x", b"{}", {}))


async def test_pool_reports_a_server_that_hangs_up() -> None:
    async with (
        asyncio.timeout(10),
        RawServer(hang_up) as url,
        ConnectionPool(url, 1, timeout_s=5) as pool,
    ):
        with pytest.raises(ConnectionError):
            await pool.post(encode_post(url + "/x", b"{}", {}))


# --------------------------------------------------------------------------------------------
# CLI end to end

SHORT = ("--duration", "1", "--warmup", "0.5")


def assert_clean(report: dict[str, Any]) -> None:
    assert report["achieved_rps"] > 0
    assert report["ok"] == report["requests"] > 0
    assert report["errors_by_status"] == {}
    assert report["errors_by_exception"] == {}


@pytest.mark.slow
def test_cli_closed_loop_json(tmp_path: Path, mlp_server: str) -> None:
    out = bench_json(tmp_path, mlp_server, "-m", "mlp", "--concurrency", "4", *SHORT)
    assert out["model"] == "mlp"
    assert out["binary"] is False
    report = out["report"]
    assert_clean(report)
    assert report["mode"] == "closed"
    assert report["concurrency"] == 4
    assert report["server"]["mean_batch_rows"] >= 1
    assert report["server"]["runs"] > 0


@pytest.mark.slow
def test_cli_closed_loop_binary(tmp_path: Path, mlp_server: str) -> None:
    out = bench_json(tmp_path, mlp_server, "-m", "mlp", "--concurrency", "4", "--binary", *SHORT)
    assert out["binary"] is True
    assert_clean(out["report"])
    assert out["report"]["server"]["mean_batch_rows"] >= 1


@pytest.mark.slow
def test_cli_open_loop(tmp_path: Path, mlp_server: str) -> None:
    out = bench_json(tmp_path, mlp_server, "-m", "mlp", "--rate", "200", *SHORT)
    report = out["report"]
    assert_clean(report)
    assert report["mode"] == "open"
    assert report["target_rate"] == 200
    assert 190 <= report["requests"] <= 210  # 1 s at 200 req/s on a constant schedule
    assert report["server"]["mean_batch_rows"] >= 1


@pytest.mark.slow
def test_cli_noop(tmp_path: Path) -> None:
    out = bench_json(tmp_path, "--noop", "--concurrency", "2", *SHORT)
    assert out["model"] == "noop"
    assert_clean(out["report"])
    assert out["report"]["server"] == {}  # the no-op server has no statistics endpoint


def one_error_line(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 2, (done.returncode, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("batchserve: error: ")
    return lines[0]


@pytest.mark.slow
def test_cli_unknown_model(mlp_server: str) -> None:
    line = one_error_line(run_cli("bench", mlp_server, "-m", "nope", *SHORT))
    assert "404" in line


def test_cli_unreachable_url(refusing_port: int) -> None:
    line = one_error_line(run_cli("bench", f"http://127.0.0.1:{refusing_port}", "-m", "mlp"))
    assert "cannot reach" in line


@pytest.mark.slow
def test_cli_noop_invalid_load_is_a_one_line_error() -> None:
    # BUG: `_bench` in batchserve/cli.py catches only BenchError on the --noop path (the URL
    # path catches BenchError and ValueError), so LoadConfig's ValueError escapes as a
    # traceback with exit 1. Against a URL the same flags give exit 2 and one line.
    line = one_error_line(run_cli("bench", "--noop", "--rate", "0", *SHORT))
    assert "rate must be > 0" in line


@pytest.mark.slow
def test_cli_concurrency_zero_is_rejected(mlp_server: str) -> None:
    # BUG: batchserve/bench/command.py builds `concurrency=args.concurrency or 64`, so an
    # explicit `--concurrency 0` silently runs 64 callers instead of being rejected.
    line = one_error_line(
        run_cli(
            "bench",
            mlp_server,
            "-m",
            "mlp",
            "--concurrency",
            "0",
            "--duration",
            "0.2",
            "--warmup",
            "0",
        )
    )
    assert "concurrency must be >= 1" in line


# --------------------------------------------------------------------------------------------
# coordinated omission


@pytest.mark.slow
@pytest.mark.parametrize("max_outstanding", [1024, 1], ids=["uncapped", "capped"])
async def test_open_loop_latency_counts_queueing_from_the_scheduled_time(
    tmp_path: Path, max_outstanding: int
) -> None:
    """Overload a server of fixed capacity on purpose: the backlog grows for the whole run, so
    the last requests wait seconds even though each one is served in 50 ms.

    The server answers one request at a time, each after at least 50 ms (at most 20 req/s);
    it is offered 60 req/s for 1 s. Request i is scheduled at i/60 s and answered no earlier
    than (i+1)·50 ms, so from its scheduled time it waits at least 50 ms + i·33 ms: about 2 s
    for the last ones, whatever this machine's speed (a slower one only answers later). Two
    variants, each a real `batchserve bench` run:
    - uncapped: the backlog is in the server; latency must include it;
    - `--max-outstanding 1`: the backlog is in the client, one request on the wire at a time.
      A load generator that timed requests from when they were *sent* would report about
      50 ms for every request here (coordinated omission); timing from the *scheduled* time
      reports the same growing wait as the uncapped run.
    """
    out = tmp_path / "bench.json"
    # asyncio.timeout(120) is only a hang guard: the run takes about 3 s.
    async with asyncio.timeout(120), Recording(delay_s=0.05, serial=True) as url:
        process = await asyncio.create_subprocess_exec(
            *CLI, "bench", url, "-m", "m", "--rate", "60", "--duration", "1", "--warmup", "0",
            "--timeout", "30", "--max-outstanding", str(max_outstanding), "--json", str(out),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env=cli_env(),
        )  # fmt: skip
        _, stderr = await process.communicate()
    assert process.returncode == 0, stderr.decode()
    report = json.loads(out.read_text())["report"]
    assert_clean(report)
    assert report["requests"] >= 60
    # the top percentile is one of the last requests: at least 50 ms + 58 x 33 ms waited
    assert report["latency_ms"]["p99"] > 1500.0, report
    if max_outstanding == 1:
        assert report["delayed_by_cap"] > 0


# --------------------------------------------------------------------------------------------
# every scheduled request is accounted for (open loop)


def plain_workload(url: str, count: int = 1) -> Workload:
    """`count` distinct JSON bodies (each names its index) for `url`."""
    bodies = []
    for index in range(count):
        data = b'{"index":%d}' % index
        headers = {"Content-Type": "application/json"}
        bodies.append(Body(data, headers, encode_post(url, data, headers)))
    return Workload(url, tuple(bodies), 1)


class Recording:
    """A real aiohttp server on 127.0.0.1:0 (optionally TLS) that records every request's
    method, path, headers and body; POSTs are answered after `delay_s`, one at a time when
    `serial` (a server with a fixed capacity that builds a backlog)."""

    def __init__(self, delay_s: float = 0.0, serial: bool = False, ssl: Any = None) -> None:
        self.delay_s = delay_s
        self.lock = asyncio.Lock() if serial else None
        self.ssl = ssl
        self.seen: list[tuple[str, str, dict[str, str], bytes]] = []

    async def _infer(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.seen.append((request.method, request.path, dict(request.headers), body))
        if self.lock is None:
            await asyncio.sleep(self.delay_s)
        else:
            async with self.lock:
                await asyncio.sleep(self.delay_s)
        return web.json_response({"model_name": "m", "outputs": []})

    async def _get(self, request: web.Request) -> web.Response:
        self.seen.append((request.method, request.path, dict(request.headers), b""))
        if request.path.endswith("/stats"):
            entry = {"inference_count": 0, "execution_count": 0}
            return web.json_response({"model_stats": [entry]})
        spec = {"name": "input", "datatype": "FP32", "shape": [-1, 4]}
        return web.json_response(
            {"name": "m", "versions": ["1"], "platform": "x", "inputs": [spec], "outputs": []}
        )

    async def __aenter__(self) -> str:
        app = web.Application()
        app.router.add_post("/v2/models/{name}/infer", self._infer)
        app.router.add_get("/v2/models/{name}", self._get)
        app.router.add_get("/v2/models/{name}/stats", self._get)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0, ssl_context=self.ssl)
        await site.start()
        port = self.runner.addresses[0][1]
        return f"{'https' if self.ssl else 'http'}://127.0.0.1:{port}"

    async def __aexit__(self, *exc: object) -> None:
        await self.runner.cleanup()

    def posts(self) -> list[bytes]:
        return [body for method, _, _, body in self.seen if method == "POST"]


def load(workload: Workload, **config: Any) -> Awaitable[list[RawResult]]:
    return asyncio.to_thread(run_load, workload, LoadConfig(**config), False)


def accounted(result: Report) -> int:
    return (
        result.ok + sum(result.errors_by_status.values()) + sum(result.errors_by_exception.values())
    )


@pytest.mark.slow
@pytest.mark.parametrize("max_outstanding", [2, 1024])
async def test_open_loop_accounts_for_every_scheduled_request(max_outstanding: int) -> None:
    """A server that answers 20 req/s, one at a time, offered 60 req/s for 1 s with a 1 s
    timeout: about half the schedule cannot be answered in time. With a cap of 2 the backlog
    waits in the client for a slot; without one it waits in the server. Either way every one
    of the 60 scheduled requests is in the report, the late ones as timeouts, and the
    percentiles include them at their timeout instead of dropping them."""
    config = {"rate": 60.0, "duration_s": 1.0, "warmup_s": 0.0, "timeout_s": 1.0}
    # asyncio.timeout(30) is only a hang guard (the run takes about 2 s); nothing here bounds
    # how fast this machine is.
    async with asyncio.timeout(30), Recording(delay_s=0.05, serial=True) as url:
        workload = plain_workload(url + "/v2/models/m/infer")
        results = await load(workload, **config, max_outstanding=max_outstanding)
    result = summarize(results, LoadConfig(**config))
    assert 60 <= result.requests <= 61  # the constant schedule, counted, not the answers
    assert accounted(result) == result.requests
    # The server answers at most 20 req/s (each answer sleeps 50 ms, one at a time) for the
    # 2 s until the last deadline: a slower machine only answers fewer, so these bounds hold
    # whatever its speed.
    assert result.ok <= 45, result
    assert result.timed_out >= 10, result
    assert result.errors_by_status == {}
    # late requests time out at their deadline (a slot's wait included), never "the server
    # closed the connection", nor left for the end of the run to cancel (that would be
    # NotCompleted)
    assert result.errors_by_exception == {"RequestTimeout": result.requests - result.ok}
    assert result.timed_out == result.requests - result.ok
    assert result.latency_ms["p99"] >= 1000.0  # the backlog shows, at least at the timeout
    if max_outstanding == 2:
        assert result.delayed_by_cap > 0


@pytest.mark.parametrize(
    ("mode", "expected"),
    [({"rate": 20.0}, (10, 11)), ({"concurrency": 2}, (2, 2))],
    ids=["open", "closed"],
)
@pytest.mark.slow
async def test_a_request_stuck_connecting_times_out_at_its_deadline(
    mode: dict[str, Any], expected: tuple[int, int]
) -> None:
    """A TLS handshake that never completes holds each request before it is on the wire; its
    deadline covers connecting too, so each one times out then (not when the run ends) and is
    counted with its latency (open loop: each scheduled send; closed loop: each caller's first
    and only request)."""

    async def silent(reader: asyncio.StreamReader) -> None:
        await reader.read()  # never answers the handshake

    config = {**mode, "duration_s": 0.5, "warmup_s": 0.0, "timeout_s": 0.5}
    async with asyncio.timeout(20), RawServer(silent) as url:
        https = url.replace("http://", "https://") + "/v2/models/m/infer"
        results = await load(plain_workload(https), **config)
    result = summarize(results, LoadConfig(**config))
    assert expected[0] <= result.requests <= expected[1]
    # RequestTimeout for each, none NotCompleted: each was timed out at its own deadline, not
    # cancelled when the run ended (asyncio.timeout(20) above is only a hang guard).
    assert result.errors_by_exception == {"RequestTimeout": result.requests}
    assert result.timed_out == result.requests
    # counted at their wait, the timeout; uvloop's millisecond timers may fire a little early
    assert result.latency_ms["p50"] >= 500.0 - 1.0


# --------------------------------------------------------------------------------------------
# several processes


def test_constant_arrivals_of_several_processes_interleave_evenly() -> None:
    config = LoadConfig(rate=1000, processes=4, duration_s=1, warmup_s=0)
    merged = sorted(
        (when, process)
        for process in range(4)
        for when in send_times(config, process, 100.0, 100.02)
    )
    assert [when for when, _ in merged] == pytest.approx(
        [100.0 + m / 1000 for m in range(20)], abs=1e-9
    )
    assert [process for _, process in merged] == [0, 1, 2, 3] * 5


def test_poisson_arrivals_of_several_processes_are_independent() -> None:
    config = LoadConfig(rate=1000, processes=2, duration_s=1, warmup_s=0, arrivals="poisson")
    first, second = (list(send_times(config, p, 0.0, 10.0)) for p in range(2))
    assert set(first).isdisjoint(second)
    # each at half the rate: 5,000 expected in 10 s (sd ~71)
    assert all(4700 < len(times) < 5300 for times in (first, second))


def test_closed_loop_callers_are_split_with_global_ids() -> None:
    config = LoadConfig(concurrency=7, processes=3, warmup_s=0)
    assert [list(callers_of(config, p)) for p in range(3)] == [[0, 1, 2], [3, 4], [5, 6]]


@pytest.mark.slow
@pytest.mark.parametrize("mode", [{"rate": 200.0}, {"concurrency": 4}], ids=["open", "closed"])
async def test_several_processes_never_send_the_same_body_position(mode: dict[str, Any]) -> None:
    """4,096 distinct bodies and fewer requests than that: each body goes out at most once,
    whichever of the 2 processes sends it (a body sent twice is a cache hit that
    --unique-fraction promised would not happen)."""
    config = {**mode, "duration_s": 2.0, "warmup_s": 0.0, "processes": 2, "timeout_s": 5.0}
    server = Recording(delay_s=0.01)
    async with asyncio.timeout(60), server as url:
        workload = plain_workload(url + "/v2/models/m/infer", count=4096)
        results = await load(workload, **config)
    result = summarize(results, LoadConfig(**config))
    assert all(r.requests >= 10 for r in results), results  # both processes took part
    posts = server.posts()
    assert result.ok == result.requests == len(posts), result
    assert Counter(posts).most_common(1)[0][1] == 1


def test_a_failing_load_process_is_a_bench_error() -> None:
    config = LoadConfig(rate=10, processes=2, duration_s=0.1, warmup_s=0)
    with pytest.raises(BenchError, match="process failed: ValueError: expected an http"):
        run_load(plain_workload("ftp://127.0.0.1/v2/models/m/infer"), config, progress=False)


# --------------------------------------------------------------------------------------------
# the pool's own deadlines and shutdown


async def test_pool_times_out_a_request_waiting_for_a_slot() -> None:
    """One slot, held by a request the server never answers: the next request's deadline
    passes while it waits for the slot, and it times out then, not after the first."""
    async with (
        asyncio.timeout(10),
        RawServer(until_client_hangs_up) as url,
        ConnectionPool(url, 1, timeout_s=5) as pool,
    ):
        raw = encode_post(url + "/x", b"{}", {})
        started = time.perf_counter()
        holder = asyncio.create_task(pool.post(raw, started + 60))
        await wait_until(lambda: pool.saturated, "the first request to take the only slot")
        with pytest.raises(RequestTimeout, match="slot"):
            await pool.post(raw, started + 0.3)
        # Timed out at its own deadline while the slot's holder is still out: had it waited
        # for the slot, it would have come after the holder (whose deadline is a minute away).
        assert not holder.done()
        holder.cancel()
        with pytest.raises(asyncio.CancelledError):
            await holder
        assert not pool.saturated  # the slot came back


async def test_pool_shutdown_aborts_in_flight_requests_as_its_own() -> None:
    received = asyncio.Event()

    async def hold(reader: asyncio.StreamReader) -> None:
        received.set()
        await reader.read()

    async with asyncio.timeout(10), RawServer(hold) as url:
        async with ConnectionPool(url, 1, timeout_s=5) as pool:
            request = asyncio.create_task(pool.post(encode_post(url + "/x", b"{}", {})))
            await received.wait()
        with pytest.raises(Aborted) as caught:
            await request
        assert not isinstance(caught.value, Disconnected)  # not "closed by the server"


# --------------------------------------------------------------------------------------------
# headers, API keys, TLS


def test_request_headers() -> None:
    assert request_headers(["X-A: 1", "x-b:two words "], "k") == {
        "Authorization": "Bearer k",
        "X-A": "1",
        "x-b": "two words",
    }
    # an explicit Authorization header wins over the key, whatever its case
    assert request_headers(["authorization: Basic abc"], "k") == {"authorization": "Basic abc"}
    assert request_headers() == {}


@pytest.mark.parametrize(
    "pair",
    ["no colon", "Bad Name: x", ": x", "X-A: a\r\nX-Evil: 1", "Host: h", "content-length: 3"],
)
def test_request_headers_rejects(pair: str) -> None:
    with pytest.raises(BenchError, match="--header"):
        request_headers([pair])


@pytest.mark.slow
def test_cli_against_a_server_with_an_api_key(tmp_path: Path, mlp_path: Path) -> None:
    server = ServerProcess.start(str(mlp_path), "--api-key", "s3cret", log_dir=tmp_path)
    try:
        line = one_error_line(run_cli("bench", server.url, "-m", "mlp", *SHORT))
        assert "401" in line
        load = (server.url, "-m", "mlp", "--concurrency", "2", *SHORT)
        # the key from the environment: POSTs get in, and so do the statistics GETs
        report = bench_json(tmp_path, *load, env=cli_env(BATCHSERVE_API_KEY="s3cret"))["report"]
        assert_clean(report)
        assert report["server"]["runs"] > 0
        # the same as an explicit header
        header = ("--header", "Authorization: Bearer s3cret")
        assert_clean(bench_json(tmp_path, *load, *header)["report"])
    finally:
        server.stop()


def test_cli_rejects_other_schemes_and_bad_headers() -> None:
    line = one_error_line(run_cli("bench", "ftp://127.0.0.1:1", "-m", "m", *SHORT))
    assert "http:// or https://" in line
    line = one_error_line(run_cli("bench", "http://127.0.0.1:1", "-m", "m", "--header", "x"))
    assert "--header" in line


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 signed by its own key: (certificate, key) PEM files."""
    pytest.importorskip("cryptography")
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest.mark.slow
async def test_cli_over_tls_sends_the_headers_on_every_request(tmp_path: Path) -> None:
    """An https:// server with a self-signed certificate the client is told to trust: the
    metadata and statistics GETs and every POST go over TLS with the extra headers; the key
    stays out of the JSON report."""
    cert, key = self_signed(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    server = Recording(ssl=context)
    out = tmp_path / "tls.json"
    async with asyncio.timeout(60), server as url:
        assert url.startswith("https://")
        process = await asyncio.create_subprocess_exec(
            *CLI, "bench", url, "-m", "m", "--concurrency", "2", "--duration", "0.5",
            "--warmup", "0", "--header", "X-Tenant: blue", "--api-key", "sekrit-key",
            "--json", str(out),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=cli_env(SSL_CERT_FILE=str(cert)),
        )  # fmt: skip
        _, stderr = await process.communicate()
    assert process.returncode == 0, stderr.decode()
    report = json.loads(out.read_text())["report"]
    assert_clean(report)
    assert "sekrit-key" not in out.read_text()
    kinds = Counter(method for method, _, _, _ in server.seen)
    assert kinds["GET"] == 3  # metadata, statistics before and after
    assert kinds["POST"] == report["requests"] > 0
    for _, _, headers, _ in server.seen:
        assert headers["X-Tenant"] == "blue"
        assert headers["Authorization"] == "Bearer sekrit-key"


# --------------------------------------------------------------------------------------------
# Bounds: connecting, reading metadata


async def test_pool_times_out_a_connection_the_server_never_completes() -> None:
    """A TLS handshake the server never answers: the request's deadline covers connecting,
    which the sweep (of connections already made) cannot see."""
    async with asyncio.timeout(20), RawServer(until_client_hangs_up) as url:
        url = url.replace("http://", "https://")
        async with ConnectionPool(url, 1, timeout_s=0.4) as pool:
            with pytest.raises(RequestTimeout, match="connection"):
                await pool.post(encode_post(url + "/x", b"{}", {}))


class JsonServer:
    """Answers every GET with headers for `length` bytes, then `body`, then (with `drip`) one
    byte at a time until the client hangs up."""

    def __init__(self, body: bytes, length: int, drip: bool = False) -> None:
        self._body, self._length, self._drip = body, length, drip
        self._handlers: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> str:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.append(task)
        try:
            await reader.readuntil(b"\r\n\r\n")
            head = f"HTTP/1.1 200 OK\r\nContent-Length: {self._length}\r\n\r\n".encode()
            writer.write(head + self._body)
            await writer.drain()
            while self._drip and not reader.at_eof():
                writer.write(b" ")
                await writer.drain()
                # The server's pace, not a wait in the test: a byte at a time, never done.
                await asyncio.sleep(0.05)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()
        for task in self._handlers:
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._server.wait_closed()


async def test_get_json_has_a_deadline_for_the_whole_answer() -> None:
    async with asyncio.timeout(30), JsonServer(b"{", 1 << 20, drip=True) as url:
        with pytest.raises(BenchError, match="in time"):
            await asyncio.to_thread(get_json, url + "/v2/models/m", 0.5)


async def test_get_json_refuses_an_answer_past_its_size_limit() -> None:
    body = json.dumps({"name": "m", "pad": "x" * 5000}).encode()
    async with asyncio.timeout(30), JsonServer(body, len(body)) as url:
        with pytest.raises(BenchError, match="more than 1000 bytes"):
            await asyncio.to_thread(get_json, url + "/v2/models/m", 5.0, max_bytes=1000)
        assert await asyncio.to_thread(get_json, url + "/v2/models/m", 5.0) == json.loads(body)


def _start(script: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", script], stderr=subprocess.PIPE, text=True, start_new_session=True
    )


def test_a_server_that_prints_nothing_fails_to_start_in_time() -> None:
    process = _start("import time; time.sleep(60)")
    try:
        assert process.stderr is not None
        with pytest.raises(BenchError, match=r"did not start within 0\.5 s"):
            listening_url(process.stderr, 0.5, "the server")
    finally:
        process.kill()
        process.wait()
        if process.stderr is not None:
            process.stderr.close()


def test_a_started_server_logging_a_lot_is_never_blocked_on_its_pipe(tmp_path: Path) -> None:
    """Its log lines after `listening on` are drained: 4 MB is far past a pipe's buffer."""
    marker = tmp_path / "done"
    process = _start(
        "import sys, time\n"
        "print('listening on http://127.0.0.1:1', file=sys.stderr, flush=True)\n"
        "for _ in range(4096): print('x' * 1023, file=sys.stderr)\n"
        "sys.stderr.flush()\n"
        f"open({str(marker)!r}, 'w').close()\n"
        "time.sleep(60)\n"
    )
    try:
        assert process.stderr is not None
        assert listening_url(process.stderr, 30, "the server") == "http://127.0.0.1:1"
        block_until(marker.exists, "the child to write all of its log")
        assert process.poll() is None
    finally:
        process.kill()
        process.wait()
        if process.stderr is not None:
            process.stderr.close()


def test_a_server_that_exits_while_starting_is_reported() -> None:
    process = _start("import sys; print('bad flag', file=sys.stderr); sys.exit(2)")
    try:
        assert process.stderr is not None
        with pytest.raises(BenchError, match="exited while starting"):
            listening_url(process.stderr, 30, "the server")
    finally:
        process.wait()
        if process.stderr is not None:
            process.stderr.close()
