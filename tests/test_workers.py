"""`batchserve serve --workers N`: processes sharing one port (real processes, real sockets)."""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from batchserve.workers import (
    HEALTHY_AFTER_S,
    RESTART_BACKOFF_S,
    Supervisor,
    WorkerPlan,
    notify_ready,
    restart_delay,
    worker_argv,
)

from helpers import StartServerProcess, wait_for_exits, wait_until

BODY = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0.5] * 64}]}


def two_free_ports() -> int:
    """A port p with p + 1 free as well (each worker's own metrics port)."""
    for _ in range(50):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
                return int(port)
    raise AssertionError("no two consecutive free ports")


def test_workers_get_the_serve_arguments_minus_the_ones_the_supervisor_sets() -> None:
    argv = ["m.onnx", "--workers", "3", "--port=9", "--metrics-port", "7", "--reuse-port",
            "--name", "m", "--ready-fd", "5", "--max-batch-size", "8"]  # fmt: skip
    assert worker_argv(argv) == ("m.onnx", "--name", "m", "--max-batch-size", "8")


def requests_by_worker(text: str) -> float:
    found = re.search(
        r'^batchserve_requests_total\{model="mlp",protocol="http",status_class="2xx"\} (\S+)$',
        text, re.M,
    )  # fmt: skip
    return float(found.group(1)) if found else 0.0


def worker_pids(supervisor: int) -> list[int]:
    children = Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()
    return [int(pid) for pid in children]


@pytest.mark.slow
async def test_two_workers_share_the_port_survive_a_crash_and_drain_on_sigterm(
    mlp_path: Path, serve_process: StartServerProcess
) -> None:
    metrics = two_free_ports()
    server = serve_process(str(mlp_path), "--name", "mlp", "--workers", "2",
                           "--metrics-port", str(metrics))  # fmt: skip
    try:
        url = f"{server.url}/v2/models/mlp/infer"
        connector = aiohttp.TCPConnector(limit=16, force_close=False)
        async with aiohttp.ClientSession(connector=connector) as http:

            async def burst(count: int) -> list[int]:
                async def one() -> int:
                    async with http.post(url, json=BODY) as r:
                        await r.read()
                        return r.status

                return await asyncio.gather(*(one() for _ in range(count)))

            assert set(await burst(400)) == {200}
            counts = []
            for port in (metrics, metrics + 1):
                async with http.get(f"http://127.0.0.1:{port}/metrics") as r:
                    counts.append(requests_by_worker(await r.text()))
            # Both workers took connections; together they answered every request.
            assert all(c > 0 for c in counts), counts
            assert sum(counts) == 400

            victim = worker_pids(server.process.pid)[0]
            os.kill(victim, signal.SIGKILL)

            def replaced() -> bool:
                pids = worker_pids(server.process.pid)
                return victim not in pids and len(pids) == 2

            await wait_until(replaced, "a new worker in place of the killed one")
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:

            async def post() -> int | None:
                try:
                    async with http.post(url, json=BODY) as r:
                        return r.status
                except aiohttp.ClientConnectionError:  # the new worker is still loading
                    return None

            async def post_on_a_fresh_connection() -> int:
                return int(await wait_until(post, "an answer on a fresh connection"))

            # fresh connections: both the old and the new worker serve
            statuses = [await post_on_a_fresh_connection() for _ in range(40)]
            assert statuses == [200] * 40
        assert server.stop() == 0
    finally:
        server.kill()
    assert "worker 0 exited" in server.log or "worker 1 exited" in server.log


@pytest.mark.slow
def test_workers_drain_and_exit_when_the_supervisor_is_killed(
    mlp_path: Path, serve_process: StartServerProcess
) -> None:
    server = serve_process(str(mlp_path), "--name", "mlp", "--workers", "2")
    try:
        workers = worker_pids(server.process.pid)
        assert len(workers) == 2
        server.kill()  # SIGKILL: no chance to forward anything
        alive = wait_for_exits(workers, timeout_s=30)
        for pid in alive:  # never leave a stray process behind, even when failing
            os.kill(pid, signal.SIGKILL)
        assert alive == set()
    finally:
        server.kill()


def test_restart_backoff_grows_and_resets_after_a_healthy_run() -> None:
    assert restart_delay(0, 1.0) == (RESTART_BACKOFF_S[0], 1)
    assert restart_delay(9, 1.0) == (RESTART_BACKOFF_S[-1], 10)
    # Up for a minute: the crash days later starts the backoff over.
    assert restart_delay(9, HEALTHY_AFTER_S) == (RESTART_BACKOFF_S[0], 1)


class CrashingSupervisor(Supervisor):
    """Real child processes that exit at once (a worker crashing on start)."""

    def _spawn(
        self, argv: list[str], ready_fd: int, env: dict[str, str]
    ) -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-c", "raise SystemExit(1)"])


def test_restarts_are_scheduled_not_slept() -> None:
    now = [100.0]
    supervisor = CrashingSupervisor(WorkerPlan(1, (), "127.0.0.1", 0, 1.0), clock=lambda: now[0])
    supervisor._restarts[0] = 9  # the longest backoff
    supervisor._start(0, 0, -1)
    first = supervisor._children[0]
    assert first is not None
    first.wait()
    supervisor._reap_and_restart(0, -1)
    # The pass returns without the restart: it is due on the clock (which has not moved), and
    # only a pass after that time starts it.
    assert supervisor._children[0] is None
    now[0] += RESTART_BACKOFF_S[-1] - 0.1
    supervisor._reap_and_restart(0, -1)
    assert supervisor._children[0] is None  # not yet due
    now[0] += 0.2
    supervisor._reap_and_restart(0, -1)
    second = supervisor._children[0]
    assert second is not None
    assert second is not first
    second.wait()


def test_waiting_for_workers_has_a_deadline() -> None:
    class Hanging(Supervisor):
        def _spawn(
            self, argv: list[str], ready_fd: int, env: dict[str, str]
        ) -> subprocess.Popen[bytes]:
            return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])

    # A clock that moves a tenth of a second each time it is read: the deadline passes after a
    # few checks whatever this machine's speed, and the worker (which never gets ready nor
    # exits) cannot end the wait any other way.
    ticks = itertools.count(100.0, 0.1)
    plan = WorkerPlan(1, (), "127.0.0.1", 0, 1.0, ready_timeout_s=0.3)
    supervisor = Hanging(plan, clock=lambda: next(ticks))
    read, write = os.pipe()
    try:
        supervisor._start(0, 0, write)
        assert supervisor._wait_ready(read, 0) is False
    finally:
        assert supervisor._stop_all() in (0, 1)
        os.close(read)
        os.close(write)


def test_a_stop_signal_while_workers_start_drains_them_and_exits_0() -> None:
    class Starting(Supervisor):
        def _spawn(
            self, argv: list[str], ready_fd: int, env: dict[str, str]
        ) -> subprocess.Popen[bytes]:
            return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])

    def clock() -> float:  # SIGTERM arrives as the supervisor starts waiting for its workers
        os.kill(os.getpid(), signal.SIGTERM)
        return 100.0

    supervisor = Starting(WorkerPlan(2, (), "127.0.0.1", 0, 1.0), clock=clock)
    assert supervisor.run() == 0  # a worker ended by the signal before it was ready is fine
    assert all(c is not None and c.returncode == -signal.SIGTERM for c in supervisor._children)


def test_ready_notice_to_a_dead_supervisor_is_not_an_error() -> None:
    read, write = os.pipe()
    os.close(read)  # the supervisor is gone
    notify_ready(write)  # no BrokenPipeError
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(write)  # and the descriptor is closed
