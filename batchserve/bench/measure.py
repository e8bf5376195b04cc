"""What `batchserve bench` and `tune` measure with: the server's metadata and counts, one
measured run, the rate sweep, and the no-op server to measure the client against."""

from __future__ import annotations

import contextlib
import json
import queue
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import IO, Any

from batchserve.bench.errors import BenchError
from batchserve.bench.loadgen import LoadConfig, run_load
from batchserve.bench.report import Report, summarize
from batchserve.bench.transport import split_url
from batchserve.bench.workload import Protocol, Workload
from batchserve.protocol import HEADER_LENGTH

# Set by the client from the body and the URL; a --header for them would corrupt the request.
_RESERVED_HEADERS = {
    "host",
    "content-length",
    "content-type",
    "transfer-encoding",
    "connection",
    HEADER_LENGTH.lower(),
}
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def check_url(url: str, protocol: Protocol = "http") -> None:
    """A one-line error for a URL the load generator cannot drive."""
    if protocol != "http":
        from batchserve.bench.grpc_client import parse_target

        parse_target(url)
        return
    try:
        split_url(url)
    except ValueError as err:
        raise BenchError(str(err)) from None


def choose_protocol(url: str, protocol: str | None, streaming: bool) -> Protocol:
    """The protocol a run speaks: --protocol, else the URL's scheme (grpc:// and grpcs:// are
    gRPC's); --streaming makes a gRPC run send on ModelStreamInfer streams."""
    if protocol is None:
        scheme = url.partition("://")[0].lower() if "://" in url else ""
        protocol = "grpc" if scheme in ("grpc", "grpcs") else "http"
    if protocol not in ("http", "grpc"):
        raise BenchError(f"--protocol is http or grpc, got {protocol!r}")
    if not streaming:
        return "http" if protocol == "http" else "grpc"
    if protocol != "grpc":
        raise BenchError("--streaming is gRPC's ModelStreamInfer: add --protocol grpc")
    return "grpc-stream"


def request_headers(pairs: Sequence[str] = (), api_key: str | None = None) -> dict[str, str]:
    """Extra headers for every request from "Name: value" strings, plus the API key as
    `Authorization: Bearer KEY` (an explicit Authorization header wins)."""
    headers: dict[str, str] = {}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    for pair in pairs:
        name, colon, value = pair.partition(":")
        name, value = name.strip(), value.strip()
        printable = value.isascii() and value.isprintable()  # no CR/LF smuggled in
        if not colon or not _TOKEN.fullmatch(name) or not printable:
            raise BenchError(f'--header wants "Name: value", got {pair!r}')
        if name.lower() in _RESERVED_HEADERS:
            raise BenchError(f"--header cannot set {name}: the client sets it")
        for existing in [k for k in headers if k.lower() == name.lower()]:
            del headers[existing]
        headers[name] = value
    return headers


# Metadata and statistics are a few kilobytes; a URL that answers far more is not a server.
MAX_JSON_BYTES = 16 * 1024 * 1024


def get_json(
    url: str,
    timeout: float = 10.0,
    headers: Mapping[str, str] | None = None,
    *,
    max_bytes: int = MAX_JSON_BYTES,
) -> Any:
    """GET a JSON document; BenchError unless it all arrives within about `timeout` seconds
    (counted from the request, not per read, which alone would let a server that sends a byte
    now and then hold the run forever; one last read may take `timeout` more) and holds at
    most `max_bytes`."""
    deadline = time.monotonic() + timeout
    request = urllib.request.Request(url, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(_read_bounded(response, url, deadline, max_bytes))
    except urllib.error.HTTPError as err:
        raise BenchError(f"GET {url} answered {err.code}: {err.read(200)!r}") from None
    except (urllib.error.URLError, OSError) as err:
        raise BenchError(f"cannot reach {url}: {err}") from None
    except ValueError as err:
        raise BenchError(f"GET {url} did not answer JSON: {err}") from None


def _read_bounded(response: Any, url: str, deadline: float, max_bytes: int) -> bytes:
    body = bytearray()
    while chunk := response.read1(1 << 16):  # what has arrived: never waits for a full chunk
        body += chunk
        if len(body) > max_bytes:
            raise BenchError(f"GET {url} answered more than {max_bytes} bytes")
        if time.monotonic() > deadline:
            raise BenchError(f"GET {url} did not finish answering in time")
    return bytes(body)


def model_metadata(
    base_url: str,
    model: str,
    version: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "")
    metadata: dict[str, Any] = get_json(base_url.rstrip("/") + path, headers=headers)
    return metadata


def server_counts(
    base_url: str, model: str, headers: Mapping[str, str] | None = None
) -> tuple[int, int] | None:
    """(rows, runs) from the V2 statistics extension, when the server has it."""
    try:
        stats = get_json(
            f"{base_url.rstrip('/')}/v2/models/{model}/stats", timeout=5.0, headers=headers
        )
        entry = stats["model_stats"][0]
        return int(entry["inference_count"]), int(entry["execution_count"])
    except (BenchError, KeyError, IndexError, TypeError, ValueError):
        return None


@dataclass(frozen=True, slots=True)
class Target:
    """The server a run measures: `base_url` is its HTTP base URL, or its gRPC address for
    the gRPC protocols (where `headers` go as call metadata)."""

    base_url: str
    model: str
    headers: Mapping[str, str] = field(default_factory=dict)
    protocol: Protocol = "http"

    def metadata(self, version: str | None = None) -> dict[str, Any]:
        """The model's metadata, over the target's protocol: its inputs shape the workload."""
        if self.protocol == "http":
            return model_metadata(self.base_url, self.model, version, self.headers)
        from batchserve.bench import grpc_client

        target = grpc_client.parse_target(self.base_url)
        pairs = grpc_client.call_metadata(self.headers)
        return grpc_client.model_metadata(target, self.model, version, pairs)

    def counts(self) -> tuple[int, int] | None:
        """(rows, runs) so far, from the server's statistics, when it has them."""
        if self.protocol == "http":
            return server_counts(self.base_url, self.model, self.headers)
        from batchserve.bench import grpc_client

        target = grpc_client.parse_target(self.base_url)
        pairs = grpc_client.call_metadata(self.headers)
        return grpc_client.server_counts(target, self.model, pairs)


def measure(target: Target, workload: Workload, config: LoadConfig) -> Report:
    """One run. The server's runs and mean batch rows come from its statistics before and
    after the run, so they include the warm-up (and any other client's traffic)."""
    before = target.counts()
    report = summarize(run_load(workload, config), config)
    after = target.counts()
    if before and after and after[1] > before[1]:
        rows, runs = after[0] - before[0], after[1] - before[1]
        report.server = {"runs": runs, "mean_batch_rows": rows / runs}
    return report


def sweep(
    run: Callable[[float], Report],
    slo_p99_ms: float,
    start_rate: float,
    max_rate: float,
    bisect_steps: int = 4,
    factor: float = 2.0,
) -> tuple[list[Report], Report | None]:
    """Step the rate up by `factor` until p99 passes the SLO (or errors appear), then bisect
    between the last rate that held and the first that did not."""
    if factor <= 1:
        raise ValueError("the sweep's step factor must be > 1")
    curve: list[Report] = []
    best: Report | None = None

    def holds(report: Report) -> bool:
        return report.errors == 0 and report.p99_ms < slo_p99_ms

    rate, failed_at = start_rate, None
    while rate <= max_rate:
        report = run(rate)
        curve.append(report)
        if not holds(report):
            failed_at = rate
            break
        best = report
        rate *= factor
    if failed_at is not None:
        low = best.target_rate if best and best.target_rate else 0.0
        high = failed_at
        for _ in range(bisect_steps):
            middle = (low + high) / 2
            if middle <= 0:
                break
            report = run(middle)
            curve.append(report)
            if holds(report):
                best, low = report, middle
            else:
                high = middle
    curve.sort(key=lambda r: r.target_rate or 0.0)
    return curve, best


def curve_table(curve: list[Report], slo_p99_ms: float) -> str:
    lines = [
        "| target req/s | achieved req/s | p50 ms | p99 ms | p99.9 ms | errors | under SLO |",
        "|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for r in curve:
        lat = r.latency_ms
        holds = r.errors == 0 and r.p99_ms < slo_p99_ms
        lines.append(
            f"| {r.target_rate or 0:,.0f} | {r.achieved_rps:,.0f} | {lat.get('p50', 0):.2f} | "
            f"{lat.get('p99', 0):.2f} | {lat.get('p99.9', 0):.2f} | {r.errors} | "
            f"{'yes' if holds else 'no'} |"
        )
    return "\n".join(lines)


def listening_url(stream: IO[str], timeout_s: float, what: str, scheme: str = "http") -> str:
    """The URL a starting server prints (`listening on http://...`, or another `scheme`) on
    `stream`, a pipe from it.

    A thread reads the pipe, and keeps reading it until the server exits: a blocking read
    here would wait past `timeout_s` for a server that prints nothing, and a pipe nobody reads
    fills up and blocks the server on its next log line, in the middle of a run."""
    found: queue.Queue[str | None] = queue.Queue()
    listening = re.compile(rf"listening on ({re.escape(scheme)}://\S+)")

    def drain() -> None:
        try:
            for line in stream:
                if match := listening.search(line):
                    found.put(match.group(1))
        except (OSError, ValueError):
            pass  # the pipe was closed on this side: the server is being stopped
        finally:
            found.put(None)  # the server exited (or its pipe is gone)

    threading.Thread(target=drain, name="batchserve-bench-drain", daemon=True).start()
    try:
        url = found.get(timeout=timeout_s)
    except queue.Empty:
        raise BenchError(f"{what} did not start within {timeout_s:g} s") from None
    if url is None:
        raise BenchError(f"{what} exited while starting")
    return url


@contextlib.contextmanager
def noop_server(start_timeout_s: float = 60.0, protocol: str = "http") -> Iterator[str]:
    """Start the no-op V2 server (HTTP, or gRPC with `protocol="grpc"`) in a subprocess;
    yields its base URL (grpc://HOST:PORT for gRPC); stops it by PID."""
    grpc = ["--grpc"] if protocol == "grpc" else []
    process = subprocess.Popen(
        [sys.executable, "-m", "batchserve.bench.noop", "--port", "0", *grpc],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        scheme = "grpc" if grpc else "http"
        yield listening_url(process.stdout, start_timeout_s, "the no-op server", scheme)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def at_rate(config: LoadConfig, rate: float) -> LoadConfig:
    return replace(config, rate=rate, concurrency=None)
