"""`make bench`: every figure in docs/benchmarks.md, measured in one run on this machine.

1. ceilings: raw ONNX Runtime best-batch throughput per model; the bare aiohttp + uvloop +
   orjson endpoint (HTTP ceiling); the load generator's own ceiling on a no-op server;
2. naive baselines (FastAPI + uvicorn, sync `def` and `async def`, one ORT run per request);
3. batchserve;
for `mlp` and `wide-mlp` (JSON) and `resnet50` (binary tensors), with wrk, servers interleaved,
medians of repeats; then open-loop sweeps (`batchserve bench --sweep`) for the latency-throughput
curve of `mlp`, drawn to docs/benchmarks-latency.png.

    python benchmarks/suite.py [--repeats 3] [--duration 10] [--quick]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BUILD = REPO / "build"
DOCS = REPO / "docs"
sys.path.insert(0, str(HERE))

import compare  # noqa: E402  (sibling script: server start/stop helpers)

MODELS: dict[str, dict[str, Any]] = {
    "mlp": {
        "binary": False,
        "connections": 64,
        "batches": "1,8,32,64,256",
        "servers": "bare,batchserve,fastapi-async,fastapi-sync",
    },
    "wide-mlp": {
        "binary": False,
        "connections": 64,
        "batches": "1,8,32,64",
        "servers": "bare,batchserve,fastapi-async,fastapi-sync",
    },
    "wide-mlp-binary": {
        "binary": True,
        "connections": 64,
        "batches": "1,8,32,64",
        "servers": "batchserve",
        "model": "wide-mlp",
    },
    "resnet50": {"binary": True, "connections": 8, "batches": "1,4,8,16", "servers": "batchserve"},
}
SWEEP_SERVERS = ("bare", "batchserve", "fastapi-async")


def run_json(command: list[str], timeout: float) -> Any:
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def model_file(name: str) -> Path:
    return BUILD / f"{MODELS[name].get('model', name)}.onnx"


def build_models() -> None:
    BUILD.mkdir(exist_ok=True)
    for name in MODELS:
        path = model_file(name)
        if not path.exists():
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "batchserve",
                    "example-model",
                    MODELS[name].get("model", name),
                    "-o",
                    str(path),
                ],
                check=True,
                cwd=REPO,
            )


def raw_ceilings(seconds: float, reuse: bool) -> dict[str, Any]:
    cached = BUILD / "raw-ort.json"
    if reuse and cached.exists():
        return dict(json.loads(cached.read_text()))
    results = {}
    for name, spec in MODELS.items():
        if "model" in spec:
            continue  # a variant of another model: same ceiling
        command = [sys.executable, str(HERE / "raw_ort.py"), str(model_file(name))]
        command += ["--batches", spec["batches"], "--seconds", str(seconds)]
        results[name] = run_json(command, 600)
    cached.write_text(json.dumps(results))
    return results


def comparisons(args: argparse.Namespace) -> dict[str, Any]:
    results = {}
    for name, spec in MODELS.items():
        out = BUILD / f"compare-{name}.json"
        if args.reuse and out.exists():
            results[name] = json.loads(out.read_text())["medians"]
            continue
        command = [
            sys.executable,
            str(HERE / "compare.py"),
            "--model",
            str(model_file(name)),
            "--model-name",
            spec.get("model", name),
            "--servers",
            spec["servers"],
            "--repeats",
            str(args.repeats),
            "--duration",
            str(args.duration),
            "--connections",
            str(spec["connections"]),
            "--timeout",
            "30",
            "--json",
            str(out),
        ]
        if spec["binary"]:
            command.append("--binary")
        print(f"== {name}: {spec['servers']}", file=sys.stderr, flush=True)
        subprocess.run(command, check=False, cwd=REPO, timeout=3600)
        results[name] = json.loads(out.read_text())["medians"]
    return results


def generator_ceiling(duration: float, reuse: bool) -> dict[str, Any]:
    out = BUILD / "bench-noop.json"
    if reuse and out.exists():
        return dict(json.loads(out.read_text())["report"])
    subprocess.run(
        [
            sys.executable,
            "-m",
            "batchserve",
            "bench",
            "--noop",
            "--concurrency",
            "64",
            "--duration",
            str(duration),
            "--json",
            str(out),
        ],
        check=True,
        cwd=REPO,
        timeout=300,
    )
    report: dict[str, Any] = json.loads(out.read_text())["report"]
    return report


def sweeps(args: argparse.Namespace) -> dict[str, Any]:
    curves = {}
    model = str(BUILD / "mlp.onnx")
    for server in SWEEP_SERVERS:
        cached = BUILD / f"sweep-{server}.json"
        if args.reuse and cached.exists():
            curves[server] = json.loads(cached.read_text())
            continue
        port = compare.free_port()
        base = f"http://{compare.HOST}:{port}"
        ns = argparse.Namespace(model=model, model_name="mlp", batchserve_args="")
        log = BUILD / f"sweep-{server}.log"
        proc = compare.start_server(compare.SERVERS[server](ns, port), log)
        out = BUILD / f"sweep-{server}.json"
        try:
            compare.wait_ready(proc, base)
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "batchserve",
                    "bench",
                    base,
                    "-m",
                    "mlp",
                    "--sweep",
                    "--slo-p99-ms",
                    str(args.slo_p99_ms),
                    "--start-rate",
                    "500",
                    "--duration",
                    str(args.sweep_duration),
                    "--warmup",
                    "1",
                    "--bisect-steps",
                    "3",
                    "--json",
                    str(out),
                ],
                check=True,
                cwd=REPO,
                timeout=1200,
            )
            curves[server] = json.loads(out.read_text())
        finally:
            compare.stop_server(proc)
    return curves


CACHE_VARIANTS = {
    "off": [],
    "local": ["--cache-size-mb", "64"],
    "local + redis": ["--cache-size-mb", "64", "--redis-url", "REDIS"],
}


CACHE_MODELS = {"mlp": [], "wide-mlp (binary)": ["--binary"]}


def cache_figure(args: argparse.Namespace) -> dict[str, Any]:
    """90% of requests repeat one of 100 inputs: cache off vs on, for a tiny model and for one
    whose inference costs more than the HTTP work around it."""
    import shutil
    import statistics

    redis = None
    variants = dict(CACHE_VARIANTS)
    redis_url = ""
    if shutil.which("redis-server"):
        redis_port = compare.free_port()
        redis_url = f"redis://127.0.0.1:{redis_port}/0"
        redis = subprocess.Popen(
            ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
    else:
        variants.pop("local + redis")
    figure: dict[str, Any] = {}
    try:
        for label, bench_flags in CACHE_MODELS.items():
            model = label.split()[0]
            runs: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
            for _ in range(args.repeats):
                for name, flags in variants.items():
                    flags = [f.replace("REDIS", redis_url) for f in flags]
                    runs[name].append(_cache_run(args, model, flags, bench_flags))
            figure[label] = {
                name: {
                    "rps": statistics.median(r["achieved_rps"] for r in reports),
                    "p99_ms": statistics.median(r["latency_ms"]["p99"] for r in reports),
                    "p50_ms": statistics.median(r["latency_ms"]["p50"] for r in reports),
                    "runs": reports,
                }
                for name, reports in runs.items()
            }
    finally:
        if redis is not None:
            redis.terminate()
            redis.wait(timeout=10)
    return figure


def _cache_run(
    args: argparse.Namespace, model: str, flags: list[str], bench_flags: list[str]
) -> dict[str, Any]:
    port = compare.free_port()
    base = f"http://{compare.HOST}:{port}"
    command = [sys.executable, "-m", "batchserve", "serve", str(BUILD / f"{model}.onnx")]
    command += ["--name", model, "--host", compare.HOST, "--port", str(port), *flags]
    proc = compare.start_server(command, BUILD / "cache-server.log")
    out = BUILD / "cache-bench.json"
    try:
        compare.wait_ready(proc, base)
        subprocess.run(
            [sys.executable, "-m", "batchserve", "bench", base, "-m", model, "--concurrency",
             "64", "--duration", str(args.duration), "--warmup", "2", "--distinct", "100",
             "--unique-fraction", "0.1", "--json", str(out), *bench_flags],
            check=True, cwd=REPO, timeout=600,
        )  # fmt: skip
        report: dict[str, Any] = json.loads(out.read_text())["report"]
        stats = json.loads(compare.http_status(f"{base}/v2/models/{model}/stats")[1] or b"{}")[
            "model_stats"
        ][0]
        report["server_stats"] = {"requests": stats["request_count"], "cache": stats["cache"]}
        print(f"    cache {model} {flags}: {report['achieved_rps']:.0f} req/s", file=sys.stderr)
        return report
    finally:
        compare.stop_server(proc)


def cache_only(args: argparse.Namespace) -> None:
    """Re-measure only the cache figure and re-render the report from the last suite.json."""
    path = DOCS / "results" / "suite.json"
    results = json.loads(path.read_text())
    results["cache"] = cache_figure(args)
    path.write_text(json.dumps(results, indent=1))
    from report_md import write_report

    write_report(results, DOCS / "benchmarks.md")


def plot(curves: dict[str, Any], path: Path, slo_ms: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for server, data in curves.items():
        # x = offered rate (open loop): past saturation the achieved rate falls, and plotting
        # against it would fold the curve back on itself.
        points = sorted(
            (r["target_rate"], r["latency_ms"]) for r in data["curve"] if r["latency_ms"]
        )
        xs = [p[0] for p in points]
        ax.plot(xs, [p[1]["p99"] for p in points], marker="o", label=f"{server} p99")
        ax.plot(
            xs, [p[1]["p50"] for p in points], marker=".", linestyle="--", label=f"{server} p50"
        )
    ax.axhline(slo_ms, color="grey", linewidth=1, linestyle=":", label=f"SLO p99 {slo_ms:g} ms")
    ax.set_yscale("log")
    ax.set_xlabel("offered load, requests/s (open loop)")
    ax.set_ylabel("latency from scheduled send, ms")
    ax.set_title("mlp, open loop: latency vs throughput (2-core machine)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--sweep-duration", type=float, default=4.0)
    parser.add_argument("--slo-p99-ms", type=float, default=100.0)
    parser.add_argument("--quick", action="store_true", help="1 repeat of 4 s: a smoke run")
    parser.add_argument(
        "--reuse", action="store_true", help="keep results already in build/ from an earlier run"
    )
    parser.add_argument("--cache-only", action="store_true", help="only the cache figure")
    args = parser.parse_args()
    if args.cache_only:
        cache_only(args)
        return 0
    if args.quick:
        args.repeats, args.duration, args.sweep_duration = 1, 4, 2.0
    started = time.time()
    build_models()
    results: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    results["raw_ort"] = raw_ceilings(2.0 if args.quick else 4.0, args.reuse)
    results["generator"] = generator_ceiling(args.duration, args.reuse)
    results["compare"] = comparisons(args)
    results["sweeps"] = sweeps(args)
    previous = DOCS / "results" / "suite.json"
    if args.reuse and previous.exists() and "cache" in json.loads(previous.read_text()):
        results["cache"] = json.loads(previous.read_text())["cache"]
    else:
        results["cache"] = cache_figure(args)
    results["config"] = vars(args)
    results["elapsed_s"] = time.time() - started
    (DOCS / "results").mkdir(parents=True, exist_ok=True)
    (DOCS / "results" / "suite.json").write_text(json.dumps(results, indent=1))
    plot(results["sweeps"], DOCS / "benchmarks-latency.png", args.slo_p99_ms)
    from report_md import write_report

    write_report(results, DOCS / "benchmarks.md")
    print(f"wrote docs/benchmarks.md in {results['elapsed_s']:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
