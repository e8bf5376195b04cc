"""Two observability figures, measured on this machine:

1. what scraping `/metrics` once a second costs a loaded server (wrk, mlp, 64 connections,
   with and without a scraper, interleaved, median of repeats);
2. a picture of the dashboard's panels, plotted from `/metrics` scraped every second while
   `batchserve bench` steps an open-loop load up (no Grafana runs here).

    python benchmarks/observability.py   # writes docs/results/observability.json and
                                          # docs/observability-panels.png
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import compare  # noqa: E402

MODEL = REPO / "build" / "mlp.onnx"
DOCS = REPO / "docs"


def start(extra: list[str]) -> tuple[Any, str]:
    port = compare.free_port()
    command = [sys.executable, "-m", "batchserve", "serve", str(MODEL), "--name", "mlp"]
    command += ["--host", compare.HOST, "--port", str(port), *extra]
    proc = compare.start_server(command, REPO / "build" / "observability-server.log")
    base = f"http://{compare.HOST}:{port}"
    compare.wait_ready(proc, base)
    return proc, base


def scrape(base: str) -> tuple[dict[str, Any], float]:
    started = time.perf_counter()
    with urllib.request.urlopen(f"{base}/metrics", timeout=5) as response:
        text = response.read().decode()
    took = time.perf_counter() - started
    return {f.name: f for f in text_string_to_metric_families(text)}, took


def wrk(base: str, body: Path, seconds: int) -> dict[str, float]:
    done = subprocess.run(
        ["wrk", "-t1", "-c64", f"-d{seconds}s", "--latency", "-s", str(HERE / "post.lua"),
         f"{base}/v2/models/mlp/infer", "--", str(body)],
        capture_output=True, text=True, timeout=seconds + 30, check=True,
    )  # fmt: skip
    result = compare.RunResult("batchserve", 0)
    compare.parse_wrk(done.stdout, result)
    return {"rps": result.rps or 0.0, "p99_ms": result.latency_ms.get("p99", 0.0)}


def scrape_cost(repeats: int = 3, seconds: int = 10) -> dict[str, Any]:
    body = REPO / "build" / "observability-body.json"
    compare.write_body(body, str(MODEL), False)
    runs: dict[str, list[dict[str, float]]] = {"no scraper": [], "scrape every 1 s": []}
    scrape_times: list[float] = []
    for _ in range(repeats):
        for mode in runs:
            proc, base = start([])
            try:
                wrk(base, body, 2)
                stop = threading.Event()

                def scraper(base: str = base, stop: threading.Event = stop) -> None:
                    while not stop.wait(1.0):
                        scrape_times.append(scrape(base)[1])

                thread = threading.Thread(target=scraper, daemon=True)
                if mode != "no scraper":
                    thread.start()
                runs[mode].append(wrk(base, body, seconds))
                stop.set()
                if thread.is_alive():
                    thread.join()
            finally:
                compare.stop_server(proc)
    summary = {
        mode: {
            "rps": statistics.median(r["rps"] for r in results),
            "p99_ms": statistics.median(r["p99_ms"] for r in results),
        }
        for mode, results in runs.items()
    }
    summary["scrape_ms_median"] = statistics.median(scrape_times) * 1000 if scrape_times else 0
    return summary


def value(families: dict[str, Any], name: str, sample: str, **labels: str) -> float:
    total = 0.0
    family = families.get(name)
    for s in family.samples if family else []:
        if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
            total += s.value
    return total


def buckets(families: dict[str, Any], name: str) -> list[tuple[float, float]]:
    family = families.get(name)
    pairs: dict[float, float] = {}
    for s in family.samples if family else []:
        if s.name == f"{name}_bucket":
            le = float("inf") if s.labels["le"] == "+Inf" else float(s.labels["le"])
            pairs[le] = pairs.get(le, 0.0) + s.value
    return sorted(pairs.items())


def quantile(
    before: list[tuple[float, float]], after: list[tuple[float, float]], q: float
) -> float:
    """histogram_quantile over the increase between two scrapes (linear within a bucket)."""
    earlier = dict(before)
    delta = [(le, a - earlier.get(le, 0.0)) for le, a in after]
    total = delta[-1][1] if delta else 0
    if total <= 0:
        return float("nan")
    rank, low, below = q * total, 0.0, 0.0
    for le, cumulative in delta:
        if cumulative >= rank:
            if le == float("inf"):
                return low
            return low + (le - low) * (rank - below) / max(cumulative - below, 1e-12)
        low, below = le, cumulative
    return low


def dashboard_run() -> dict[str, list[float]]:
    proc, base = start(["--cache-size-mb", "16"])
    series: dict[str, list[float]] = {k: [] for k in (
        "t", "rps", "p50", "p99", "queue_p99", "infer_p99", "batch_mean", "hit_ratio", "queued",
    )}  # fmt: skip
    bench = subprocess.Popen(
        [sys.executable, "-m", "batchserve", "bench", base, "-m", "mlp", "--sweep",
         "--start-rate", "500", "--max-rate", "8000", "--duration", "5", "--warmup", "1",
         "--bisect-steps", "0", "--distinct", "100", "--unique-fraction", "0.5"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        previous, _ = scrape(base)
        started = last = time.perf_counter()
        while bench.poll() is None and time.perf_counter() - started < 120:
            time.sleep(1.0)
            current, _ = scrape(base)
            now = time.perf_counter()
            n = "batchserve_requests"
            done = value(current, n, f"{n}_total") - value(previous, n, f"{n}_total")
            series["t"].append(now - started)
            series["rps"].append(done / (now - last))  # a loaded server answers scrapes late
            last = now
            lat = "batchserve_request_duration_seconds"
            series["p50"].append(quantile(buckets(previous, lat), buckets(current, lat), 0.5))
            series["p99"].append(quantile(buckets(previous, lat), buckets(current, lat), 0.99))
            for key, name in (
                ("queue_p99", "batchserve_queue_wait_seconds"),
                ("infer_p99", "batchserve_inference_duration_seconds"),
            ):
                series[key].append(quantile(buckets(previous, name), buckets(current, name), 0.99))
            rows = "batchserve_batch_rows"
            count = value(current, rows, f"{rows}_count") - value(previous, rows, f"{rows}_count")
            rsum = value(current, rows, f"{rows}_sum") - value(previous, rows, f"{rows}_sum")
            series["batch_mean"].append(rsum / count if count else 0.0)
            c = "batchserve_cache_lookups"
            hits = value(current, c, f"{c}_total", result="hit") - value(
                previous, c, f"{c}_total", result="hit"
            )
            look = value(current, c, f"{c}_total") - value(previous, c, f"{c}_total")
            series["hit_ratio"].append(hits / look if look else float("nan"))
            series["queued"].append(
                value(current, "batchserve_queue_rows", "batchserve_queue_rows")
            )
            previous = current
    finally:
        bench.kill()
        bench.wait()
        compare.stop_server(proc)
    return series


def plot(series: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = series["t"]
    fig, axes = plt.subplots(3, 2, figsize=(12, 9))
    panels = [
        ("Throughput (requests/s)", [("rps", "requests/s")], None),
        ("Latency vs SLO (ms)", [("p50", "p50"), ("p99", "p99")], 100.0),
        ("Queue wait vs inference time, p99 (ms)", [("queue_p99", "queue wait"),
                                                    ("infer_p99", "inference per batch")], None),
        ("Mean batch size (rows per run)", [("batch_mean", "rows")], None),
        ("Cache hit ratio", [("hit_ratio", "local tier")], None),
        ("Queue depth (rows)", [("queued", "queued rows")], None),
    ]  # fmt: skip
    for ax, (title, lines, slo) in zip(axes.flat, panels, strict=True):
        for key, label in lines:
            values = series[key]
            if key in ("p50", "p99", "queue_p99", "infer_p99"):
                values = [v * 1000 for v in values]
            ax.plot(t, values, label=label)
        if slo:
            ax.axhline(slo, color="grey", linestyle=":", label="SLO p99")
            ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("seconds")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(
        "batchserve dashboard panels, from /metrics scraped every second "
        "(mlp, open-loop load stepping up; 2-core machine)",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> int:
    results = {"scrape_cost": scrape_cost()}
    print(json.dumps(results["scrape_cost"], indent=1), file=sys.stderr)
    series = dashboard_run()
    results["dashboard_series"] = series
    (DOCS / "results").mkdir(parents=True, exist_ok=True)
    (DOCS / "results" / "observability.json").write_text(json.dumps(results, indent=1))
    plot(series, DOCS / "observability-panels.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
