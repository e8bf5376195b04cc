"""How throughput scales with `--workers`, against the HTTP ceiling scaled the same way.

For each worker count N: `batchserve serve MODEL --workers N`, and N copies of the no-op
aiohttp ceiling (`baselines/bare_aiohttp.py --reuse-port`) sharing one port, each loaded in
turn by `batchserve bench` (closed loop, 64 callers per worker, `--processes` load generator
processes). Where the machine has the cores (N + the load generators), the servers are pinned
to cores 0..N-1 and the load generators to the cores after them (`taskset`), so the two do not
share cores; otherwise nothing is pinned and the report says so.

    python benchmarks/scaling.py --workers 1,2,4,8 --processes 6 --json scaling.json
    python benchmarks/scaling.py --workers 1,2            # a 2-core machine: shared cores
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from compare import free_port  # noqa: E402


def pinned(command: list[str], cores: list[int] | None) -> list[str]:
    if not cores:
        return command
    return ["taskset", "-c", ",".join(map(str, cores)), *command]


def wait_ready(url: str, processes: list[subprocess.Popen[bytes]], timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in processes):
            raise RuntimeError("a server exited before it was ready")
        try:
            with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)  # a benchmark's start-up poll
    raise RuntimeError(f"{url} not ready within {timeout_s:g} s")


def stop(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
    for process in processes:
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def bench(
    url: str, workers: int, args: argparse.Namespace, cores: list[int] | None
) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        command = [sys.executable, "-m", "batchserve", "bench", url, "--model", "mlp",
                   "--concurrency", str(64 * workers), "--processes", str(args.processes),
                   "--duration", str(args.duration), "--warmup", "2",
                   "--json", out.name]  # fmt: skip
        subprocess.run(pinned(command, cores), check=True, cwd=REPO, capture_output=True,
                       timeout=args.duration + 180)  # fmt: skip
        report = json.loads(Path(out.name).read_text())["report"]
    return {"rps": report["ok"] / report["duration_s"], "p99_ms": report["latency_ms"].get("p99"),
            "errors": report["requests"] - report["ok"]}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="1,2,4,8", help="worker counts, comma-separated")
    parser.add_argument("--processes", type=int, default=2, help="load generator processes")
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    counts = [int(n) for n in args.workers.split(",") if n]
    cpus = os.cpu_count() or 1
    can_pin = shutil.which("taskset") is not None and max(counts) + args.processes <= cpus
    sys.path.insert(0, str(REPO))
    from batchserve.examples import write_example

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="scaling-") as tmp:
        model = write_example("mlp", Path(tmp) / "mlp.onnx")
        env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONSAFEPATH": "1"}
        for workers in counts:
            server_cores = list(range(workers)) if can_pin else None
            load_cores = list(range(workers, workers + args.processes)) if can_pin else None
            row: dict[str, Any] = {"workers": workers}
            for target in ("ceiling", "batchserve"):
                port = free_port()
                url = f"http://127.0.0.1:{port}"
                if target == "ceiling":
                    one = [sys.executable, str(HERE / "baselines" / "bare_aiohttp.py"),
                           "--port", str(port), "--reuse-port"]  # fmt: skip
                    commands = [one] * workers
                else:
                    commands = [[sys.executable, "-m", "batchserve", "serve", str(model),
                                 "--name", "mlp", "--host", "127.0.0.1", "--port", str(port),
                                 "--grpc-port", "off", "--workers", str(workers)]]  # fmt: skip
                processes = [
                    subprocess.Popen(pinned(c, server_cores), cwd=tmp, env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
                    for c in commands
                ]  # fmt: skip
                try:
                    wait_ready(url, processes)
                    row[target] = bench(url, workers, args, load_cores)
                finally:
                    stop(processes)
                print(json.dumps({"workers": workers, target: row[target]}), flush=True)
            rows.append(row)
    one = next((r for r in rows if r["workers"] == 1), None)
    print(f"\ncores {cpus}, pinned: {can_pin}, load generator processes {args.processes}")
    print("| workers | batchserve req/s | p99 ms | ÷ 1 worker | ceiling req/s | ÷ ceiling |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        b, c = r["batchserve"], r["ceiling"]
        scale = f"{b['rps'] / one['batchserve']['rps']:.2f}x" if one else "n/a"
        print(f"| {r['workers']} | {b['rps']:,.0f} | {b['p99_ms'] or 0:.1f} | {scale} "
              f"| {c['rps']:,.0f} | {b['rps'] / c['rps']:.2f}x |")  # fmt: skip
    if args.json:
        output = {"cpus": cpus, "pinned": can_pin, "processes": args.processes, "rows": rows}
        Path(args.json).write_text(json.dumps(output, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
