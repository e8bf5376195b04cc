"""Where gRPC unary calls lose to HTTP: each protocol's no-op ceiling and batchserve, in one run.

One load generator for every target, `h2load` (nghttp2's C client: HTTP/2 for gRPC, `--h1` for
HTTP/1.1), so the client's own cost is the same small one everywhere. Targets, all on 127.0.0.1:

- `http-noop`: aiohttp + uvloop + orjson answering a constant (benchmarks/baselines/bare_aiohttp.py)
- `http-batchserve`: `batchserve serve` of the mlp example, V2 JSON
- `grpc-aio-noop`: grpc.aio answering ModelInfer with a constant (benchmarks/baselines/grpc_noop.py)
- `grpclib-noop`: the same on grpclib (a pure-asyncio gRPC implementation on the h2 library)
- `grpc-batchserve`: the same `batchserve serve`, gRPC ModelInfer (grpc.aio)

Each is loaded in turn, closed loop, `--concurrency` calls in flight (`--connections`
connections, the rest as concurrent streams on them for HTTP/2), `--rounds` times interleaved;
medians are reported. gRPC answers are checked once before and after each run (h2load counts
HTTP statuses, and a gRPC error is a 200 with a grpc-status trailer).

    python benchmarks/grpc_ceiling.py --concurrency 64 --duration 8 --rounds 3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import orjson
from tritonclient.grpc import service_pb2 as pb

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
INFER = "/inference.GRPCInferenceService/ModelInfer"
sys.path.insert(0, str(HERE))

from compare import free_port  # noqa: E402


def grpc_request() -> Any:
    request = pb.ModelInferRequest(model_name="mlp")
    request.inputs.add(name="input", datatype="FP32", shape=[1, 64])
    request.raw_input_contents.append(np.full(64, 0.5, np.float32).tobytes())
    return request


def http_body() -> bytes:
    inputs = [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0.5] * 64}]
    return orjson.dumps({"inputs": inputs})


def grpc_answers(port: int) -> bool:
    """One ModelInfer call answers OK with an output."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary(
            INFER,
            request_serializer=pb.ModelInferRequest.SerializeToString,
            response_deserializer=pb.ModelInferResponse.FromString,
        )
        try:
            return len(call(grpc_request(), timeout=5).outputs) > 0
        except grpc.RpcError:
            return False


def http_answers(port: int) -> bool:
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("POST", "/v2/models/mlp/infer", http_body(),
                           {"Content-Type": "application/json"})  # fmt: skip
        return connection.getresponse().status == 200
    except OSError:
        return False
    finally:
        connection.close()


def wait_until(check: Callable[[], bool], process: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with code {process.returncode}")
        if check():
            return
        time.sleep(0.2)  # a benchmark's start-up poll, not a test
    raise RuntimeError(f"{what} did not answer within 60 s")


def h2load(url: str, body: Path, headers: list[str], args: argparse.Namespace,
           h1: bool) -> dict[str, Any]:  # fmt: skip
    streams = 1 if h1 else max(1, args.concurrency // args.connections)
    connections = args.concurrency if h1 else args.connections
    return run_h2load(url, body, headers, connections=connections, streams=streams,
                      seconds=args.duration, warmup_s=2, h1=h1)  # fmt: skip


def have_h2load() -> bool:
    """Whether h2load is on PATH; says how to get it when not."""
    if shutil.which("h2load") is not None:
        return True
    print("h2load is needed (Debian: apt-get install nghttp2-client)", file=sys.stderr)
    return False


def run_h2load(url: str, body: Path, headers: list[str], *, connections: int, streams: int,
               seconds: float, warmup_s: float, h1: bool) -> dict[str, Any]:  # fmt: skip
    """One closed-loop `h2load` run posting `body`: req/s, mean ms, failed requests.
    RuntimeError when it did not run or no request succeeded (nothing listening yet)."""
    command = ["h2load", "-t1", f"-c{connections}", f"-m{streams}", f"-D{seconds:g}",
               f"--warm-up-time={warmup_s:g}", "-d", str(body)]  # fmt: skip
    for header in headers:
        command += ["-H", header]
    if h1:
        command.append("--h1")
    done = subprocess.run([*command, url], capture_output=True, text=True,
                          timeout=seconds + warmup_s + 60, check=False)  # fmt: skip
    text = done.stdout
    rate = re.search(r"finished in [\d.]+m?s, ([\d.]+) req/s", text)
    counts = re.search(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded", text)
    mean = re.search(r"time for request:\s+\S+\s+\S+\s+([\d.]+)(us|ms|s)", text)
    if done.returncode != 0 or not rate or not counts or not float(rate.group(1)):
        raise RuntimeError(f"h2load failed:\n{text[-1500:]}\n{done.stderr[-1500:]}")
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}
    return {"rps": float(rate.group(1)),
            "mean_ms": float(mean.group(1)) * scale[mean.group(2)] if mean else None,
            "failed": int(counts.group(2)) - int(counts.group(3))}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--connections", type=int, default=4,
                        help="HTTP/2 connections for gRPC (streams spread over them)")  # fmt: skip
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    if not have_h2load():
        return 2

    work = Path(tempfile.mkdtemp(prefix="grpc-ceiling-"))
    grpc_body = work / "grpc.body"
    payload = grpc_request().SerializeToString()
    grpc_body.write_bytes(b"\x00" + len(payload).to_bytes(4, "big") + payload)
    json_body = work / "http.body"
    json_body.write_bytes(http_body())
    sys.path.insert(0, str(REPO))
    from batchserve.examples import write_example

    model = write_example("mlp", work / "mlp.onnx")
    # Run the servers from the work directory with PYTHONSAFEPATH: `python -m batchserve` must
    # load this checkout's package through PYTHONPATH, not whatever the working directory holds.
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONSAFEPATH": "1"}
    ports = {name: free_port() for name in ("http-noop", "grpc-aio-noop", "grpclib-noop",
                                            "http-batchserve", "grpc-batchserve")}  # fmt: skip
    py = sys.executable
    commands = {
        "http-noop": [py, str(HERE / "baselines" / "bare_aiohttp.py"), "--host", "127.0.0.1",
                      "--port", str(ports["http-noop"])],
        "grpc-aio-noop": [py, str(HERE / "baselines" / "grpc_noop.py"), "--impl", "aio",
                          "--port", str(ports["grpc-aio-noop"])],
        "grpclib-noop": [py, str(HERE / "baselines" / "grpc_noop.py"), "--impl", "grpclib",
                         "--port", str(ports["grpclib-noop"])],
        "batchserve": [py, "-m", "batchserve", "serve", str(model), "--host", "127.0.0.1",
                       "--port", str(ports["http-batchserve"]),
                       "--grpc-port", str(ports["grpc-batchserve"])],
    }  # fmt: skip
    processes: dict[str, subprocess.Popen[bytes]] = {}
    rows: dict[str, list[dict[str, Any]]] = {}
    try:
        for name, command in commands.items():
            with open(work / f"{name}.log", "wb") as log:  # the child keeps its own copy
                processes[name] = subprocess.Popen(
                    command, cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=log
                )
        checks: dict[str, Callable[[], bool]] = {
            "http-noop": lambda: http_answers(ports["http-noop"]),
            "grpc-aio-noop": lambda: grpc_answers(ports["grpc-aio-noop"]),
            "grpclib-noop": lambda: grpc_answers(ports["grpclib-noop"]),
            "http-batchserve": lambda: http_answers(ports["http-batchserve"]),
            "grpc-batchserve": lambda: grpc_answers(ports["grpc-batchserve"]),
        }
        owner = {"http-batchserve": "batchserve", "grpc-batchserve": "batchserve"}
        for target, check in checks.items():
            wait_until(check, processes[owner.get(target, target)], target)
        for round_ in range(args.rounds):
            for target, check in checks.items():
                port = ports[target]
                if target.startswith("http"):
                    row = h2load(f"http://127.0.0.1:{port}/v2/models/mlp/infer", json_body,
                                 ["content-type: application/json"], args, h1=True)  # fmt: skip
                else:
                    row = h2load(f"http://127.0.0.1:{port}{INFER}", grpc_body,
                                 ["content-type: application/grpc", "te: trailers"], args,
                                 h1=False)  # fmt: skip
                row["answers_after"] = check()
                rows.setdefault(target, []).append(row)
                print(json.dumps({"round": round_, "target": target, **row}), flush=True)
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes.values():
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    summary = {target: {"rps": statistics.median(r["rps"] for r in runs),
                        "mean_ms": statistics.median(r["mean_ms"] or 0 for r in runs),
                        "failed": sum(r["failed"] for r in runs),
                        "all_answered_after": all(r["answers_after"] for r in runs)}
               for target, runs in rows.items()}  # fmt: skip
    ceiling = summary["http-noop"]["rps"]
    print(f"\n{'target':<18}{'req/s':>10}{'mean ms':>10}{'÷ HTTP no-op':>14}")
    for target, row in summary.items():
        print(f"{target:<18}{row['rps']:>10,.0f}{row['mean_ms']:>10.2f}"
              f"{row['rps'] / ceiling:>13.2f}x")  # fmt: skip
    if args.json:
        output = {"machine": f"{os.cpu_count()} CPUs", "load": "h2load -t1",
                  "concurrency": args.concurrency, "grpc_connections": args.connections,
                  "duration_s": args.duration, "rounds": rows, "medians": summary}  # fmt: skip
        Path(args.json).write_text(json.dumps(output, indent=1) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
