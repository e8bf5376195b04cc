"""ResNet-50 end to end with JPEG bodies: images/s, latency, and where each request's time goes.

A real `batchserve serve resnet50.onnx --handler image-classification` on 127.0.0.1; N clients
post 640x480 JPEGs back to back (`Content-Type: image/jpeg`) for `--duration` seconds. The
server's own metrics give ONNX Runtime's share per image; the handler's preprocessing (decode,
resize, crop, normalise) and postprocessing are timed in-process on the same image.

    python benchmarks/jpeg_e2e.py        # writes docs/results/jpeg-e2e.json
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import compare  # noqa: E402

BUILD = REPO / "build"


def jpeg(seed: int, width: int = 640, height: int = 480) -> bytes:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.stack([x / width * 255, y / height * 255, (x + y) / (width + height) * 255], -1)
    image += rng.normal(0, 12, image.shape)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


async def drive(url: str, bodies: list[bytes], clients: int, seconds: float) -> dict[str, Any]:
    latencies: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + seconds

    async def client(index: int, http: aiohttp.ClientSession) -> None:
        nonlocal errors
        i = index
        while time.perf_counter() < stop_at:
            started = time.perf_counter()
            async with http.post(url, data=bodies[i % len(bodies)],
                                 headers={"Content-Type": "image/jpeg"}) as r:  # fmt: skip
                await r.read()
                if r.status == 200:
                    latencies.append(time.perf_counter() - started)
                else:
                    errors += 1
            i += clients

    async with aiohttp.ClientSession() as http:
        began = time.perf_counter()
        await asyncio.gather(*(client(i, http) for i in range(clients)))
        elapsed = time.perf_counter() - began
    ms = np.array(latencies) * 1000
    return {
        "images_per_s": len(latencies) / elapsed,
        "ok": len(latencies),
        "errors": errors,
        "latency_ms": {
            p: float(np.percentile(ms, q)) for p, q in (("p50", 50), ("p95", 95), ("p99", 99))
        },
    }


def scrape(base: str) -> dict[str, float]:
    with urllib.request.urlopen(f"{base}/metrics", timeout=5) as response:
        text = response.read().decode()
    wanted = ("batchserve_inference_duration_seconds_sum", "batchserve_inference_rows_total",
              "batchserve_inference_runs_total")  # fmt: skip
    values: dict[str, float] = {}
    for line in text.splitlines():
        for name in wanted:
            if line.startswith(name + "{"):
                values[name] = float(line.rsplit(" ", 1)[1])
    return values


def handler_times(model: Path, body: bytes, repeats: int = 50) -> dict[str, float]:
    """Median ms per image of the handler's preprocess and postprocess, in this process."""
    import onnxruntime as ort

    from batchserve.handlers import RawRequest, prepare_handler
    from batchserve.runtime.metadata import ModelMetadata

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    metadata = ModelMetadata.from_session(session)
    handler = prepare_handler("image-classification", metadata, {})
    request = RawRequest.from_body(body, "image/jpeg")
    pre, post = [], []
    inputs = handler.preprocess(request)
    outputs = dict(zip(metadata.output_names, session.run(None, inputs), strict=True))
    for _ in range(repeats):
        t0 = time.perf_counter()
        handler.preprocess(request)
        t1 = time.perf_counter()
        handler.postprocess(outputs, request)
        t2 = time.perf_counter()
        pre.append(t1 - t0)
        post.append(t2 - t1)
    return {"preprocess_ms": statistics.median(pre) * 1000,
            "postprocess_ms": statistics.median(post) * 1000}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--duration", type=float, default=20.0)
    # Spinning ORT threads take the cores the decoding threads need (measured: off is faster).
    parser.add_argument("--spin", choices=["auto", "on", "off"], default="off")
    parser.add_argument("--json", default=str(REPO / "docs" / "results" / "jpeg-e2e.json"))
    args = parser.parse_args()
    BUILD.mkdir(exist_ok=True)
    model = BUILD / "resnet50.onnx"
    if not model.exists():
        subprocess.run([sys.executable, "-m", "batchserve", "example-model", "resnet50", "-o",
                        str(model)], check=True, cwd=REPO)  # fmt: skip
    bodies = [jpeg(seed) for seed in range(16)]
    port = compare.free_port()
    command = [sys.executable, "-m", "batchserve", "serve", str(model), "--name", "resnet50",
               "--host", compare.HOST, "--port", str(port), "--log-level", "warning",
               "--handler", "image-classification", "--max-batch-size", "16",
               "--spin", args.spin]  # fmt: skip
    proc = compare.start_server(command, BUILD / "jpeg-e2e-server.log")
    base = f"http://{compare.HOST}:{port}"
    try:
        compare.wait_ready(proc, base)
        url = f"{base}/v2/models/resnet50/infer"
        asyncio.run(drive(url, bodies, args.clients, 3.0))  # warm-up
        before = scrape(base)
        result = asyncio.run(drive(url, bodies, args.clients, args.duration))
        after = scrape(base)
    finally:
        compare.stop_server(proc)
    rows = after["batchserve_inference_rows_total"] - before["batchserve_inference_rows_total"]
    runs = after["batchserve_inference_runs_total"] - before["batchserve_inference_runs_total"]
    onnx_s = (after["batchserve_inference_duration_seconds_sum"]
              - before["batchserve_inference_duration_seconds_sum"])  # fmt: skip
    result.update(handler_times(model, bodies[0]))
    result["inference_ms_per_image"] = onnx_s / rows * 1000 if rows else 0.0
    result["mean_batch_rows"] = rows / runs if runs else 0.0
    result.update(clients=args.clients, duration_s=args.duration, spin=args.spin,
                  machine=f"{os.cpu_count()} CPUs",
                  when=time.strftime("%Y-%m-%d %H:%M"), image="640x480 JPEG")  # fmt: skip
    Path(args.json).write_text(json.dumps(result, indent=1))
    lat = result["latency_ms"]
    print(f"| {result['images_per_s']:.1f} images/s | p50 {lat['p50']:.0f} ms | p99 "
          f"{lat['p99']:.0f} ms | preprocess {result['preprocess_ms']:.1f} ms/image | ONNX "
          f"Runtime {result['inference_ms_per_image']:.1f} ms/image (mean batch "
          f"{result['mean_batch_rows']:.1f}) | postprocess {result['postprocess_ms']:.2f} ms | "
          f"errors {result['errors']} |")  # fmt: skip
    return 0 if result["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
