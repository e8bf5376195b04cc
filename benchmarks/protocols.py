"""HTTP JSON, HTTP binary, gRPC unary and gRPC streaming against one server, in one run.

A real `batchserve serve` of an example model on 127.0.0.1 (HTTP and gRPC on ephemeral ports)
is loaded in turn, closed loop, by `batchserve bench` in each mode (interleaved, `--rounds`
times, medians reported), then, when it is set up (tools/perf-analyzer.sh), by Triton's
perf_analyzer over HTTP, gRPC and gRPC streaming. Results: requests/s, p50 and p99.

    python benchmarks/protocols.py --model mlp --concurrency 64
    python benchmarks/protocols.py --model resnet50 --concurrency 16 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import compare  # noqa: E402
import overload  # noqa: E402

MODES: dict[str, list[str]] = {
    "http-json": [],
    "http-binary": ["--binary"],
    "grpc-unary": ["--protocol", "grpc"],
    "grpc-stream": ["--protocol", "grpc", "--streaming"],
}


def bench(url: str, model: str, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        command = [sys.executable, "-m", "batchserve", "bench", url, "--model", model,
                   "--concurrency", str(args.concurrency), "--duration", str(args.duration),
                   "--warmup", "2", "--processes", str(args.processes), "--json", out.name,
                   *MODES[mode]]  # fmt: skip
        subprocess.run(command, check=True, cwd=REPO, capture_output=True,
                       timeout=args.duration + 120)  # fmt: skip
        report = json.loads(Path(out.name).read_text())["report"]
    seconds = report["duration_s"]
    latency = report["latency_ms"]
    return {"mode": mode, "rps": report["ok"] / seconds, "p50_ms": latency.get("p50"),
            "p99_ms": latency.get("p99"), "errors": report["requests"] - report["ok"]}  # fmt: skip


def perf_analyzer(binary: str, port: int, grpc_port: int, model: str,
                  args: argparse.Namespace) -> list[dict[str, Any]]:  # fmt: skip
    rows = []
    for mode, extra in (("http", ["-i", "http", "-u", f"127.0.0.1:{port}"]),
                        ("grpc", ["-i", "grpc", "-u", f"127.0.0.1:{grpc_port}"]),
                        ("grpc-stream", ["-i", "grpc", "-u", f"127.0.0.1:{grpc_port}",
                                         "--streaming"])):  # fmt: skip
        done = subprocess.run(
            [binary, "-m", model, *extra, "--concurrency-range", str(args.concurrency),
             "--measurement-interval", str(int(args.duration * 1000)),
             "--stability-percentage", "100", "--percentile", "99"],
            capture_output=True, text=True, timeout=args.duration * 10 + 120, check=False,
        )  # fmt: skip
        text = done.stdout
        rate = re.search(r"Throughput: ([\d.]+) infer/sec", text)
        p50 = re.search(r"p50 latency: (\d+) usec", text)
        p99 = re.search(r"p99 latency: (\d+) usec", text)
        rows.append({"mode": f"perf_analyzer {mode}", "rps": float(rate.group(1)) if rate else 0.0,
                     "p50_ms": int(p50.group(1)) / 1000 if p50 else None,
                     "p99_ms": int(p99.group(1)) / 1000 if p99 else None,
                     "errors": 0 if done.returncode == 0 else f"exit {done.returncode}: "
                     + (done.stdout + done.stderr)[-300:]})  # fmt: skip
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="mlp", help="example model to serve")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--processes", type=int, default=1, help="load generator processes")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", help="write the rounds and medians here")
    args = parser.parse_args()
    model_path = overload.example_model(args.model)
    port, grpc_port = compare.free_port(), compare.free_port()
    command = [sys.executable, "-m", "batchserve", "serve", str(model_path), "--name",
               args.model, "--host", compare.HOST, "--port", str(port), "--grpc-port",
               str(grpc_port), "--log-level", "warning"]  # fmt: skip
    proc = compare.start_server(command, overload.BUILD / "protocols.log")
    rounds: list[dict[str, Any]] = []
    try:
        compare.wait_ready(proc, f"http://{compare.HOST}:{port}")
        for _ in range(args.rounds):
            for mode in MODES:
                url = (f"http://{compare.HOST}:{port}" if mode.startswith("http")
                       else f"grpc://{compare.HOST}:{grpc_port}")  # fmt: skip
                rounds.append(bench(url, args.model, mode, args))
                print(json.dumps(rounds[-1]), flush=True)
        binary = os.environ.get("BATCHSERVE_PERF_ANALYZER") or shutil.which("perf_analyzer")
        analyzed = perf_analyzer(binary, port, grpc_port, args.model, args) if binary else []
    finally:
        compare.stop_server(proc)
    medians = [{"mode": m, **{k: statistics.median(r[k] for r in rounds if r["mode"] == m)
                              for k in ("rps", "p50_ms", "p99_ms")}} for m in MODES]  # fmt: skip
    print("| load generator, mode | req/s | p50 ms | p99 ms |\n|---|---:|---:|---:|")
    for row in [*({**r, "mode": f"batchserve bench {r['mode']}"} for r in medians), *analyzed]:
        p50, p99 = row["p50_ms"], row["p99_ms"]
        print(f"| {row['mode']} | {row['rps']:,.0f} | {p50 if p50 is None else f'{p50:.2f}'} "
              f"| {p99 if p99 is None else f'{p99:.2f}'} |")  # fmt: skip
    if args.json:
        output = {"model": args.model, "concurrency": args.concurrency,
                  "machine": f"{os.cpu_count()} CPUs", "when": time.strftime("%Y-%m-%d %H:%M"),
                  "rounds": rounds, "medians": medians, "perf_analyzer": analyzed}  # fmt: skip
        Path(args.json).write_text(json.dumps(output, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
