"""The cost per MB of each step a request body takes, socket to ONNX Runtime input, on the CPU.

Steps, for one image-sized input sent as FP32 (602 KB), FP16 (301 KB) or UINT8 (150 KB):

- receive: an aiohttp + uvloop server reading the whole body of a request
  (`await request.read()`) and answering nothing, loaded by `h2load --h1` over one connection
  from another process; the time per request minus that of an empty body, per MB. It counts
  the kernel's copy out of the socket, aiohttp's chunks and the join into one `bytes`.
- decode (binary tensors): `decode_request` of the V2 binary body: `np.frombuffer` over the
  body, so no copy.
- assemble: `np.concatenate` of 8 such requests into one batch (the batcher's one copy).
- bind: `OrtValue.ortvalue_from_numpy` of the batch on the CPU (what I/O binding hands ONNX
  Runtime; on a GPU the same call with `"cuda"` is the host-to-device copy, which cannot be
  measured here).
- decode (JSON), for comparison: `decode_request` of the same tensor as JSON floats.

    python benchmarks/body_path.py --json docs/results/body-path.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

sys.path.insert(0, str(HERE))

from compare import free_port  # noqa: E402
from grpc_ceiling import have_h2load, run_h2load  # noqa: E402

from batchserve.protocol import decode_request, encode_request  # noqa: E402

SHAPE = (1, 3, 224, 224)
KINDS = {"FP32": np.float32, "FP16": np.float16, "UINT8": np.uint8}
BATCH = 8

SINK = """
import asyncio, sys
import uvloop
from aiohttp import web

async def sink(request):
    await request.read()
    return web.Response(body=b"")

async def main(port):
    app = web.Application(client_max_size=1 << 30)
    app.router.add_post("/sink", sink)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()

uvloop.run(main(int(sys.argv[1])))
"""


def per_call_s(fn: Callable[[], Any], rounds: int) -> float:
    fn()  # first call: allocations, caches
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def receive_s(port: int, body: Path, seconds: float) -> float:
    """Seconds per request for this body over one connection, one request at a time."""
    result = run_h2load(f"http://127.0.0.1:{port}/sink", body,
                        ["content-type: application/octet-stream"], connections=1, streams=1,
                        seconds=seconds, warmup_s=1, h1=True)  # fmt: skip
    return 1.0 / float(result["rps"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="h2load per body size")
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    if not have_h2load():
        return 2
    import onnxruntime as ort

    port = free_port()
    rng = np.random.default_rng(0)
    rows: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="body-path-") as tmp:
        sink = subprocess.Popen([sys.executable, "-c", SINK, str(port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        try:
            empty = Path(tmp) / "empty.body"
            empty.write_bytes(b"x")  # h2load maps the file: it cannot be empty
            deadline = time.monotonic() + 30
            while True:  # a benchmark's start-up poll
                try:
                    base_s = receive_s(port, empty, 1.0)
                    break
                except RuntimeError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
            base_s = receive_s(port, empty, args.seconds)
            for kind, dtype in KINDS.items():
                pixels = rng.integers(0, 256, SHAPE) if kind == "UINT8" else rng.random(SHAPE)
                array = pixels.astype(dtype)
                body, header_length = encode_request({"input": array}, binary=True)
                mb = len(body) / 1e6
                path = Path(tmp) / f"{kind}.body"
                path.write_bytes(body)
                received_s = max(0.0, receive_s(port, path, args.seconds) - base_s)
                decoded = decode_request(body, header_length)
                assert decoded.inputs["input"].shape == SHAPE
                decode_s = per_call_s(partial(decode_request, body, header_length), args.rounds)
                arrays = [decoded.inputs["input"]] * BATCH
                batch = np.concatenate(arrays)
                assemble_s = per_call_s(partial(np.concatenate, arrays), args.rounds) / BATCH
                bind = partial(ort.OrtValue.ortvalue_from_numpy, batch, "cpu")
                bind_s = per_call_s(bind, args.rounds) / BATCH
                json_body, _ = encode_request({"input": array}, binary=False)
                json_s = per_call_s(partial(decode_request, json_body), max(5, args.rounds // 5))
                rows[kind] = {
                    "body_mb": mb,
                    "receive_us_per_mb": received_s / mb * 1e6,
                    "decode_binary_us_per_mb": decode_s / mb * 1e6,
                    "assemble_us_per_mb": assemble_s / mb * 1e6,
                    "bind_cpu_us_per_mb": bind_s / mb * 1e6,
                    "decode_json_us_per_mb_of_tensor": json_s / mb * 1e6,
                    "json_body_mb": len(json_body) / 1e6,
                }
                print(json.dumps({kind: rows[kind]}), flush=True)
        finally:
            sink.terminate()
            sink.wait(30)
    print("\n| input | body | receive | decode (binary) | assemble | bind (CPU) | decode (JSON) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for kind, r in rows.items():
        print(f"| {kind} | {r['body_mb'] * 1000:,.0f} KB | {r['receive_us_per_mb']:,.0f} µs/MB "
              f"| {r['decode_binary_us_per_mb']:,.1f} µs/MB | {r['assemble_us_per_mb']:,.0f} µs/MB "
              f"| {r['bind_cpu_us_per_mb']:,.0f} µs/MB "
              f"| {r['decode_json_us_per_mb_of_tensor']:,.0f} µs/MB |")  # fmt: skip
    if args.json:
        output = {"machine": f"{os.cpu_count()} CPUs", "batch": BATCH, "rows": rows}
        Path(args.json).write_text(json.dumps(output, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
