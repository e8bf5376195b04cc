"""Soak: a steady open-loop load below capacity for minutes, with a Redis restart in the middle.

A real `batchserve serve` (example mlp, local cache + Redis tier) and a real `redis-server`,
both on 127.0.0.1 ephemeral ports. `batchserve bench` offers `--rate` req/s for `--duration`
seconds (half the requests carry never-seen inputs, so both cache tiers and the model work).
At a third of the run Redis is stopped; at two thirds it is started again on the same port.
Passes when no request failed and the server's memory did not keep growing.

    python benchmarks/soak.py                  # 180 s; writes docs/results/soak.json
    python benchmarks/soak.py --duration 600   # longer

The server has no reload signal yet (SIGHUP is not handled), so the soak does not send one.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import compare  # noqa: E402
from overload import rss_mb  # noqa: E402

BUILD = REPO / "build"


def start_redis(port: int) -> subprocess.Popen[bytes]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("the soak needs redis-server (apt-get install -y redis-server)")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", compare.HOST, "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.3)
    return proc


def metric(base: str, name: str) -> float:
    with urllib.request.urlopen(f"{base}/metrics", timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=1000.0, help="offered req/s")
    parser.add_argument("--duration", type=float, default=180.0, help="measured seconds")
    parser.add_argument("--json", default=str(REPO / "docs" / "results" / "soak.json"))
    args = parser.parse_args()
    BUILD.mkdir(exist_ok=True)
    model = BUILD / "mlp.onnx"
    if not model.exists():
        subprocess.run([sys.executable, "-m", "batchserve", "example-model", "mlp", "-o",
                        str(model)], check=True, cwd=REPO)  # fmt: skip
    redis_port, port = compare.free_port(), compare.free_port()
    redis = start_redis(redis_port)
    command = [sys.executable, "-m", "batchserve", "serve", str(model), "--name", "mlp",
               "--host", compare.HOST, "--port", str(port), "--log-level", "warning",
               "--cache-size-mb", "8",
               "--redis-url", f"redis://{compare.HOST}:{redis_port}/0"]  # fmt: skip
    server = compare.start_server(command, BUILD / "soak-server.log")
    base = f"http://{compare.HOST}:{port}"
    samples: list[tuple[float, float]] = []
    events: list[tuple[float, str]] = []
    try:
        compare.wait_ready(server, base)
        warmup = 5.0
        bench = subprocess.Popen(
            [sys.executable, "-m", "batchserve", "bench", base, "--model", "mlp", "--rate",
             str(args.rate), "--duration", str(args.duration), "--warmup", str(warmup),
             "--unique-fraction", "0.5", "--timeout", "10", "--json", "/dev/stdout"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO,
        )  # fmt: skip
        started = time.monotonic() + warmup
        stop_at, restart_at = started + args.duration / 3, started + 2 * args.duration / 3
        done = threading.Event()
        output: list[str] = []
        reader = threading.Thread(target=lambda: (output.append(bench.communicate()[0]),
                                                  done.set()), daemon=True)  # fmt: skip
        reader.start()
        while not done.wait(timeout=5.0):
            now = time.monotonic()
            samples.append((round(now - started, 1), rss_mb(server.pid)))
            if redis is not None and redis.poll() is None and now >= stop_at and not events:
                redis.send_signal(signal.SIGTERM)
                redis.wait(timeout=10)
                events.append((round(now - started, 1), "redis stopped"))
            elif len(events) == 1 and now >= restart_at:
                redis = start_redis(redis_port)
                events.append((round(now - started, 1), "redis started"))
        text = output[0]
        report: dict[str, Any] = json.loads(text[text.index("{\n") :])["report"]
        redis_errors = metric(base, "batchserve_cache_errors_total")
        redis_hits = metric(base, 'batchserve_cache_lookups_total{model="mlp",result="hit",'
                            'tier="redis",version="1"}')  # fmt: skip
    finally:
        compare.stop_server(server)
        if redis.poll() is None:
            redis.terminate()
            redis.wait(timeout=10)
    steady = [rss for t, rss in samples if t >= 10]
    result = {
        "model": "mlp",
        "machine": f"{os.cpu_count()} CPUs",
        "when": time.strftime("%Y-%m-%d %H:%M"),
        "rate": args.rate,
        "duration_s": args.duration,
        "requests": report["requests"],
        "ok": report["ok"],
        "errors": report["requests"] - report["ok"],
        "errors_by_status": report["errors_by_status"],
        "errors_by_exception": report["errors_by_exception"],
        "latency_ms": report["latency_ms"],
        "events": events,
        "redis_errors_seen": redis_errors,
        "redis_hits_seen": redis_hits,
        "rss_mb": samples,
        "rss_growth_mb": (steady[-1] - steady[0]) if len(steady) > 1 else 0.0,
    }
    Path(args.json).write_text(json.dumps(result, indent=1))
    lat = report["latency_ms"]
    print(
        f"soak: {args.duration:g} s at {args.rate:,.0f} req/s, {report['requests']:,} requests, "
        f"{result['errors']} errors; p50 {lat['p50']:.2f} ms, p99 {lat['p99']:.2f} ms; "
        f"events {events}; RSS {steady[0] if steady else 0:.0f} -> "
        f"{steady[-1] if steady else 0:.0f} MB"
    )
    return 0 if result["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
