"""CUDA check: batchserve's `--device cuda` path on a real GPU, against the CPU as reference.

Builds the example `mlp` and `resnet50`, then for each:
1. correctness: the CUDA engine's outputs match CPU ONNX Runtime on the same random inputs;
2. raw ONNX Runtime CUDA throughput per batch size (the ceiling);
3. the batchserve engine on CUDA with 1 and 2 sessions (streams), 128 concurrent callers of
   one row each, in process (no HTTP);
4. the CLI: `batchserve serve --device cuda` answers a binary V2 request and exits 0 on SIGTERM.

Writes a JSON summary to `$OUT/cuda_check.json` (or the path given) and prints it.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from batchserve import BatchConfig, Device, Engine, RuntimeConfig
from batchserve.examples import write_example

ROWS = {"mlp": (64,), "resnet50": (3, 224, 224)}


def gpu_name() -> str:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        return out.stdout.strip()
    except OSError:
        return "unknown"


def raw_throughput(path: Path, shape: tuple[int, ...], batches: list[int]) -> dict[str, float]:
    session = ort.InferenceSession(
        str(path),
        providers=[("CUDAExecutionProvider", {"device_id": "0"}), "CPUExecutionProvider"],
        enable_fallback=0,
    )
    if session.get_providers()[0] != "CUDAExecutionProvider":
        # ORT only warns (on stderr) and gives CPU when CUDA's libraries do not load.
        raise SystemExit(f"ONNX Runtime is not on CUDA: {session.get_providers()}")
    name = session.get_inputs()[0].name
    result = {}
    for batch in batches:
        x = np.random.default_rng(0).standard_normal((batch, *shape)).astype(np.float32)
        for _ in range(3):
            session.run(None, {name: x})
        runs, started = 0, time.perf_counter()
        while time.perf_counter() - started < 3.0:
            session.run(None, {name: x})
            runs += 1
        result[str(batch)] = runs * batch / (time.perf_counter() - started)
    return result


async def engine_check(path: Path, shape: tuple[int, ...], instances: int) -> dict[str, Any]:
    rng = np.random.default_rng(1)
    xs = [
        rng.standard_normal((int(rng.integers(1, 5)), *shape)).astype(np.float32) for _ in range(64)
    ]
    cpu = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = cpu.get_inputs()[0].name
    runtime = RuntimeConfig(instances=instances, device=Device("cuda", 0))
    async with Engine(path, BatchConfig(max_batch_size=64), runtime) as engine:
        got = await asyncio.gather(*(engine.infer({name: x}) for x in xs))
        worst = 0.0
        for x, out in zip(xs, got, strict=True):
            (value,) = out.values()
            expected = cpu.run(None, {name: x})[0]
            scale = float(np.abs(expected).max()) or 1.0
            worst = max(worst, float(np.abs(value - expected).max()) / scale)
        one = rng.standard_normal((1, *shape)).astype(np.float32)
        done, stop_at = 0, time.perf_counter() + 5.0

        async def caller() -> None:
            nonlocal done
            while time.perf_counter() < stop_at:
                await engine.infer({name: one})
                done += 1

        started = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(128)))
        elapsed = time.perf_counter() - started
        stats = engine.statistics().batcher
    return {
        "instances": instances,
        "max_relative_error_vs_cpu": worst,
        "rows_per_s": done / elapsed,
        "mean_batch_rows": stats.rows / max(stats.batches, 1),
    }


def cli_check(path: Path) -> dict[str, Any]:
    command = [
        sys.executable,
        "-m",
        "batchserve",
        "serve",
        str(path),
        "--name",
        "m",
        "--device",
        "cuda:0",
        "--instances",
        "2",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
    ]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    assert process.stderr is not None
    url, log = None, []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and url is None:
        line = process.stderr.readline()
        if not line:
            break
        log.append(line)
        found = re.search(r"listening on (http://\S+)", line)
        url = found.group(1) if found else None
    if url is None:
        process.kill()
        return {"ok": False, "log": "".join(log)[-2000:]}
    x = np.ones((2, 64), dtype=np.float32)
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": [2, 64],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": x.nbytes},
                }
            ]
        }
    ).encode()
    request = urllib.request.Request(
        f"{url}/v2/models/m/infer",
        data=header + x.tobytes(),
        headers={"Inference-Header-Content-Length": str(len(header))},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        status, answer = response.status, json.loads(response.read())
    process.send_signal(signal.SIGTERM)
    _, rest = process.communicate(timeout=60)
    return {
        "ok": status == 200 and process.returncode == 0,
        "status": status,
        "exit": process.returncode,
        "shape": answer["outputs"][0]["shape"],
        "log": ("".join(log) + rest)[-1500:],
    }


def main() -> int:
    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    summary: dict[str, Any] = {
        "gpu": gpu_name(),
        "onnxruntime": ort.__version__,
        "providers": ort.get_available_providers(),
    }
    with tempfile.TemporaryDirectory() as tmp:
        for model in ("mlp", "resnet50"):
            path = write_example(model, Path(tmp) / f"{model}.onnx")
            shape = ROWS[model]
            batches = [1, 8, 32, 64, 128] if model == "resnet50" else [1, 64, 1024]
            entry: dict[str, Any] = {"raw_ort_rows_per_s": raw_throughput(path, shape, batches)}
            entry["engine"] = [asyncio.run(engine_check(path, shape, k)) for k in (1, 2)]
            summary[model] = entry
            print(json.dumps({model: entry}, indent=1), flush=True)
        summary["cli"] = cli_check(Path(tmp) / "mlp.onnx")
    out = Path(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("OUT", ".")) / "cuda_check.json"
    out.write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if k != "cli"}, indent=1))
    print("cli:", json.dumps(summary["cli"])[:800])
    return 0 if summary["cli"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
