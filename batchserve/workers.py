"""`batchserve serve --workers N`: N server processes behind one listening socket.

One Python event loop tops out at a few thousand small requests per second; when the front end
is the bottleneck (a fast model on a GPU, many cores), several processes share the port. The
supervisor reserves the port and starts N workers that each listen on it with SO_REUSEPORT (the
kernel spreads new connections evenly across them); every worker loads its own engines and
batches its own traffic, so the GPU is shared between their sessions. The supervisor restarts
a worker that dies, forwards SIGTERM/SIGINT so every worker drains, and exits 0 when all did.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import FrameType

log = logging.getLogger("batchserve.workers")

RESTART_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0)
# A worker that stayed up this long was healthy: its next crash starts the backoff over.
HEALTHY_AFTER_S = 60.0


def restart_delay(restarts: int, uptime_s: float) -> tuple[float, int]:
    """(seconds before restarting a worker that died after `uptime_s`, its new restart count),
    given how often it was restarted in a row before."""
    if uptime_s >= HEALTHY_AFTER_S:
        restarts = 0
    return RESTART_BACKOFF_S[min(restarts, len(RESTART_BACKOFF_S) - 1)], restarts + 1


def notify_ready(ready_fd: int) -> None:
    """A worker tells its supervisor that it listens. A supervisor already gone (killed) is
    no error here: the worker notices the orphaning on its own and drains."""
    try:
        os.write(ready_fd, b"1")
    except BrokenPipeError:
        log.warning("the supervisor is gone before this worker was ready")
    finally:
        os.close(ready_fd)


@dataclass(frozen=True, slots=True)
class WorkerPlan:
    """workers: processes; argv: the `serve` arguments each worker gets (minus --workers);
    metrics_port: worker i also listens on metrics_port + i (its own /metrics), or None;
    ready_timeout_s: how long the first start may take before the supervisor gives up."""

    workers: int
    argv: tuple[str, ...]
    host: str
    port: int
    shutdown_grace_s: float
    metrics_port: int | None = None
    ready_timeout_s: float = 600.0  # for every worker to load its models and listen


class Supervisor:
    def __init__(self, plan: WorkerPlan, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.plan = plan
        self._clock = clock
        self._stopping = False
        self._children: list[subprocess.Popen[bytes] | None] = [None] * plan.workers
        self._restarts = [0] * plan.workers
        self._started_at = [0.0] * plan.workers
        self._restart_at: list[float | None] = [None] * plan.workers  # a dead worker's due time

    def run(self) -> int:
        plan = self.plan
        family = socket.AF_INET6 if ":" in plan.host else socket.AF_INET
        # Bound, never listening: it holds the port (port 0 becomes a real one) for the workers
        # and their restarts; connections only go to sockets that listen.
        holder = socket.socket(family, socket.SOCK_STREAM)
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the workers do
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind((plan.host, plan.port))
        port = holder.getsockname()[1]
        ready_read, ready_write = os.pipe()
        previous = {
            sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)
        }
        try:
            for index in range(plan.workers):
                self._start(index, port, ready_write)
            ready = self._wait_ready(ready_read, port)
            # A stop signal while workers start is a stop like any other: a worker already
            # listening may be serving, and drains.
            if not ready and not self._stopping:
                self._stop_all()
                return 2
            if ready:
                host = f"[{plan.host}]" if ":" in plan.host else plan.host
                log.info("listening on http://%s:%d (%d workers)", host, port, plan.workers)
            while not self._stopping:
                self._reap_and_restart(port, ready_write)
                time.sleep(0.2)
            log.info("signal received: draining %d workers", plan.workers)
            return self._stop_all()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            holder.close()
            os.close(ready_read)
            os.close(ready_write)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._stopping = True

    def _start(self, index: int, port: int, ready_fd: int) -> None:
        plan = self.plan
        argv = [sys.executable, "-m", "batchserve", "serve", *plan.argv, "--workers", "1",
                "--port", str(port), "--reuse-port", "--ready-fd", str(ready_fd)]  # fmt: skip
        if plan.metrics_port is not None:
            argv += ["--metrics-port", str(plan.metrics_port + index)]
        # The supervisor decides these per worker: the environment must not override them.
        env = {k: v for k, v in os.environ.items()
               if k not in ("BATCHSERVE_WORKERS", "BATCHSERVE_METRICS_PORT")}  # fmt: skip
        env["BATCHSERVE_WORKER_INDEX"] = str(index)
        self._children[index] = self._spawn(argv, ready_fd, env)
        self._started_at[index] = self._clock()

    def _spawn(
        self, argv: list[str], ready_fd: int, env: dict[str, str]
    ) -> subprocess.Popen[bytes]:
        # Its own process group: what the worker starts (handler processes) can be ended with
        # it, even after the worker itself was killed outright.
        return subprocess.Popen(argv, pass_fds=(ready_fd,), env=env, start_new_session=True)

    def _wait_ready(self, ready_fd: int, port: int) -> bool:
        """Every worker writes one byte once it listens; a worker that exits first fails it."""
        pending = self.plan.workers
        deadline = self._clock() + self.plan.ready_timeout_s
        os.set_blocking(ready_fd, False)
        while pending:
            if self._stopping:
                return False
            if self._clock() > deadline:
                log.error("%d worker(s) not ready within %g s", pending, self.plan.ready_timeout_s)
                return False
            with contextlib.suppress(BlockingIOError):
                pending -= len(os.read(ready_fd, pending))
            dead = [c for c in self._children if c is not None and c.poll() is not None]
            if dead and pending:
                log.error("a worker exited with code %s before it was ready", dead[0].returncode)
                return False
            time.sleep(0.05)
        return True

    def _reap_and_restart(self, port: int, ready_fd: int) -> None:
        """One pass: schedule a restart for each worker found dead, start those now due.
        Never sleeps, so the loop keeps reaping and a signal is acted on at once."""
        now = self._clock()
        for index, child in enumerate(self._children):
            if child is not None and child.poll() is not None:
                _end_group(child)
                delay, self._restarts[index] = restart_delay(
                    self._restarts[index], now - self._started_at[index]
                )
                log.error(
                    "worker %d exited with code %s: restarting it in %.1f s",
                    index, child.returncode, delay,
                )  # fmt: skip
                self._children[index] = None
                self._restart_at[index] = now + delay
            due = self._restart_at[index]
            if due is not None and now >= due and not self._stopping:
                self._restart_at[index] = None
                self._start(index, port, ready_fd)

    def _stop_all(self) -> int:
        children = [c for c in self._children if c is not None]
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.plan.shutdown_grace_s + 10.0
        codes: list[int] = []
        for child in children:
            try:
                codes.append(child.wait(timeout=max(0.1, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                child.kill()
                codes.append(child.wait())
            _end_group(child)
        # A worker still starting (a restart) has not installed its handlers: SIGTERM ends it
        # at once, which is right, since it had taken no request yet.
        return 0 if all(code in (0, -signal.SIGTERM) for code in codes) else 1


def _end_group(child: subprocess.Popen[bytes]) -> None:
    """Kill what is left of a reaped worker's process group (its handler processes)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(child.pid, signal.SIGKILL)


def worker_argv(argv: Sequence[str]) -> tuple[str, ...]:
    """The `serve` arguments a worker gets: the supervisor's, minus the ones it decides."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name == "--reuse-port":
            continue
        if name in ("--workers", "--metrics-port", "--port", "--ready-fd"):
            skip = "=" not in arg  # the value is the next argument
            continue
        out.append(arg)
    return tuple(out)
