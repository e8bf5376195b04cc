"""Render the suite's results (docs/results/suite.json) as docs/benchmarks.md."""
# ruff: noqa: RUF001  -- the report prints the multiplication sign on purpose

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

DOCS = Path(__file__).resolve().parent.parent / "docs"
LABELS = {
    "bare": "HTTP ceiling (aiohttp + uvloop, orjson parse, constant answer)",
    "batchserve": "**batchserve** (defaults)",
    "fastapi-async": "FastAPI + uvicorn, `async def`, one ORT run per request",
    "fastapi-sync": "FastAPI + uvicorn, sync `def`, one ORT run per request",
}


def _ratio(a: float | None, b: float | None) -> str:
    if not a or not b:
        return "n/a"
    value = a / b
    return f"{value:.2f}×" if value >= 0.05 else f"{value:.4f}×"


def _ceilings(results: dict[str, Any]) -> list[str]:
    lines = [
        "| model | raw ORT best (rows/s) | at batch | raw ORT batch 1 (rows/s) |",
        "|---|---:|---:|---:|",
    ]
    for name, raw in results["raw_ort"].items():
        lines.append(
            f"| {name} | {raw['best']:,.0f} | {raw['best_batch']} | {raw['rows_per_s']['1']:,.0f} |"
        )
    gen = results["generator"]
    lines += [
        "",
        f"Load generator ceiling (`batchserve bench --noop --concurrency 64`, no-op V2 "
        f"server on the same 2 cores): **{gen['achieved_rps']:,.0f} req/s**, "
        f"p50 {gen['latency_ms']['p50']:.2f} ms, p99 {gen['latency_ms']['p99']:.2f} ms.",
    ]
    return lines


def _model_table(name: str, medians: dict[str, Any], raw_best: float) -> list[str]:
    lines = [
        "| server | req/s | p50 ms | p99 ms | errors | ÷ HTTP ceiling | ÷ FastAPI async "
        "| ÷ FastAPI sync | ÷ raw ORT |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rps = {server: entry.get("rps") for server, entry in medians.items()}
    for server, entry in medians.items():
        if entry.get("rps") is None:
            lines.append(f"| {LABELS.get(server, server)} | failed | | | | | | | |")
            continue
        errors = entry["non_2xx"] + entry["socket_errors"]
        raw = _ratio(entry["rps"], raw_best) if server != "bare" else "n/a"
        lines.append(
            f"| {LABELS.get(server, server)} | {entry['rps']:,.0f} | {entry['p50_ms']:.2f} | "
            f"{entry['p99_ms']:.2f} | {errors} | {_ratio(entry['rps'], rps.get('bare'))} | "
            f"{_ratio(entry['rps'], rps.get('fastapi-async'))} | "
            f"{_ratio(entry['rps'], rps.get('fastapi-sync'))} | {raw} |"
        )
    return lines


def _targets(results: dict[str, Any]) -> list[str]:
    c, raw = results["compare"], results["raw_ort"]

    def rps(model: str, server: str) -> float:
        return float(c.get(model, {}).get(server, {}).get("rps") or 0.0)

    mlp_bs = c["mlp"].get("batchserve", {})
    best_open = (results["sweeps"].get("batchserve", {}).get("best") or {}).get("target_rate")
    wide_naive = max(rps("wide-mlp", "fastapi-async"), rps("wide-mlp", "fastapi-sync"))
    rows = [
        (
            "mlp, 64 connections: ≥ 0.60× the HTTP ceiling",
            rps("mlp", "batchserve") / max(rps("mlp", "bare"), 1),
            0.60,
            "×",
        ),
        ("mlp: p99 ≤ 10 ms", mlp_bs.get("p99_ms") or 0.0, 10.0, " ms (≤)"),
        (
            "mlp: ≥ 7× FastAPI sync",
            rps("mlp", "batchserve") / max(rps("mlp", "fastapi-sync"), 1),
            7.0,
            "×",
        ),
        (
            "mlp: ≥ 3× FastAPI async",
            rps("mlp", "batchserve") / max(rps("mlp", "fastapi-async"), 1),
            3.0,
            "×",
        ),
        (
            "wide-mlp (JSON): ≥ 80% of raw ORT best batch",
            rps("wide-mlp", "batchserve") / raw["wide-mlp"]["best"],
            0.80,
            "×",
        ),
        (
            "wide-mlp (binary tensors): ≥ 80% of raw ORT best batch",
            rps("wide-mlp-binary", "batchserve") / raw["wide-mlp"]["best"],
            0.80,
            "×",
        ),
        (
            "wide-mlp: ≥ 5× the better naive baseline",
            rps("wide-mlp", "batchserve") / max(wide_naive, 1),
            5.0,
            "×",
        ),
        (
            "resnet50 (binary): ≥ 90% of raw ORT",
            rps("resnet50", "batchserve") / raw["resnet50"]["best"],
            0.90,
            "×",
        ),
        (
            "mlp open loop: highest rate with p99 < 100 ms ≥ 12,000 req/s",
            float(best_open or 0.0),
            12000.0,
            " req/s",
        ),
    ]
    lines = ["| target | measured | met |", "|---|---:|:---:|"]
    for label, value, goal, unit in rows:
        met = value <= goal if "(≤)" in unit else value >= goal
        shown = f"{value:,.0f}" if value >= 100 else f"{value:.2f}"
        lines.append(f"| {label} | {shown}{unit.replace(' (≤)', '')} | {'yes' if met else 'no'} |")
    return lines


def _sweeps(results: dict[str, Any]) -> list[str]:
    lines = [
        "| server | highest rate with p99 < SLO | achieved | p50 ms | p99 ms |",
        "|---|---:|---:|---:|---:|",
    ]
    for server, data in results["sweeps"].items():
        best = data.get("best")
        if best:
            lines.append(
                f"| {LABELS.get(server, server)} | {best['target_rate']:,.0f} | "
                f"{best['achieved_rps']:,.0f} | {best['latency_ms']['p50']:.2f} | "
                f"{best['latency_ms']['p99']:.2f} |"
            )
        else:
            lines.append(f"| {LABELS.get(server, server)} | none held | | | |")
    return lines


def _cache(results: dict[str, Any]) -> list[str]:
    cache = results.get("cache")
    if not cache:
        return ["Not measured in this run."]
    lines = [
        "`batchserve bench --concurrency 64 --distinct 100 --unique-fraction 0.1`: 90% of "
        "requests repeat one of 100 inputs, 10% are new. Medians of "
        f"{results['config']['repeats']} interleaved runs; the local tier is 64 MB.",
        "",
        "| model | cache | req/s | p50 ms | p99 ms | ÷ cache off | local hit ratio |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for model, variants in cache.items():
        off = variants.get("off", {}).get("rps")
        for name, entry in variants.items():
            local = (entry["runs"][-1].get("server_stats", {}).get("cache") or {}).get("local")
            ratio = "n/a"
            if local and local["hits"] + local["misses"]:
                ratio = f"{local['hits'] / (local['hits'] + local['misses']):.0%}"
            lines.append(
                f"| {model} | {name} | {entry['rps']:,.0f} | {entry['p50_ms']:.2f} | "
                f"{entry['p99_ms']:.2f} | {_ratio(entry['rps'], off)} | {ratio} |"
            )
    return lines


def _gpu() -> list[str]:
    path = DOCS / "results" / "cuda-check-h200.json"
    if not path.exists():
        return [
            "No GPU figures recorded yet (`python benchmarks/gpu/cuda_check.py` on a GPU host)."
        ]
    data = json.loads(path.read_text())
    lines = [
        f"`benchmarks/gpu/cuda_check.py` on **{data['gpu'].split(',')[0]}**, onnxruntime-gpu "
        f"{data['onnxruntime']}, CUDA execution provider, FP32, in process (no HTTP).",
        "",
        "| model | raw ORT best (rows/s) | batchserve, 1 session | batchserve, 2 sessions "
        "| max error vs CPU |",
        "|---|---:|---:|---:|---:|",
    ]
    for model in ("mlp", "resnet50"):
        entry = data[model]
        raw = max(entry["raw_ort_rows_per_s"].values())
        one, two = entry["engine"]
        lines.append(
            f"| {model} | {raw:,.0f} | {one['rows_per_s']:,.0f} | "
            f"{two['rows_per_s']:,.0f} | {two['max_relative_error_vs_cpu']:.1e} |"
        )
    lines += [
        "",
        "`batchserve serve --device cuda:0 --instances 2` answered a binary V2 request "
        f"and exited {data['cli']['exit']} on SIGTERM.",
    ]
    return lines


def _handlers() -> list[str]:
    """Figures of benchmarks/jpeg_e2e.py and benchmarks/handlers.py, when they have been run."""
    lines: list[str] = []
    e2e_path, parts_path = DOCS / "results" / "jpeg-e2e.json", DOCS / "results" / "handlers.json"
    if e2e_path.exists():
        e2e = json.loads(e2e_path.read_text())
        lat = e2e["latency_ms"]
        total = e2e["preprocess_ms"] + e2e["inference_ms_per_image"] + e2e["postprocess_ms"]
        lines += [
            f"`python benchmarks/jpeg_e2e.py` ({e2e['when']}, {e2e['machine']}): ResNet-50 with "
            f"`--handler image-classification`, {e2e['clients']} clients posting "
            f"{e2e['image']} bodies over HTTP for {e2e['duration_s']:g} s, ORT spin "
            f"{e2e['spin']}.",
            "",
            "| images/s | p50 | p95 | p99 | errors | mean batch |",
            "|---:|---:|---:|---:|---:|---:|",
            f"| {e2e['images_per_s']:.1f} | {lat['p50']:.0f} ms | {lat['p95']:.0f} ms "
            f"| {lat['p99']:.0f} ms | {e2e['errors']} | {e2e['mean_batch_rows']:.1f} |",
            "",
            "Where an image's compute goes (not counting the wait for a batch): decode + resize + "
            f"crop + normalise {e2e['preprocess_ms']:.1f} ms "
            f"({e2e['preprocess_ms'] / total:.0%}), ONNX Runtime "
            f"{e2e['inference_ms_per_image']:.1f} ms "
            f"({e2e['inference_ms_per_image'] / total:.0%}), "
            f"top-k {e2e['postprocess_ms']:.2f} ms. The rest of the latency is queueing behind "
            "the model, which is the bottleneck on two cores.",
            "",
        ]
    if parts_path.exists():
        parts = json.loads(parts_path.read_text())
        decode, pre, ex = (parts["decode_per_core"], parts["preprocess_per_core"],
                           parts["executor_preprocess"])  # fmt: skip
        lines += [
            f"`python benchmarks/handlers.py` ({parts['image']}): JPEG decode per core, Pillow "
            f"{decode['pillow']:.0f} vs simplejpeg {decode['simplejpeg']:.0f} images/s (the "
            f"handler uses simplejpeg when installed); full preprocessing per core "
            f"{pre['pillow']:.0f} vs {pre['simplejpeg']:.0f} images/s; with 2 workers, threads "
            f"{ex['thread']:.0f} vs processes {ex['process']:.0f} images/s (threads are the "
            "default: decoding and resizing release the GIL). Details: "
            "[handlers.md](handlers.md).",
        ]
    return lines or ["Not measured yet (`python benchmarks/jpeg_e2e.py`)."]


def write_report(results: dict[str, Any], path: Path) -> None:
    env = results["compare"]
    out = [
        "# Benchmarks",
        "",
        f"Generated by `make bench` ({results['started']}, {platform.machine()}, 2 cores, "
        f"{results['elapsed_s'] / 60:.0f} min). Every figure on this page comes from that one run "
        "on one machine: load generator and server share the same 2 cores, servers are "
        f"interleaved, each figure is the median of {results['config']['repeats']} runs of "
        f"{results['config']['duration']} s after a warm-up. Only ratios within this page are "
        "comparable; run-to-run spread here is ±10-20%. How the numbers come about: "
        "[performance.md](performance.md). Raw data: [results/suite.json](results/suite.json).",
        "",
        "## Ceilings",
        "",
        *_ceilings(results),
        "",
    ]
    for name in env:
        spec = {
            "mlp": "one-row JSON request (64 floats), wrk, 64 connections",
            "wide-mlp": "one-row JSON request (1,024 floats), wrk, 64 connections",
            "wide-mlp-binary": "the same request as binary tensors, wrk, 64 connections",
            "resnet50": "one image per request as binary tensors (602 KB), wrk, 8 connections",
        }[name]
        out += [
            f"## {name}: {spec}",
            "",
            *_model_table(
                name, env[name], results["raw_ort"][name.removesuffix("-binary")]["best"]
            ),
            "",
        ]
    out += [
        "## Targets",
        "",
        *_targets(results),
        "",
        "## Open loop: latency against throughput (mlp)",
        "",
        f"`batchserve bench URL -m mlp --sweep --slo-p99-ms {results['config']['slo_p99_ms']:g}`"
        f" against each server: the rate steps up ×2 from 500 req/s until p99 (measured from "
        f"each request's scheduled send time) passes the SLO, then bisects.",
        "",
        *_sweeps(results),
        "",
        "![latency vs throughput](benchmarks-latency.png)",
        "",
        "## Cache",
        "",
        *_cache(results),
        "",
        "## Handlers: ResNet-50 with JPEG bodies",
        "",
        *_handlers(),
        "",
        "## GPU",
        "",
        *_gpu(),
        "",
    ]
    path.write_text("\n".join(out))
