"""Proves an installed batchserve serves: start it, wait for readiness, one V2 inference, SIGTERM.

Run by install.sh --self-test with the new environment's interpreter; standard library only, since
the images carry no HTTP client. It also checks that the server wrote nothing into its
environment, working directory or home, which is what lets the images run on a read-only root
filesystem with only /tmp writable.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

NAME = "selftest"
READY_TIMEOUT_S = 120.0
EXIT_TIMEOUT_S = 30.0
# The environment both images set (ENV in Dockerfile and Dockerfile.cuda): no .pyc files, and no
# ONNX Runtime telemetry, which would otherwise write a device id under $HOME/.cache.
IMAGE_ENV = {"PYTHONDONTWRITEBYTECODE": "1", "ORT_DISABLE_TELEMETRY": "1"}
# Filler values that every Open Inference Protocol datatype accepts in JSON.
ZERO: dict[str, Any] = {"BOOL": False, "BYTES": ""}


class SelfTestFailed(Exception):
    pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def call(url: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(errors="replace")


def wait_ready(base: str, server: subprocess.Popen[bytes], log: Path) -> float:
    started = time.monotonic()
    while time.monotonic() - started < READY_TIMEOUT_S:
        if server.poll() is not None:
            raise SelfTestFailed(f"server exited with {server.returncode}:\n{log.read_text()}")
        try:
            if call(base + "/v2/health/ready")[0] == 200:
                return time.monotonic() - started
        except OSError:
            pass  # not listening yet
        time.sleep(0.1)
    raise SelfTestFailed(f"not ready after {READY_TIMEOUT_S:g} s:\n{log.read_text()}")


def infer_once(base: str) -> list[str]:
    status, metadata = call(f"{base}/v2/models/{NAME}")
    if status != 200:
        raise SelfTestFailed(f"model metadata: {status} {metadata}")
    inputs = []
    for spec in metadata["inputs"]:
        shape = [d if d >= 0 else 1 for d in spec["shape"]]
        fill = ZERO.get(spec["datatype"], 0)
        inputs.append(
            {
                "name": spec["name"],
                "shape": shape,
                "datatype": spec["datatype"],
                "data": [fill] * math.prod(shape),
            }
        )
    status, answer = call(f"{base}/v2/models/{NAME}/infer", {"id": "1", "inputs": inputs})
    if status != 200:
        raise SelfTestFailed(f"infer: {status} {answer}")
    if answer.get("model_name") != NAME or answer.get("id") != "1" or not answer.get("outputs"):
        raise SelfTestFailed(f"infer: unexpected answer {answer}")
    return [f"{o['name']}{o['shape']}" for o in answer["outputs"]]


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def run(venv: Path, model: Path) -> None:
    before = tree(venv)
    with tempfile.TemporaryDirectory(prefix="batchserve-selftest-") as scratch:
        home, cwd, log = Path(scratch, "home"), Path(scratch, "cwd"), Path(scratch, "server.log")
        home.mkdir()
        cwd.mkdir()
        env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHSERVE_")}
        env.update(IMAGE_ENV, HOME=str(home))
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        command = [str(venv / "bin" / "batchserve"), "serve", str(model), "--name", NAME]
        command += ["--host", "127.0.0.1", "--port", str(port), "--device", "cpu"]
        with log.open("wb") as out:
            server = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=out)
            try:
                ready_s = wait_ready(base, server, log)
                outputs = infer_once(base)
                server.send_signal(signal.SIGTERM)
                code = server.wait(EXIT_TIMEOUT_S)
            finally:
                if server.poll() is None:
                    server.kill()
                    server.wait()
        if code != 0:
            raise SelfTestFailed(f"exit status {code} after SIGTERM:\n{log.read_text()}")
        written = sorted(tree(home) | tree(cwd)) + sorted(tree(venv) - before)
        if written:
            raise SelfTestFailed(f"the server wrote files outside /tmp: {written[:10]}")
    print(f"self-test passed: ready in {ready_s:.1f} s, infer 200 ({', '.join(outputs)}), exit 0")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--venv", type=Path, default=Path(sys.prefix))
    parser.add_argument("model", type=Path)
    args = parser.parse_args()
    try:
        run(args.venv.resolve(), args.model.resolve())
    except SelfTestFailed as err:
        print(f"self-test failed: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
