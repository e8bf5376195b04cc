"""The quick-start demo: build the example `mlp`, serve it, query it, load it, stop it.

Runs `batchserve serve` as a real subprocess on 127.0.0.1 (an ephemeral port), prints one
request and its answer, drives it for a bounded time with concurrent keep-alive connections,
prints throughput, latency percentiles and the server's batch sizes, then stops it with
SIGTERM and checks that it exits 0.

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
    command += ["--host", "127.0.0.1", "--port", "0"]
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


async def load(url: str, body: bytes, seconds: float, connections: int) -> list[float]:
    latencies: list[float] = []
    stop_at = time.perf_counter() + seconds
    headers = {"Content-Type": "application/json"}

    async def client(http: aiohttp.ClientSession) -> None:
        while time.perf_counter() < stop_at:
            started = time.perf_counter()
            async with http.post(url, data=body, headers=headers) as response:
                await response.read()
                if response.status != 200:
                    raise SystemExit(f"request failed with {response.status}")
            latencies.append(time.perf_counter() - started)

    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector) as http:
        await asyncio.gather(*(client(http) for _ in range(connections)))
    return latencies


async def demo(args: argparse.Namespace, url: str) -> None:
    infer = f"{url}/v2/models/mlp/infer"
    x = np.random.default_rng(0).standard_normal(64).astype(np.float32)
    body = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": x.tolist()}]}
    async with aiohttp.ClientSession() as http:
        await show_one(http, infer, body)
    print(f"\nload: {args.connections} connections for {args.seconds:.0f} s ...")
    latencies = await load(infer, json.dumps(body).encode(), args.seconds, args.connections)
    ms = np.percentile(np.array(latencies) * 1000, [50, 95, 99])
    print(
        f"  {len(latencies) / args.seconds:,.0f} requests/s, {len(latencies):,} requests, 0 errors"
    )
    print(f"  latency p50 {ms[0]:.2f} ms, p95 {ms[1]:.2f} ms, p99 {ms[2]:.2f} ms")
    print("  (client and server share this machine's cores; see docs/benchmarks.md for wrk)")
    async with aiohttp.ClientSession() as http, http.get(f"{url}/v2/models/mlp/stats") as r:
        stats = (await r.json())["model_stats"][0]
    print(
        f"  server: {stats['request_count']:,} requests in {stats['execution_count']:,} "
        f"ONNX Runtime runs (mean batch {stats['mean_batch_rows']:.1f} rows)"
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
