"""What several test modules share (fixtures stay in conftest.py): waiting on conditions, the
server and Redis as child processes, and the builders of requests, images, model versions and
Dockerfile instructions that more than one module's tests use."""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import http.client
import inspect
import io
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import aiohttp
import numpy as np
import pytest
from PIL import Image

from batchserve.app import Server
from batchserve.handlers import RawRequest
from batchserve.runtime.metadata import ModelMetadata, TensorSpec

import models

# -------------------------------------------------------------------------------- waiting


async def wait_until(condition: Callable[[], object], what: str, timeout_s: float = 30.0) -> Any:
    """Poll `condition` (where no event exists to await: another process, a background write)
    until it gives a true value, which is returned; it may be a coroutine function (an HTTP
    check). A generous bound, so a machine busy with other work only makes it slower."""
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


def block_until(condition: Callable[[], object], what: str, timeout_s: float = 30.0) -> Any:
    """`wait_until` for code that cannot await (a synchronous fixture or test): it runs on an
    event loop of its own in a thread, so it works whether or not a loop runs here."""
    thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="block-until")
    try:
        return thread.submit(asyncio.run, wait_until(condition, what, timeout_s)).result()
    finally:
        thread.shutdown(wait=False)  # a test stopped meanwhile (its timeout) is not held up


def wait_for_exits(pids: Iterable[int], timeout_s: float = 30.0) -> set[int]:
    """Wait, on the processes' own exit events (pidfds), until every one of `pids` has ended
    or `timeout_s` passed; returns those still running. Works for processes that are not our
    children (a killed server's workers), which `waitpid` cannot wait for."""
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


# -------------------------------------------------------------------------------- servers

StartServer = Callable[..., Awaitable[Server]]  # the `start_server` fixture: in-process servers
CLI = (sys.executable, "-m", "batchserve")


def run_cli(*args: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
    """`batchserve ARGS` run to its end, its output read by `subprocess.run` itself."""
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout_s)


class PortTaken(Exception):
    """The port picked for a server was taken by another process before the server bound it."""


class ServerProcess:
    """`batchserve serve ARGS` as a child process on 127.0.0.1. Its output goes to a file
    (`log`), never to a pipe nobody reads; it is stopped by PID and waited for.

    Ready means what a load balancer sees: GET /v2/health/ready answers 200 and, with
    `--workers N`, N sockets listen on the port (the supervisor's port is served by each worker
    once that worker is ready). The hidden `--ready-fd` is not used: it makes the process a
    supervised worker (its own orphan watch, its own log lines), not the command a user runs,
    and a supervisor of `--workers` does not take it. gRPC is off unless `grpc` (then on
    `grpc_port`, a free port too)."""

    def __init__(
        self, args: Sequence[str], log_dir: Path, env: Mapping[str, str], grpc: bool = False
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.grpc_port = free_port() if grpc else None
        where = ["--host", "127.0.0.1", "--port", str(self.port)]
        where += ["--grpc-port", str(self.grpc_port) if grpc else "off"]
        self.workers = _workers(args, env)
        with tempfile.NamedTemporaryFile(
            "wb", dir=log_dir, prefix="serve-", suffix=".log", delete=False
        ) as out:
            self.log_path = Path(out.name)
            self.process = subprocess.Popen(
                [*CLI, "serve", *args, *where],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **env},
            )

    @classmethod
    def start(
        cls,
        *args: str,
        log_dir: Path,
        env: Mapping[str, str] | None = None,
        timeout_s: float = 60,
        grpc: bool = False,
    ) -> Self:
        """Start it and return once it is ready; a failed start raises with its log."""
        for _ in range(3):  # a port is picked, then bound by the server: another may come first
            # Only asked of subclasses when wanted: theirs may take the three arguments alone.
            server = cls(args, log_dir, env or {}, grpc) if grpc else cls(args, log_dir, env or {})
            try:
                block_until(server._ready, f"{server.url}/v2/health/ready", timeout_s)
            except PortTaken:
                continue
            except AssertionError as err:
                server.kill()
                raise AssertionError(f"{err}\n--- its log:\n{server.log}") from None
            except BaseException:
                server.kill()
                raise
            return server
        raise AssertionError("three ports in a row were taken before the server listened")

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, signum: int = signal.SIGTERM, timeout_s: float = 30.0) -> int:
        """Send `signum` (SIGTERM: drain and exit) and wait for the exit; its code."""
        if self.process.poll() is None:
            self.process.send_signal(signum)
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"still running {timeout_s:g} s after signal {signum}:\n{self.log}"
            ) from None

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()

    def _ready(self) -> bool:
        code = self.process.poll()
        if code is not None:
            if "Address already in use" in self.log:
                raise PortTaken
            raise AssertionError(f"the server exited with code {code} before it was ready")
        return answers_200(self.port, "/v2/health/ready") and listeners(self.port) >= self.workers


StartServerProcess = Callable[..., ServerProcess]  # the `serve_process` fixture


def _workers(args: Sequence[str], env: Mapping[str, str]) -> int:
    workers = env.get("BATCHSERVE_WORKERS", "1")
    for index, arg in enumerate(args):
        if arg == "--workers":
            workers = args[index + 1]
        elif arg.startswith("--workers="):
            workers = arg.partition("=")[2]
    return int(workers)


def free_port() -> int:
    """A port nothing uses now (the kernel's pick for port 0); a caller binds it later."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def answers_200(port: int, path: str) -> bool:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", path)
        return connection.getresponse().status == 200
    except (OSError, http.client.HTTPException):  # refused or cut: not listening yet
        return False
    finally:
        connection.close()


def listeners(port: int) -> int:
    """How many sockets on this machine listen on `port` (each worker of a group has its own)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                listening = fields[3] == "0A"  # TCP_LISTEN
                if listening and int(fields[1].rpartition(":")[2], 16) == port:
                    count += 1
    return count


class RedisProcess:
    """A real `redis-server` on 127.0.0.1 and a free port, in a temp dir; can be killed and
    restarted on the same port to simulate an outage."""

    def __init__(self, binary: str, directory: Path) -> None:
        self.binary = binary
        self.directory = directory
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.directory), "--protected-mode", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        block_until(self._accepts, f"redis-server on port {self.port}", timeout_s=30)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def _accepts(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"redis-server exited with code {self.process.returncode}")
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", self.port)) == 0


# -------------------------------------------------------------------------------- requests


def slow_body(rows: int, **parameters: object) -> tuple[io.BytesIO, dict[str, str]]:
    """A binary V2 request of `rows` rows for the `slow` model (tests/models.py)."""
    x = np.zeros((rows, 1024), np.float32)
    tensor = {"name": "x", "shape": [rows, 1024], "datatype": "FP32",
              "parameters": {"binary_data_size": x.nbytes}}  # fmt: skip
    request: dict[str, object] = {"inputs": [tensor]}
    if parameters:
        request["parameters"] = parameters
    header = json.dumps(request).encode()
    return io.BytesIO(header + x.tobytes()), {"Inference-Header-Content-Length": str(len(header))}


# -------------------------------------------------------------------------------- images

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)

RESNET_METADATA = ModelMetadata(
    (TensorSpec("input", "FP32", (-1, 3, 224, 224)),),
    (TensorSpec("logits", "FP32", (-1, 1000)),),
    True,
)


def photo(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A photo-like RGB image: smooth gradients, a bright square off centre, some noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.stack([x / width * 255, y / height * 255, (x + y) / (width + height) * 255], -1)
    image[height // 5 : height // 3, width // 4 : width // 2] = (250, 30, 200)
    image += rng.normal(0, 12, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def encode(pixels: np.ndarray, fmt: str, **params: Any) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt, **params)
    return buffer.getvalue()


def reference_preprocess(data: bytes, size: int = 224, resize: int = 256) -> np.ndarray:
    """torchvision's Resize(256) + CenterCrop(224) + ToTensor + Normalize, written out with
    Pillow's own crop and a plain division."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = image.size
    if w <= h:
        new_w, new_h = resize, int(resize * h / w)
    else:
        new_w, new_h = int(resize * w / h), resize
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    left, top = int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))  # noqa: RUF046
    image = image.crop((left, top, left + size, top + size))
    x = np.asarray(image, dtype=np.float32) / 255.0
    return ((x - MEAN) / STD).transpose(2, 0, 1)


def reference_top_k(logits: np.ndarray, k: int = 5) -> list[tuple[int, float]]:
    z = logits.astype(np.float64)
    p = np.exp(z - z.max())
    p /= p.sum()
    order = sorted(range(len(p)), key=lambda i: (-z[i], i))[:k]
    return [(i, float(p[i])) for i in order]


def raw(data: bytes, content_type: str = "image/jpeg", **parameters: str) -> RawRequest:
    return RawRequest.from_body(data, content_type, {"X-Trace": "1"}, parameters)


def png_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares width x height, followed by nothing a decoder could use."""
    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    crc = zlib.crc32(b"IHDR" + ihdr).to_bytes(4, "big")
    return b"\x89PNG\r\n\x1a\n" + (13).to_bytes(4, "big") + b"IHDR" + ihdr + crc


def with_jpeg_size(data: bytes, width: int, height: int) -> bytes:
    """A real JPEG with its frame header rewritten to claim another size."""
    at = data.index(b"\xff\xc0")
    patched = bytearray(data)
    patched[at + 5 : at + 7] = height.to_bytes(2, "big")
    patched[at + 7 : at + 9] = width.to_bytes(2, "big")
    return bytes(patched)


# -------------------------------------------------------------------------------- repositories

X = [[1.0, 2.0, 3.0, 4.0]]  # the input of a `scaled` model version (tests/models.py)


def add_version(root: Path, model: str, version: str, factor: float) -> None:
    """Write a version as the repository would see it appear: complete, in one rename."""
    staging = root / model / f".staging-{version}"
    models.scaled(staging / "model.onnx", factor)
    staging.rename(root / model / version)


def write_config(root: Path, model: str, text: str) -> None:
    (root / model).mkdir(parents=True, exist_ok=True)
    (root / model / "config.toml").write_text(text)


def scaled_body(x: list[list[float]] = X) -> dict[str, Any]:
    return {"inputs": [{"name": "x", "shape": [len(x), 4], "datatype": "FP32", "data": x}]}


async def infer(
    http: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any]]:
    async with http.post(url, json=scaled_body(), headers=headers) as r:
        return r.status, await r.json()


def check_version(answer: dict[str, Any]) -> str:
    """The version that answered, checked against its outputs (version N multiplies by N)."""
    version = answer["model_version"]
    assert answer["outputs"][0]["data"] == [v * int(version) for v in X[0]], answer
    return str(version)


# -------------------------------------------------------------------------------- Dockerfiles

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "deploy" / "docker"
DOCKERFILES = {"cpu": DOCKER / "Dockerfile", "cuda": DOCKER / "Dockerfile.cuda"}


@dataclass(frozen=True)
class Instruction:
    keyword: str
    arguments: str
    stage: int

    def exec_form(self) -> list[str]:
        words = json.loads(self.arguments)
        assert isinstance(words, list), f"{self.keyword} is not in exec form"
        return [str(w) for w in words]


def parse_dockerfile(path: Path) -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped; FROM starts a stage."""
    instructions: list[Instruction] = []
    stage, pending = -1, ""
    for raw_line in path.read_text().splitlines():
        line = raw_line.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, arguments = (pending + line).partition(" ")
        pending = ""
        if keyword.upper() == "FROM":
            stage += 1
        instructions.append(Instruction(keyword.upper(), arguments.strip(), stage))
    return instructions


def final_stage(path: Path) -> list[Instruction]:
    instructions = parse_dockerfile(path)
    last = max(i.stage for i in instructions)
    return [i for i in instructions if i.stage == last]


def only(instructions: list[Instruction], keyword: str) -> Instruction:
    found = [i for i in instructions if i.keyword == keyword]
    assert len(found) == 1, f"expected one {keyword}, found {len(found)}"
    return found[0]


def serve_command() -> argparse.ArgumentParser:
    """The real `batchserve serve` parser (its defaults read BATCHSERVE_* as it is built)."""
    from batchserve.cli import build_parser

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    serve: argparse.ArgumentParser = commands.choices["serve"]
    return serve


def serve_variables() -> dict[str, argparse.Action]:
    """Every `batchserve serve` option by the BATCHSERVE_* variable it reads."""
    return {
        "BATCHSERVE_" + a.option_strings[-1].lstrip("-").upper().replace("-", "_"): a
        for a in serve_command()._actions
        if a.option_strings and a.dest != "help"
    }


def parse_with_env(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> argparse.Namespace:
    """`batchserve serve m.onnx` with exactly `env` as its BATCHSERVE_* variables."""
    with monkeypatch.context() as patch:
        for name in list(os.environ):
            if name.startswith("BATCHSERVE_"):
                patch.delenv(name)
        for name, value in env.items():
            patch.setenv(name, value)
        return serve_command().parse_args(["m.onnx"])
