"""The quick-start demo: build the example `mlp`, serve it, query it, load it, stop it.

Runs `batchserve serve` as a real subprocess on 127.0.0.1 (an ephemeral port), prints one
request and its answer, drives it for a bounded time with `batchserve bench` (64 keep-alive
connections), which prints throughput, latency percentiles and the server's batch sizes, then
stops it with SIGTERM and checks that it exits 0.

    python benchmarks/demo.py [--seconds 10] [--connections 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from batchserve.examples import write_example


def start(model: Path) -> tuple[subprocess.Popen[str], str]:
    command = [sys.executable, "-m", "batchserve", "serve", str(model), "--name", "mlp"]
    command += ["--host", "127.0.0.1", "--port", "0", "--grpc-port", "0"]
    print("$", " ".join(["batchserve", *command[3:]]))
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    assert process.stderr is not None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            break
        print("  server:", line.rstrip())
        found = re.search(r"listening on (http://\S+)", line)
        if found:
            return process, found.group(1)
    process.kill()
    raise SystemExit("the server did not start")


def stop(process: subprocess.Popen[str]) -> int:
    process.send_signal(signal.SIGTERM)
    _, rest = process.communicate(timeout=30)
    for line in rest.splitlines():
        print("  server:", line)
    return process.returncode


async def show_one(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> None:
    shown = {**body, "inputs": [{**body["inputs"][0], "data": "[64 floats]"}]}
    print(f"\nPOST {url}\n  {json.dumps(shown)}")
    async with http.post(url, json=body) as response:
        answer = await response.json()
    print(f"-> {response.status} {json.dumps(answer)[:300]}")


async def demo(args: argparse.Namespace, url: str) -> None:
    infer = f"{url}/v2/models/mlp/infer"
    x = np.random.default_rng(0).standard_normal(64).astype(np.float32)
    body = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": x.tolist()}]}
    async with aiohttp.ClientSession() as http:
        await show_one(http, infer, body)
    command = ["batchserve", "bench", url, "-m", "mlp", "--concurrency", str(args.connections)]
    command += ["--duration", f"{args.seconds:g}", "--warmup", "2"]
    print(f"\n$ {' '.join(command)}", flush=True)
    # The load generator shares this machine's cores with the server; see docs/benchmarks.md.
    await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "batchserve", *command[1:]], check=True
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="batchserve-demo-") as tmp:
        model = write_example("mlp", Path(tmp) / "mlp.onnx")
        print(f"built the example model: {model}")
        process, url = start(model)
        try:
            asyncio.run(demo(args, url))
        finally:
            code = stop(process)
    print(f"\nserver exited with status {code} after SIGTERM")
    return code


if __name__ == "__main__":
    sys.exit(main())
