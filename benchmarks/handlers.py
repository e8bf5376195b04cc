"""The image-classification handler's costs: JPEG decoders, thread vs process executor, and
ResNet-50 end to end with JPEG bodies (no HTTP).

    python benchmarks/handlers.py [--seconds 3] [--out docs/results/handlers.json]

(a) decode throughput of one core, Pillow vs simplejpeg, 640x480 JPEGs (quality 90), and the
    full preprocessing (decode, resize to 256, crop 224, normalise) per image;
(b) preprocessing through the handler executor, 2 workers, threads vs processes (images/s);
(c) resnet50 (random weights, the example model) behind the handler and the batching engine,
    closed loop: images/s, latency percentiles, and each request's time in preprocessing
    (executor wait included) vs inference (queue wait included).
Writes the JSON and prints a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import io
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from batchserve import BatchConfig, Engine, RuntimeConfig
from batchserve.examples import write_example
from batchserve.handlers import HandlerConfig, HandlerPipeline, RawRequest, imaging
from batchserve.handlers.image import ImageClassificationHandler
from batchserve.runtime.metadata import ModelMetadata, TensorSpec

RESNET = ModelMetadata(
    (TensorSpec("input", "FP32", (-1, 3, 224, 224)),),
    (TensorSpec("logits", "FP32", (-1, 1000)),),
    True,
)


def photos(count: int, width: int = 640, height: int = 480) -> list[bytes]:
    """Fixed, photo-like JPEGs: gradients, a few shapes, sensor-like noise."""
    rng = np.random.default_rng(0)
    out = []
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    for i in range(count):
        image = np.stack([x / width * 255, y / height * 255, (x + y) / (width + height) * 255], -1)
        for _ in range(6):
            top, left = rng.integers(0, height - 60), rng.integers(0, width - 60)
            image[top : top + 60, left : left + 90] = rng.integers(0, 255, 3)
        image = np.roll(image, i * 37, axis=1) + rng.normal(0, 10, image.shape)
        buffer = io.BytesIO()
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def per_second(fn: Callable[[bytes], object], images: list[bytes], seconds: float) -> float:
    fn(images[0])
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        fn(images[done % len(images)])
        done += 1
    return done / (time.perf_counter() - started)


def decoders(images: list[bytes], seconds: float) -> dict[str, Any]:
    def pillow(data: bytes) -> object:
        return imaging.decode(data, 40_000_000, "pillow")

    def simplejpeg(data: bytes) -> object:
        return imaging.decode(data, 40_000_000, "simplejpeg")

    result: dict[str, Any] = {"decode_per_core": {"pillow": per_second(pillow, images, seconds)}}
    choices = ["pillow"]
    if imaging.HAVE_SIMPLEJPEG:
        result["decode_per_core"]["simplejpeg"] = per_second(simplejpeg, images, seconds)
        choices.append("simplejpeg")
    result["preprocess_per_core"] = {}
    for decoder in choices:
        handler = ImageClassificationHandler()
        handler.setup(RESNET, {"decoder": decoder})
        result["preprocess_per_core"][decoder] = per_second(handler.transform, images, seconds)
    return result


async def executors(images: list[bytes], seconds: float, workers: int) -> dict[str, float]:
    rates: dict[str, float] = {}
    for kind in ("thread", "process"):
        config = HandlerConfig("image-classification", executor=kind, workers=workers)  # type: ignore[arg-type]
        async with HandlerPipeline(config, RESNET) as pipeline:
            rates[kind] = await _preprocess_rate(pipeline, images, seconds, 4 * workers)
    return rates


async def _preprocess_rate(
    pipeline: HandlerPipeline, images: list[bytes], seconds: float, clients: int
) -> float:
    requests = [RawRequest.from_body(data, "image/jpeg") for data in images]
    done = 0
    stop = time.perf_counter() + seconds

    async def client(i: int) -> None:
        nonlocal done
        while time.perf_counter() < stop:
            await pipeline.preprocess(requests[(i + done) % len(requests)])
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    return done / (time.perf_counter() - started)


async def end_to_end(
    model: Path,
    images: list[bytes],
    seconds: float,
    clients: int,
    kind: str,
    workers: int,
    spin: bool | None,
) -> dict[str, Any]:
    runtime = RuntimeConfig(instances=1, spin=spin)
    engine = Engine(model, BatchConfig(max_batch_size=16), runtime)
    config = HandlerConfig("image-classification", executor=kind, workers=workers)  # type: ignore[arg-type]
    latencies: list[float] = []
    pre: list[float] = []
    inference: list[float] = []
    async with engine, HandlerPipeline(config, engine.metadata) as pipeline:
        base_infer = functools.partial(engine.infer, cache=False)

        async def timed_infer(inputs: dict[str, np.ndarray], *, timeout_s: float | None) -> Any:
            started = time.perf_counter()
            try:
                return await base_infer(inputs, timeout_s=timeout_s)
            finally:
                inference.append(time.perf_counter() - started)

        async def one(data: bytes) -> None:
            request = RawRequest.from_body(data, "image/jpeg")
            started = time.perf_counter()
            inputs = await pipeline.preprocess(request)
            pre.append(time.perf_counter() - started)
            outputs = await timed_infer(inputs, timeout_s=None)
            await pipeline.postprocess(outputs, request)
            latencies.append(time.perf_counter() - started)

        for data in images[:clients]:  # first runs of each batch shape: not measured
            await one(data)
        latencies.clear(), pre.clear(), inference.clear()
        stop = time.perf_counter() + seconds

        async def client(i: int) -> None:
            n = i
            while time.perf_counter() < stop:
                await one(images[n % len(images)])
                n += clients

        started = time.perf_counter()
        await asyncio.gather(*(client(i) for i in range(clients)))
        elapsed = time.perf_counter() - started
        batcher = engine.statistics().batcher
    ms = np.array(latencies) * 1000
    return {
        "executor": kind,
        "handler_workers": workers,
        "ort_spin": "auto (on)" if spin is None else spin,
        "clients": clients,
        "images_per_s": len(latencies) / elapsed,
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "preprocess_ms_mean": float(np.mean(pre) * 1000),
        "inference_ms_mean": float(np.mean(inference) * 1000),
        "mean_batch_rows": batcher.rows / batcher.batches if batcher.batches else 0.0,
    }


def table(result: dict[str, Any]) -> str:
    lines = ["| measurement | figure |", "|---|---|"]
    for name, rate in result["decode_per_core"].items():
        lines.append(f"| JPEG 640x480 decode, 1 core, {name} | {rate:,.0f} images/s |")
    for name, rate in result["preprocess_per_core"].items():
        lines.append(f"| full preprocess, 1 core, {name} | {rate:,.0f} images/s |")
    for kind, rate in result["executor_preprocess"].items():
        lines.append(f"| preprocess via {kind} executor, 2 workers | {rate:,.0f} images/s |")
    for run in result["end_to_end"]:
        lines.append(
            f"| resnet50 e2e, {run['executor']} x{run['handler_workers']}, "
            f"ORT spin {run['ort_spin']}, "
            f"{run['clients']} clients | {run['images_per_s']:.1f} images/s, "
            f"p50 {run['p50_ms']:.0f} ms, p99 {run['p99_ms']:.0f} ms; per request "
            f"preprocess {run['preprocess_ms_mean']:.1f} ms, inference "
            f"{run['inference_ms_mean']:.0f} ms, batch {run['mean_batch_rows']:.1f} |"
        )
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    images = photos(32)
    result: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or "unknown"},
        "image": "640x480 JPEG, quality 90, mean "
        f"{sum(map(len, images)) // len(images) // 1024} KiB",
    }
    result |= decoders(images, args.seconds)
    result["executor_preprocess"] = await executors(images, args.seconds, 2)
    with tempfile.TemporaryDirectory() as tmp:
        model = write_example("resnet50", Path(tmp) / "resnet50.onnx")
        result["end_to_end"] = [
            await end_to_end(model, images, args.e2e_seconds, args.clients, kind, workers, spin)
            for kind, workers, spin in (
                ("thread", 1, None),
                ("thread", 2, None),
                ("thread", 2, False),
                ("process", 1, None),
            )
        ]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--e2e-seconds", type=float, default=15.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--out", default="docs/results/handlers.json")
    args = parser.parse_args()
    result = asyncio.run(main_async(args))
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))


if __name__ == "__main__":
    main()
