"""`batchserve bench`: metadata → workload → load (or a sweep) → report."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from batchserve.bench.errors import BenchError as BenchError  # re-exported for the CLI
from batchserve.bench.loadgen import LoadConfig, run_load
from batchserve.bench.report import Report, summarize
from batchserve.bench.transport import split_url
from batchserve.bench.workload import Workload
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


def check_url(url: str) -> None:
    """A one-line error for a URL the load generator cannot drive."""
    try:
        split_url(url)
    except ValueError as err:
        raise BenchError(str(err)) from None


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


def get_json(url: str, timeout: float = 10.0, headers: Mapping[str, str] | None = None) -> Any:
    request = urllib.request.Request(url, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as err:
        raise BenchError(f"GET {url} answered {err.code}: {err.read()[:200]!r}") from None
    except (urllib.error.URLError, OSError) as err:
        raise BenchError(f"cannot reach {url}: {err}") from None


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
    base_url: str
    model: str
    headers: Mapping[str, str] = field(default_factory=dict)


def measure(target: Target, workload: Workload, config: LoadConfig) -> Report:
    """One run. The server's runs and mean batch rows come from its statistics before and
    after the run, so they include the warm-up (and any other client's traffic)."""
    before = server_counts(target.base_url, target.model, target.headers)
    report = summarize(run_load(workload, config), config)
    after = server_counts(target.base_url, target.model, target.headers)
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


@contextlib.contextmanager
def noop_server() -> Iterator[str]:
    """Start the no-op V2 server in a subprocess; yields its base URL; stops it by PID."""
    process = subprocess.Popen(
        [sys.executable, "-m", "batchserve.bench.noop", "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        found = re.search(r"listening on (http://\S+)", line)
        if not found:
            raise BenchError(f"the no-op server did not start: {line!r}")
        yield found.group(1)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_ready(base_url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{base_url}/v2/health/ready", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    raise BenchError(f"{base_url} did not become ready within {timeout:g} s")


def at_rate(config: LoadConfig, rate: float) -> LoadConfig:
    return replace(config, rate=rate, concurrency=None)
