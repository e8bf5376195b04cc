"""Two clients at twice the server's capacity, one at high and one at low priority, in one run.

One `batchserve serve --model-repository` (127.0.0.1, an ephemeral port, a deadline per request)
serves an example model twice (`--example`, default wide-mlp: heavy enough per row that two
load generators on the same cores cost little next to it): `prio` with two priority levels
(config.toml `[priority]`), and `fifo`, the same file without them. First the capacity (closed
loop, 64 callers, on `fifo`); then, for each model in turn, two open-loop `batchserve bench`
processes at the capacity each (2x in total), one sending `parameters.priority = 1`, the other
`2`. Reported per client: the rate of 200s, the share refused (429) or late (504), and the
p50/p99 of the 200s.

    python benchmarks/priorities.py --example resnet50 --binary --concurrency 16 \
        --max-batch-size 8 --timeout-ms 1000 --duration 15 \
        --json docs/results/priorities-resnet50.json
    python benchmarks/priorities.py --duration 8 --json docs/results/priorities-wide-mlp.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import compare  # noqa: E402

PRIORITY = """[priority]
levels = 2
default = 2
share = 8
"""


def bench(base: str, model: str, load: list[str], duration: float) -> subprocess.Popen[bytes]:
    handle, out = tempfile.mkstemp(suffix=".json")
    os.close(handle)
    command = [sys.executable, "-m", "batchserve", "bench", base, "--model", model,
               "--duration", str(duration), "--warmup", "2", "--json", out, *load]  # fmt: skip
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)  # fmt: skip
    process.out_path = out  # type: ignore[attr-defined]
    return process


def report(process: subprocess.Popen[bytes], duration: float) -> dict[str, Any]:
    _, err = process.communicate(timeout=duration + 120)
    if process.returncode != 0:
        raise RuntimeError(f"bench failed: {err.decode(errors='replace')[-1500:]}")
    path = Path(process.out_path)  # type: ignore[attr-defined]
    data: dict[str, Any] = json.loads(path.read_text())["report"]
    path.unlink()
    return data


def summary(data: dict[str, Any]) -> dict[str, Any]:
    seconds = data["duration_s"]
    statuses = data["errors_by_status"]
    sent = max(1, data["requests"])
    return {
        "ok_rps": data["ok"] / seconds,
        "shed_share": statuses.get("429", 0) / sent,
        "late_share": statuses.get("504", 0) / sent,
        "other_errors": {k: v for k, v in statuses.items() if k not in ("429", "504")},
        "exceptions": data["errors_by_exception"],
        "ok_p50_ms": data["latency_ms"].get("p50"),
        "ok_p99_ms": data["latency_ms"].get("p99"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--example", default="wide-mlp", help="batchserve example model")
    parser.add_argument("--binary", action="store_true", help="binary tensors (large inputs)")
    parser.add_argument("--concurrency", type=int, default=64, help="callers for the capacity")
    parser.add_argument("--max-batch-size", type=int, default=64,
                        help="the server's; a run must fit well within the deadline")  # fmt: skip
    parser.add_argument("--timeout-ms", type=float, default=100.0,
                        help="the server's deadline per request")  # fmt: skip
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from batchserve.examples import write_example

    with tempfile.TemporaryDirectory(prefix="priorities-") as tmp:
        root = Path(tmp) / "models"
        for name in ("prio", "fifo"):
            (root / name / "1").mkdir(parents=True)
            write_example(args.example, root / name / "1" / "model.onnx")
        (root / "prio" / "config.toml").write_text(PRIORITY)
        port = compare.free_port()
        base = f"http://127.0.0.1:{port}"
        # PYTHONSAFEPATH: this checkout's package through PYTHONPATH, whatever the cwd holds.
        command = ["env", "PYTHONSAFEPATH=1", f"PYTHONPATH={REPO}", sys.executable, "-m",
                   "batchserve", "serve", "--model-repository", str(root), "--host",
                   "127.0.0.1", "--port", str(port), "--grpc-port", "off",
                   "--request-timeout-ms", f"{args.timeout_ms:g}",
                   "--max-batch-size", str(args.max_batch_size)]  # fmt: skip
        server = compare.start_server(command, Path(tmp) / "server.log")
        try:
            compare.wait_ready(server, base)
            binary = ["--binary"] if args.binary else []
            probe = bench(base, "fifo", ["--concurrency", str(args.concurrency), *binary],
                          args.duration)  # fmt: skip
            capacity = report(probe, args.duration)["ok"] / args.duration
            print(f"capacity (closed loop, {args.concurrency} callers): {capacity:,.0f} req/s",
                  flush=True)  # fmt: skip
            rows: dict[str, Any] = {"example": args.example, "capacity_rps": capacity,
                                    "timeout_ms": args.timeout_ms, "binary": args.binary,
                                    "max_batch_size": args.max_batch_size}  # fmt: skip
            for model in ("prio", "fifo"):
                load = ["--rate", f"{capacity:.1f}", "--arrivals", "poisson", *binary]
                clients = {level: bench(base, model, [*load, "--parameter", f"priority={level}"],
                                        args.duration) for level in (1, 2)}  # fmt: skip
                rows[model] = {f"priority {level}": summary(report(p, args.duration))
                               for level, p in clients.items()}  # fmt: skip
                print(json.dumps({model: rows[model]}), flush=True)
        finally:
            compare.stop_server(server)
    if args.json:
        rows["machine"] = f"{os.cpu_count()} CPUs"
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    print("\n| model | client | 200s/s | refused (429) | late (504) | p50 / p99 ms |")
    print("|---|---|---:|---:|---:|---:|")
    for model in ("prio", "fifo"):
        for client, r in rows[model].items():
            print(f"| {model} | {client} | {r['ok_rps']:,.0f} | {r['shed_share']:.1%} "
                  f"| {r['late_share']:.2%} | {r['ok_p50_ms'] or 0:.1f} / "
                  f"{r['ok_p99_ms'] or 0:.1f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
