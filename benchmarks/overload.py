"""Overload figure: what the server does when offered several times its capacity.

The server's capacity is measured first (a real `batchserve serve` process on 127.0.0.1 with
default settings, `batchserve bench` closed loop). Then, for each admission setting, a fresh
server is offered an open-loop load of `--multiple` times that capacity for `--duration`
seconds. Reported: requests held
(200) and shed (429), the p50/p99 of admitted requests measured from their scheduled send
time, how fast refusals were answered, any other error, and the server's memory.

    python benchmarks/overload.py            # writes docs/results/overload.json
    python benchmarks/overload.py deadline --before DIR   # see `deadline_main`

Settings compared:
* `bounded`: `--max-queue-rows Q --request-timeout-ms D` (admission control on);
* `unbounded`: `--max-queue-rows 1000000 --max-loop-lag-ms 0`, no deadline (what a server
  without admission control does: everyone's latency grows with the backlog).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import compare  # noqa: E402

BUILD = REPO / "build"
SETTINGS = ("bounded", "unbounded")


def example_model(name: str) -> Path:
    """The example model `name` under build/, written on first use."""
    BUILD.mkdir(exist_ok=True)
    path = BUILD / f"{name}.onnx"
    if not path.exists():
        subprocess.run([sys.executable, "-m", "batchserve", "example-model", name,
                        "-o", str(path)], check=True, cwd=REPO)  # fmt: skip
    return path


def flags(name: str, args: argparse.Namespace) -> list[str]:
    common = ["--max-batch-size", str(args.max_batch_size)]
    if name == "bounded":
        return [*common, "--max-queue-rows", str(args.queue_rows),
                "--request-timeout-ms", str(args.deadline_ms)]  # fmt: skip
    return [*common, "--max-queue-rows", "1000000", "--max-loop-lag-ms", "0"]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def bench(base: str, model: str, load: list[str], duration: float) -> dict[str, Any]:
    command = [sys.executable, "-m", "batchserve", "bench", base, "--model", model, "--binary",
               "--duration", str(duration), "--warmup", "1", "--timeout", "30",
               "--json", "/dev/stdout", *load]  # fmt: skip
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=duration + 120, cwd=REPO, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"bench failed:\n{done.stderr[-2000:]}")
    text = done.stdout
    report: dict[str, Any] = json.loads(text[text.index("{\n") :])["report"]
    return report


def start(model_path: Path, model: str, flags: list[str], log: str) -> tuple[Any, str]:
    port = compare.free_port()
    command = [sys.executable, "-m", "batchserve", "serve", str(model_path), "--name", model,
               "--host", compare.HOST, "--port", str(port), "--log-level", "warning",
               "--grpc-port", "0", *flags]  # fmt: skip
    proc = compare.start_server(command, BUILD / f"overload-{log}.log")
    base = f"http://{compare.HOST}:{port}"
    try:
        compare.wait_ready(proc, base)
    except BaseException:
        compare.stop_server(proc)
        raise
    return proc, base


def measure_capacity(model_path: Path, model: str, args: argparse.Namespace) -> float:
    proc, base = start(model_path, model, flags("unbounded", args), "capacity")
    try:
        callers = str(2 * args.max_batch_size)  # enough to fill every batch
        closed = bench(base, model, ["--concurrency", callers], args.capacity_duration)
    finally:
        compare.stop_server(proc)
    return float(closed["achieved_rps"])


def run_setting(name: str, model_path: Path, model: str, args: argparse.Namespace,
                capacity: float) -> dict[str, Any]:  # fmt: skip
    proc, base = start(model_path, model, flags(name, args), name)
    try:
        rss_before = rss_mb(proc.pid)
        offered = capacity * args.multiple
        report = bench(
            base, model, ["--rate", f"{offered:.0f}", "--max-outstanding", "8192"], args.duration
        )
        rss_after = rss_mb(proc.pid)
    finally:
        compare.stop_server(proc)
    statuses = report["errors_by_status"]
    requests = report["requests"]
    shed = statuses.get("429", 0) + statuses.get("503", 0)
    return {
        "setting": name,
        "flags": " ".join(flags(name, args)),
        "capacity_rps": capacity,
        "offered_rps": offered,
        "requests": requests,
        "held": report["ok"],
        "held_rps": report["achieved_rps"],
        "shed": shed,
        "shed_share": shed / requests if requests else 0.0,
        "other_errors": {k: v for k, v in statuses.items() if k not in ("429", "503")},
        "exceptions": report["errors_by_exception"],
        "admitted_latency_ms": report["latency_ms"],
        "refused_latency_ms": report.get("refused_latency_ms", {}),
        "server_rss_mb": {"before": rss_before, "after": rss_after},
    }


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| admission | offered (x capacity) | held | shed | other errors | admitted p50 / p99 "
        "| refusal p50 / p99 | server RSS before → after |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lat, ref, rss = r["admitted_latency_ms"], r["refused_latency_ms"], r["server_rss_mb"]
        errors = sum(r["other_errors"].values()) + sum(r["exceptions"].values())
        refused = f"{ref['p50']:.2f} / {ref['p99']:.2f} ms" if ref else "n/a"
        lines.append(
            f"| {r['setting']} (`{r['flags']}`) | {r['offered_rps']:,.0f} req/s "
            f"({r['offered_rps'] / r['capacity_rps']:.1f}x) | {r['held_rps']:,.0f} req/s "
            f"| {r['shed']:,} ({r['shed_share']:.0%}) | {errors} "
            f"| {lat.get('p50', 0):.1f} / {lat.get('p99', 0):.1f} ms | {refused} "
            f"| {rss['before']:.0f} → {rss['after']:.0f} MB |"
        )
    return "\n".join(lines)


def closed_loop(base: str, model: str, clients: int, args: argparse.Namespace) -> dict[str, Any]:
    """`batchserve bench` closed loop: `clients` callers back to back, what each status got."""
    load = ["--concurrency", str(clients), "--processes", str(args.processes)]
    report = bench(base, model, load, args.duration)
    statuses = report["errors_by_status"]
    seconds = report["duration_s"]
    return {
        "clients": clients,
        "ok_rps": report["ok"] / seconds,
        "shed_rps": statuses.get("429", 0) / seconds,
        "late_rps": statuses.get("504", 0) / seconds,
        "late_share": statuses.get("504", 0) / max(1, report["requests"]),
        "ok_p99_ms": report["latency_ms"].get("p99", float("nan")),
        "other": {k: v for k, v in statuses.items() if k not in ("429", "504")},
        "exceptions": report["errors_by_exception"],
    }


def deadline_round(
    tree: str, model_path: Path, args: argparse.Namespace, load: Any = closed_loop
) -> list[dict[str, Any]]:
    """One server from `tree` ("after": this checkout; else a source directory), then each
    client count against it in turn."""
    flags = ["--request-timeout-ms", str(args.deadline_ms)]
    if tree == "after":  # an ephemeral gRPC port (a tree from before gRPC has no such flag)
        flags += ["--grpc-port", "0"]
    # PYTHONSAFEPATH: `python -m` puts its working directory (this checkout) first otherwise.
    env = [] if tree == "after" else ["env", "PYTHONSAFEPATH=1", f"PYTHONPATH={tree}"]
    port = compare.free_port()
    command = [*env, sys.executable, "-m", "batchserve", "serve", str(model_path), "--name",
               args.model, "--host", compare.HOST, "--port", str(port), "--log-level",
               "warning", *flags]  # fmt: skip
    proc = compare.start_server(command, BUILD / "overload-deadline.log")
    base = f"http://{compare.HOST}:{port}"
    try:
        compare.wait_ready(proc, base)
        rows = [load(base, args.model, n, args) for n in args.clients]
    finally:
        compare.stop_server(proc)
    return [{"tree": "after" if tree == "after" else "before", **row} for row in rows]


def deadline_table(rows: list[dict[str, Any]], capacity: dict[str, float]) -> str:
    lines = [
        "| code | clients | 200/s (share of capacity) | 429/s | 504/s (share of answers) "
        "| p99 of 200s at the client |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        share = r["ok_rps"] / capacity[r["tree"]] if capacity[r["tree"]] else 0.0
        lines.append(
            f"| {r['tree']} | {r['clients']} | {r['ok_rps']:,.0f} ({share:.0%}) "
            f"| {r['shed_rps']:,.0f} | {r['late_rps']:,.0f} ({r['late_share']:.1%}) "
            f"| {r['ok_p99_ms']:.0f} ms |"
        )
    return "\n".join(lines)


def deadline_main(argv: list[str]) -> int:
    """Closed-loop overload against a deadline: a real server with `--request-timeout-ms`,
    64 callers (its capacity) then 512; before (another source tree) and after, interleaved
    round by round so a machine busy with other work weighs on both alike."""
    parser = argparse.ArgumentParser(description=deadline_main.__doc__)
    parser.add_argument("--before", required=True, help="source tree of the code before")
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--deadline-ms", type=float, default=90.0)
    parser.add_argument("--clients", type=int, nargs="+", default=[64, 512])
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--processes", type=int, default=2, help="load generator processes")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", default=str(REPO / "docs" / "results" / "overload_deadline.json"))
    args = parser.parse_args(argv)
    model_path = example_model(args.model)
    rows: list[dict[str, Any]] = []
    for _ in range(args.rounds):
        for tree in (args.before, "after"):
            for row in deadline_round(tree, model_path, args):
                rows.append(row)
                print(json.dumps(row), flush=True)
    # Medians over rounds per (code, clients); capacity: the 200s at the fewest clients.
    merged: list[dict[str, Any]] = []
    for tree in ("before", "after"):
        for n in args.clients:
            same = [r for r in rows if r["tree"] == tree and r["clients"] == n]
            keys = ("ok_rps", "shed_rps", "late_rps", "late_share", "ok_p99_ms")
            merged.append({"tree": tree, "clients": n,
                           **{k: statistics.median(r[k] for r in same) for k in keys}})  # fmt: skip
    fewest = min(args.clients)
    capacity = {r["tree"]: r["ok_rps"] for r in merged if r["clients"] == fewest}
    output = {"model": args.model, "machine": f"{os.cpu_count()} CPUs",
              "when": time.strftime("%Y-%m-%d %H:%M"), "deadline_ms": args.deadline_ms,
              "duration_s": args.duration, "rounds": rows, "medians": merged}  # fmt: skip
    Path(args.json).write_text(json.dumps(output, indent=1))
    print(deadline_table(merged, capacity))
    return 0


# wrk prints its latency distribution (all answers together) as JSON lines after the run.
_WRK_DONE = """
dofile("%s")
function done(summary, latency, requests)
   for _, p in ipairs({50, 90, 95, 98, 99, 99.5, 99.9}) do
      io.write(string.format("latency_pct %%g %%d\\n", p, latency:percentile(p)))
   end
   io.write(string.format("latency_pct 100 %%d\\n", latency.max))
end
"""


def _metric_counts(base: str) -> dict[str, float]:
    """`batchserve_requests_total` by status class and the request-duration histogram, read
    from the server's /metrics (what the server saw: its clock starts when the handler runs)."""
    text = compare.http_status(f"{base}/metrics", timeout=10.0)[1].decode()
    counts: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("batchserve_requests_total{"):
            counts[line.split('status_class="')[1][:3]] = float(line.rsplit(" ", 1)[1])
        elif line.startswith(
            ("process_cpu_seconds_total ", "batchserve_http_gate_refusals_total ")
        ):
            counts[line.split(" ", 1)[0]] = float(line.rsplit(" ", 1)[1])
        elif line.startswith("batchserve_request_duration_seconds_bucket{"):
            le = line.split('le="')[1].split('"')[0]
            counts[f"le_{le}"] = float(line.rsplit(" ", 1)[1])
    return counts


def _server_p99_ms(before: dict[str, float], after: dict[str, float]) -> float:
    """The p99 of all answers by the server's clock: the first bucket holding 99% of them."""
    buckets = sorted(
        (float(k[3:]), after[k] - before.get(k, 0.0)) for k in after if k.startswith("le_")
    )
    total = buckets[-1][1] if buckets else 0.0
    for bound, count in buckets:
        if count >= 0.99 * total:
            return bound * 1000
    return float("nan")


def wrk_load(base: str, model: str, clients: int, args: argparse.Namespace) -> dict[str, Any]:
    """`wrk -t1 -c<clients>` posting one binary request for `duration` seconds: a closed loop
    whose load generator costs the server's machine far less than a Python one."""
    script = BUILD / "overload-wrk.lua"
    script.write_text(_WRK_DONE % (HERE / "post.lua"))
    url = f"{base}/v2/models/{model}/infer"
    before = _metric_counts(base)
    done = subprocess.run(
        ["wrk", "-t1", f"-c{clients}", f"-d{args.duration:g}s", "--timeout", "5s", "-s",
         str(script), url, "--", str(args.body), str(args.header_length)],
        capture_output=True, text=True, timeout=args.duration + 60, check=False,
    )  # fmt: skip
    after = _metric_counts(base)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed:\n{done.stderr[-2000:]}")
    lines = [line.split() for line in done.stdout.splitlines() if line.startswith("latency_pct")]
    pct = {float(p): int(us) / 1000 for _, p, us in lines}
    seconds = args.duration
    ok, c4, c5 = (after.get(k, 0.0) - before.get(k, 0.0) for k in ("2xx", "4xx", "5xx"))
    answers = max(1.0, ok + c4 + c5)
    # wrk's distribution mixes 200s and refusals. Refusals are answered fast, so the slowest
    # 1% of the 200s are the slowest (1% x 200s' share) of all answers.
    share = ok / answers
    tail = 100 - share
    p99_ok = _interpolate(pct, tail)

    def rate(key: str) -> float:
        return (after.get(key, 0.0) - before.get(key, 0.0)) / seconds

    return {"clients": clients, "ok_rps": ok / seconds, "shed_rps": c4 / seconds,
            "late_rps": c5 / seconds, "late_share": c5 / answers, "ok_p99_ms": p99_ok,
            "all_latency_ms": {f"p{k:g}": v for k, v in pct.items()},
            "server_p99_ms": _server_p99_ms(before, after),
            "server_cpu": rate("process_cpu_seconds_total"),
            "gate_refusals_rps": rate("batchserve_http_gate_refusals_total")}  # fmt: skip


def _interpolate(pct: dict[float, float], at: float) -> float:
    points = sorted(pct.items())
    for (p0, v0), (p1, v1) in itertools.pairwise(points):
        if p0 <= at <= p1:
            return v0 + (v1 - v0) * (at - p0) / (p1 - p0) if p1 > p0 else v1
    return points[-1][1] if points else float("nan")


def wrk_main(argv: list[str]) -> int:
    """`deadline`, with wrk as the load generator and the status counts read from /metrics."""
    parser = argparse.ArgumentParser(description=wrk_main.__doc__)
    parser.add_argument("--before", required=True, help="source tree of the code before")
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--deadline-ms", type=float, default=90.0)
    parser.add_argument("--clients", type=int, nargs="+", default=[64, 512])
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--trees", nargs="+", default=["before", "after"])
    parser.add_argument("--json", default=str(REPO / "docs" / "results" / "overload_deadline.json"))
    args = parser.parse_args(argv)
    model_path = example_model(args.model)
    args.body, args.header_length = _wrk_body(model_path)
    rows: list[dict[str, Any]] = []
    for _ in range(args.rounds):
        for tree in args.trees:
            source = args.before if tree == "before" else "after"
            for row in deadline_round(source, model_path, args, load=wrk_load):
                rows.append(row)
                print(json.dumps(row), flush=True)
    merged = _medians(rows, args.clients, ("ok_rps", "shed_rps", "late_rps", "late_share",
                                           "ok_p99_ms", "server_p99_ms"))  # fmt: skip
    fewest = min(args.clients)
    capacity = {r["tree"]: r["ok_rps"] for r in merged if r["clients"] == fewest}
    output = {"model": args.model, "machine": f"{os.cpu_count()} CPUs", "load": "wrk -t1",
              "when": time.strftime("%Y-%m-%d %H:%M"), "deadline_ms": args.deadline_ms,
              "duration_s": args.duration, "rounds": rows, "medians": merged}  # fmt: skip
    Path(args.json).write_text(json.dumps(output, indent=1))
    print(deadline_table(merged, capacity))
    return 0


def _wrk_body(model_path: Path) -> tuple[Path, int]:
    """One binary-extension request of one row for the model (its first input)."""
    import numpy as np
    import onnx

    from batchserve.protocol import encode_request

    graph = onnx.load(str(model_path)).graph
    first = graph.input[0]
    width = first.type.tensor_type.shape.dim[1].dim_value
    inputs = {first.name: np.random.default_rng(0).random((1, width), dtype=np.float32)}
    data, header_length = encode_request(inputs, binary=True, binary_outputs=True)
    path = BUILD / "overload-wrk.body"
    path.write_bytes(data)
    assert header_length is not None
    return path, header_length


def _medians(rows: list[dict[str, Any]], clients: list[int], keys: tuple[str, ...]
             ) -> list[dict[str, Any]]:  # fmt: skip
    merged: list[dict[str, Any]] = []
    for tree in ("before", "after"):
        for n in clients:
            same = [r for r in rows if r["tree"] == tree and r["clients"] == n]
            if same:
                medians = {k: statistics.median(r[k] for r in same) for k in keys}
                merged.append({"tree": tree, "clients": n, **medians})
    return merged


def main() -> int:
    if sys.argv[1:2] == ["deadline"]:
        return deadline_main(sys.argv[2:])
    if sys.argv[1:2] == ["wrk"]:
        return wrk_main(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet50", help="example model to serve")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--queue-rows", type=int, default=32, help="bounded: --max-queue-rows")
    parser.add_argument("--deadline-ms", type=float, default=1000.0, help="bounded: deadline")
    parser.add_argument("--multiple", type=float, default=3.0, help="offered load / capacity")
    parser.add_argument("--duration", type=float, default=20.0, help="overload seconds")
    parser.add_argument("--capacity-duration", type=float, default=8.0)
    parser.add_argument("--json", default=str(REPO / "docs" / "results" / "overload.json"))
    args = parser.parse_args()
    model_path = example_model(args.model)
    rows: list[dict[str, Any]] = []
    capacity = measure_capacity(model_path, args.model, args)
    print(f"capacity (closed loop): {capacity:,.0f} req/s", flush=True)
    for name in SETTINGS:
        row = run_setting(name, model_path, args.model, args, capacity)
        rows.append(row)
        print(json.dumps(row), flush=True)
    output = {
        "model": args.model,
        "machine": f"{os.cpu_count()} CPUs",
        "when": time.strftime("%Y-%m-%d %H:%M"),
        "duration_s": args.duration,
        "rows": rows,
    }
    Path(args.json).write_text(json.dumps(output, indent=1))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
