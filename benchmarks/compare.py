"""Measure batchserve against its baselines side by side with ``wrk``.

One command, one machine, one run: for each repeat, every server in turn
(interleaved, start rotated each repeat) is started on a free port on
127.0.0.1, polled until ``GET /v2/health/ready`` answers 200, checked with one
real infer request, warmed up with a 2 s ``wrk`` run, measured with
``wrk -t1 -cN -dDs --latency``, and stopped. Per server the medians of the
repeats are printed as a Markdown table; raw runs and medians go to ``--json``.

Servers:

* ``bare``: ``benchmarks/baselines/bare_aiohttp.py``, the HTTP ceiling;
* ``batchserve``: ``python -m batchserve serve MODEL --name NAME ...``;
* ``batchserve-2w`` / ``batchserve-4w``: the same with ``--workers 2`` / ``4``;
* ``fastapi-async`` / ``fastapi-sync``: ``benchmarks/baselines/fastapi_server.py``;
* ``before``: batchserve from another source tree (``--before DIR``, e.g. ``git archive`` of
  an older commit unpacked there), for a same-run before/after check of a change;
* ``otel-1pct`` / ``otel-100pct``: batchserve with OpenTelemetry tracing on, 1% and 100% of
  requests sampled, exporting to ``--otel-endpoint`` (by default ``benchmarks/otlp_sink.py``,
  started for the run on a free port). Needs ``batchserve[otel]``.

Example::

    .venv/bin/python benchmarks/compare.py --model models/mlp.onnx --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
LUA_SCRIPT = HERE / "post.lua"
HOST = "127.0.0.1"
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
WARMUP_S = 2
BODY_SEED = 1234
BASELINES = ("bare", "fastapi-async", "fastapi-sync")
PERCENTILES = ("50", "75", "90", "99")

CommandBuilder = Callable[[argparse.Namespace, int], list[str]]


@dataclass
class RunResult:
    server: str
    repeat: int
    rps: float | None = None
    latency_ms: dict[str, float] = field(default_factory=dict)
    requests: int | None = None
    non_2xx: int = 0
    socket_errors: int = 0
    error: str | None = None


# --------------------------------------------------------------------------- servers


def bare_command(_args: argparse.Namespace, port: int) -> list[str]:
    script = HERE / "baselines" / "bare_aiohttp.py"
    return [sys.executable, str(script), "--host", HOST, "--port", str(port)]


def fastapi_command(mode: str) -> CommandBuilder:
    def build(args: argparse.Namespace, port: int) -> list[str]:
        script = HERE / "baselines" / "fastapi_server.py"
        command = [sys.executable, str(script), args.model, "--mode", mode]
        return [*command, "--host", HOST, "--port", str(port)]

    return build


def batchserve_command(args: argparse.Namespace, port: int) -> list[str]:
    command = [sys.executable, "-m", "batchserve", "serve", args.model]
    command += ["--name", args.model_name, "--host", HOST, "--port", str(port)]
    return command + shlex.split(args.batchserve_args)


def current_command(args: argparse.Namespace, port: int) -> list[str]:
    # An ephemeral gRPC port: never collides with a server already on 8001.
    return [*batchserve_command(args, port), "--grpc-port", "0"]


def before_command(args: argparse.Namespace, port: int) -> list[str]:
    # The same command on another source tree (e.g. `git archive` of an older commit), so a
    # change is measured before and after in one run, interleaved, on the same machine.
    if not args.before:
        raise SystemExit("the 'before' server needs --before DIR")
    # PYTHONSAFEPATH: `python -m` puts its working directory (this checkout) before
    # PYTHONPATH, which would run this code under the other tree's name.
    return ["env", "PYTHONSAFEPATH=1", f"PYTHONPATH={args.before}", *batchserve_command(args, port)]


def otel_command(ratio: str) -> CommandBuilder:
    def build(args: argparse.Namespace, port: int) -> list[str]:
        tracing = ["--otel-endpoint", args.otel_endpoint, "--otel-sample-ratio", ratio]
        return [*current_command(args, port), *tracing]

    return build


def workers_command(workers: int) -> CommandBuilder:
    def build(args: argparse.Namespace, port: int) -> list[str]:
        return [*current_command(args, port), "--workers", str(workers)]

    return build


SERVERS: dict[str, CommandBuilder] = {
    "bare": bare_command,
    "batchserve": current_command,
    "batchserve-2w": workers_command(2),
    "batchserve-4w": workers_command(4),
    "before": before_command,
    "otel-1pct": otel_command("0.01"),
    "otel-100pct": otel_command("1"),
    "fastapi-async": fastapi_command("async"),
    "fastapi-sync": fastapi_command("sync"),
}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def start_server(command: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("wb") as log:
        return subprocess.Popen(
            command,
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: workers die with it
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )


def signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)  # pgid == pid thanks to start_new_session


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    signal_group(proc, signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        signal_group(proc, signal.SIGKILL)
        proc.wait(timeout=STOP_TIMEOUT_S)
    signal_group(proc, signal.SIGKILL)  # stragglers left in the group, if any


def http_status(url: str, body: bytes | None = None, timeout: float = 2.0) -> tuple[int, bytes]:
    headers = {"Content-Type": "application/json"} if body is not None else {}
    request = urllib.request.Request(url, data=body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()
    except (OSError, ValueError):
        return 0, b""


def wait_ready(proc: subprocess.Popen[bytes], base_url: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode} before ready")
        if http_status(f"{base_url}/v2/health/ready", timeout=1.0)[0] == 200:
            return
        time.sleep(0.1)
    raise RuntimeError(f"server not ready after {READY_TIMEOUT_S:.0f} s")


def check_infer(url: str, body: bytes, header_length: int | None) -> None:
    headers = {"Content-Type": "application/json"}
    if header_length is not None:
        headers = {"Inference-Header-Content-Length": str(header_length)}
    request = urllib.request.Request(url, data=body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            status, payload = int(response.status), response.read()
            length = response.headers.get("Inference-Header-Content-Length")
    except urllib.error.HTTPError as exc:
        raise RuntimeError(f"infer check: HTTP {exc.code}: {exc.read()[:200]!r}") from None
    except OSError as exc:
        raise RuntimeError(f"infer check: {exc}") from None
    header = json.loads(payload[: int(length)] if length else payload)
    outputs = header.get("outputs")
    if (
        status != 200
        or not outputs
        or not (outputs[0].get("data") or outputs[0].get("parameters", {}).get("binary_data_size"))
    ):
        raise RuntimeError(f"infer check: no outputs in {payload[:200]!r}")


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# --------------------------------------------------------------------------- wrk

UNIT_TO_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}
RPS_RE = re.compile(r"^Requests/sec:\s+([\d.]+)", re.M)
REQUESTS_RE = re.compile(r"^\s*(\d+) requests in", re.M)
PERCENTILE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)%\s+([\d.]+)(us|ms|s|m)\s*$", re.M)
NON_2XX_RE = re.compile(r"Non-2xx or 3xx responses:\s+(\d+)")
SOCKET_RE = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")


def run_wrk(args: argparse.Namespace, url: str, body_path: Path, duration: int) -> str:
    command = ["wrk", "-t1", f"-c{args.connections}", f"-d{duration}s", "--latency"]
    command += [f"--timeout={args.timeout}s", "-s", str(LUA_SCRIPT), url, "--", str(body_path)]
    if args.header_length is not None:
        command.append(str(args.header_length))
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=duration + args.timeout + 30
    )
    if done.returncode != 0:
        raise RuntimeError(f"wrk exited {done.returncode}: {done.stderr.strip()[:300]}")
    return done.stdout


def parse_wrk(output: str, result: RunResult) -> None:
    rps = RPS_RE.search(output)
    if rps is None:
        raise RuntimeError(f"no Requests/sec in wrk output:\n{output}")
    result.rps = float(rps.group(1))
    if requests := REQUESTS_RE.search(output):
        result.requests = int(requests.group(1))
    for pct, value, unit in PERCENTILE_RE.findall(output):
        result.latency_ms[f"p{pct.removesuffix('.00')}"] = float(value) * UNIT_TO_MS[unit]
    if non_2xx := NON_2XX_RE.search(output):
        result.non_2xx = int(non_2xx.group(1))
    if sock := SOCKET_RE.search(output):
        result.socket_errors = sum(int(n) for n in sock.groups())


# --------------------------------------------------------------------------- runs


def write_body(path: Path, model: str, binary: bool) -> int | None:
    """One request of random inputs shaped by the model (one row); returns the binary
    extension's JSON header length, or None for a JSON body."""
    import numpy as np
    import onnxruntime as ort

    from batchserve.bench.workload import random_inputs
    from batchserve.protocol import encode_request
    from batchserve.runtime import TensorSpec

    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    metadata = {"inputs": [TensorSpec.from_ort(n).as_dict() for n in session.get_inputs()]}
    inputs = random_inputs(metadata, 1, np.random.default_rng(BODY_SEED))
    body, header_length = encode_request(inputs, binary=binary, binary_outputs=binary)
    path.write_bytes(body)
    return header_length


def measure(args: argparse.Namespace, server: str, repeat: int, workdir: Path) -> RunResult:
    result = RunResult(server=server, repeat=repeat)
    port = free_port()
    base_url = f"http://{HOST}:{port}"
    url = f"{base_url}/v2/models/{args.model_name}/infer"
    body_path = workdir / "body.json"
    log_path = workdir / f"{server}-{repeat}.log"
    proc = start_server(SERVERS[server](args, port), log_path)
    try:
        wait_ready(proc, base_url)
        check_infer(url, body_path.read_bytes(), args.header_length)
        run_wrk(args, url, body_path, WARMUP_S)
        parse_wrk(run_wrk(args, url, body_path, args.duration), result)
    except (RuntimeError, subprocess.TimeoutExpired, json.JSONDecodeError) as exc:
        result.error = f"{exc}\n{log_tail(log_path)}".strip()
    finally:
        stop_server(proc)
    return result


@contextlib.contextmanager
def otlp_sink(args: argparse.Namespace, workdir: Path) -> Iterator[None]:
    """For the otel-* servers without --otel-endpoint: an OTLP sink for the whole run."""
    if args.otel_endpoint or not any(s.startswith("otel-") for s in args.servers):
        yield
        return
    port = free_port()
    command = [sys.executable, str(HERE / "otlp_sink.py"), "--host", HOST, "--port", str(port)]
    log_path = workdir / "otlp-sink.log"
    sink = start_server(command, log_path)
    args.otel_endpoint = f"http://{HOST}:{port}"
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while http_status(f"{args.otel_endpoint}/v1/traces", b"")[0] != 200:
            if sink.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the OTLP sink did not start:\n{log_tail(log_path)}")
            time.sleep(0.1)
        yield
    finally:
        stop_server(sink)
        print(log_tail(log_path, 1), file=sys.stderr)


def run_all(args: argparse.Namespace, servers: list[str], workdir: Path) -> list[RunResult]:
    results: list[RunResult] = []
    for repeat in range(args.repeats):
        shift = repeat % len(servers)
        for server in servers[shift:] + servers[:shift]:
            print(f"[repeat {repeat + 1}/{args.repeats}] {server} ...", file=sys.stderr, flush=True)
            result = measure(args, server, repeat, workdir)
            print(f"    {describe(result)}", file=sys.stderr, flush=True)
            results.append(result)
    return results


def describe(result: RunResult) -> str:
    if result.error:
        return "FAILED: " + result.error.replace("\n", "\n    ")
    p50, p99 = result.latency_ms.get("p50"), result.latency_ms.get("p99")
    return (
        f"{result.rps:.0f} req/s, p50 {p50} ms, p99 {p99} ms, "
        f"non-2xx {result.non_2xx}, socket errors {result.socket_errors}"
    )


# --------------------------------------------------------------------------- report


def median_of(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarize(results: list[RunResult], servers: list[str]) -> dict[str, dict[str, Any]]:
    summary: dict[str, dict[str, Any]] = {}
    for server in servers:
        ok = [r for r in results if r.server == server and r.error is None and r.rps]
        entry: dict[str, Any] = {
            "runs_ok": len(ok),
            "runs_failed": sum(1 for r in results if r.server == server and r.error),
            "rps": median_of([r.rps for r in ok if r.rps is not None]),
            "non_2xx": sum(r.non_2xx for r in ok),
            "socket_errors": sum(r.socket_errors for r in ok),
        }
        for pct in PERCENTILES:
            key = f"p{pct}"
            entry[f"{key}_ms"] = median_of([r.latency_ms[key] for r in ok if key in r.latency_ms])
        summary[server] = entry
    for entry in summary.values():
        entry["rps_ratio"] = {
            base: ratio(entry["rps"], summary[base]["rps"]) for base in BASELINES if base in summary
        }
    return summary


def ratio(value: float | None, base: float | None) -> float | None:
    return value / base if value and base else None


def fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def markdown_table(summary: dict[str, dict[str, Any]], args: argparse.Namespace) -> str:
    bases = [b for b in BASELINES if b in summary]
    header = ["server", "req/s", "p50 ms", "p99 ms", "non-2xx", "sock err", "runs"]
    header += [f"req/s ÷ {b}" for b in bases]
    lines = [
        f"wrk -t1 -c{args.connections} -d{args.duration}s, median of {args.repeats} repeat(s)",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
    ]
    for server, entry in summary.items():
        runs = f"{entry['runs_ok']}/{entry['runs_ok'] + entry['runs_failed']}"
        row = [
            server,
            fmt(entry["rps"], ",.0f"),
            fmt(entry["p50_ms"], ".2f"),
            fmt(entry["p99_ms"], ".2f"),
            str(entry["non_2xx"]),
            str(entry["socket_errors"]),
            runs,
        ]
        row += [fmt(entry["rps_ratio"][b], ".2f") + "x" for b in bases]
        lines.append("| " + " | ".join(row).replace("n/ax", "n/a") + " |")
    return "\n".join(lines)


def environment() -> dict[str, Any]:
    wrk = subprocess.run(["wrk", "--version"], capture_output=True, text=True, check=False)
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "wrk": (wrk.stdout or wrk.stderr).splitlines()[0] if (wrk.stdout or wrk.stderr) else "",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def write_json(path: str, args: argparse.Namespace, results: list[RunResult], summary: Any) -> None:
    config = {k: v for k, v in vars(args).items() if k != "json"}
    # Paths as the reader would type them: the model and trees named by their file names,
    # not by where this machine keeps them.
    for key in ("model", "before"):
        if config.get(key):
            config[key] = Path(config[key]).name
    document = {
        "config": config,
        "environment": environment(),
        "runs": [asdict(r) for r in results],
        "medians": summary,
    }
    Path(path).write_text(json.dumps(document, indent=2) + "\n")


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="the ONNX model every server loads")
    parser.add_argument("--model-name", default="mlp", help="name used in the URL path")
    parser.add_argument("--duration", type=int, default=10, help="seconds per measured run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--servers", default="bare,batchserve,fastapi-async,fastapi-sync")
    parser.add_argument("--batchserve-args", default="", help="extra args, shlex-split")
    parser.add_argument("--json", metavar="OUT", help="write raw runs and medians here")
    parser.add_argument("--binary", action="store_true", help="binary tensor extension")
    parser.add_argument("--timeout", type=int, default=10, help="wrk per-request timeout, s")
    parser.add_argument(
        "--before", metavar="DIR", help="source tree whose batchserve the 'before' server runs"
    )
    parser.add_argument(
        "--otel-endpoint", metavar="URL",
        help="OTLP/HTTP collector for the otel-* servers (default: an otlp_sink.py of the run's)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    args.model = str(Path(args.model).resolve())
    args.servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    unknown = [s for s in args.servers if s not in SERVERS]
    if unknown:
        parser.error(f"unknown server(s) {unknown}; choose from {sorted(SERVERS)}")
    if not Path(args.model).is_file():
        parser.error(f"model not found: {args.model}")
    if shutil.which("wrk") is None:
        parser.error("wrk not found on PATH (apt-get install -y wrk)")
    if args.duration < 1 or args.repeats < 1 or args.connections < 1:
        parser.error("--duration, --repeats and --connections must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="batchserve-compare-") as tmp:
        workdir = Path(tmp)
        args.header_length = write_body(workdir / "body.json", args.model, args.binary)
        with otlp_sink(args, workdir):
            results = run_all(args, args.servers, workdir)
    summary = summarize(results, args.servers)
    print(markdown_table(summary, args))
    if args.json:
        write_json(args.json, args, results, summary)
    return 0 if all(r.error is None for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
