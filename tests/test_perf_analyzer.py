"""Triton's own load tester, perf_analyzer (PyPI `perf-analyzer`), against a real `batchserve
serve` process: over HTTP, gRPC and gRPC streaming it reads the model's metadata and Triton
configuration, sends its load and reports throughput, with no request failing.

perf_analyzer is one prebuilt binary that needs a newer glibc than Debian 12's:
`tools/perf-analyzer.sh` sets it up without touching the system and prints its path. The test
runs $BATCHSERVE_PERF_ANALYZER, else a `perf_analyzer` on the PATH, else the one that script
set up at its default place; without one it skips and says why, or fails where
BATCHSERVE_REQUIRE_PERF_ANALYZER is set (CI)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers import ServerProcess

ROOT = Path(__file__).resolve().parent.parent
SETUP = ROOT / "tools" / "perf-analyzer.sh"
DEFAULT = Path("/tmp/batchserve-perf-analyzer/bin/perf_analyzer")  # the script's default
REQUIRE = "BATCHSERVE_REQUIRE_PERF_ANALYZER"


def _candidate() -> tuple[str | None, str]:
    """The perf_analyzer to try, and where it came from (or why there is none)."""
    if chosen := os.environ.get("BATCHSERVE_PERF_ANALYZER"):
        return chosen, "$BATCHSERVE_PERF_ANALYZER"
    if found := shutil.which("perf_analyzer"):
        return found, "the PATH"
    if DEFAULT.exists():
        return str(DEFAULT), f"{SETUP.name}'s default place"
    why = f"perf_analyzer is not set up: run {SETUP.relative_to(ROOT)} and set "
    why += "BATCHSERVE_PERF_ANALYZER to the path it prints"
    if setup_error := os.environ.get("BATCHSERVE_PERF_ANALYZER_SETUP_ERROR"):
        why += f"; setting it up failed here: {setup_error}"
    return None, why


@pytest.fixture(scope="module")
def perf_analyzer() -> str:
    binary, where = _candidate()
    reason = where
    if binary is not None:
        try:
            done = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=60)
        except OSError as err:
            reason = f"{binary} (from {where}) cannot run: {err}"
        else:
            if done.returncode == 0:
                return binary
            output = (done.stdout + done.stderr).strip()[-500:]
            reason = f"{binary} (from {where}) does not start: {output}"
    if os.environ.get(REQUIRE):
        pytest.fail(f"perf_analyzer is required here ({REQUIRE} is set): {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, mlp_path: Path) -> Iterator[ServerProcess]:
    logs = tmp_path_factory.mktemp("perf_analyzer")
    process = ServerProcess.start(str(mlp_path), log_dir=logs, grpc=True)
    yield process
    process.stop()


def statistics(server: ServerProcess) -> dict[str, Any]:
    """Triton's inference statistics of the served mlp (success, fail, queue, ...)."""
    with urllib.request.urlopen(f"{server.url}/v2/models/mlp/stats", timeout=10) as answer:
        stats: dict[str, Any] = json.load(answer)["model_stats"][0]["inference_stats"]
    return stats


@pytest.mark.slow
@pytest.mark.parametrize(
    ("protocol", "extra"),
    [("http", ()), ("grpc", ()), ("grpc", ("--streaming",))],
    ids=["http", "grpc", "grpc-streaming"],
)
def test_perf_analyzer_reports_throughput_without_errors(
    perf_analyzer: str,
    server: ServerProcess,
    tmp_path: Path,
    protocol: str,
    extra: tuple[str, ...],
) -> None:
    port = server.port if protocol == "http" else server.grpc_port
    report = tmp_path / "report.csv"
    before = statistics(server)
    done = subprocess.run(
        [
            perf_analyzer, "-m", "mlp", "-u", f"127.0.0.1:{port}", "-i", protocol, *extra,
            "--concurrency-range", "8", "--measurement-interval", "2000",
            # Every window counts as stable: on a busy machine the throughput of 2 s windows
            # varies more than the default 10 %, and how fast this machine is is not the test.
            "--stability-percentage", "100",
            "-f", str(report),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    output = done.stdout + done.stderr
    # perf_analyzer stops with an error (and exits non-zero) at the first request that fails.
    assert done.returncode == 0, output
    assert "error" not in output.lower(), output
    [row] = list(csv.DictReader(report.read_text().splitlines()))
    assert row["Concurrency"] == "8"
    assert float(row["Inferences/Second"]) > 0, output
    after = statistics(server)
    assert after["fail"]["count"] == before["fail"]["count"]
    assert after["success"]["count"] > before["success"]["count"]
