# ruff: noqa: RUF001  -- the report prints the multiplication sign on purpose
"""benchmarks/gpu/gpu_check.py: its pure parts (nvidia-smi parsing, budget planning, tables),
the commands it builds checked against the real CLI parser, and one smallest CPU dry run."""

from __future__ import annotations

import importlib.util
import json
import signal
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from batchserve.cli import build_parser

from helpers import block_until

pytest.importorskip("onnx")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu" / "gpu_check.py"


@pytest.fixture(scope="module")
def gc() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------- nvidia-smi


def test_parse_smi_csv_with_header_and_units(gc: ModuleType) -> None:
    text = (
        "utilization.gpu [%], memory.used [MiB]\n"
        "0 %, 1021 MiB\n"
        "87 %, 20480 MiB\n"
        "[N/A], [N/A]\n"
        "100 %, 20512 MiB\n"
        "93 %, 2"  # cut off when the sampler was stopped: still a number, kept
        "\n12 %"  # a half line without a comma: skipped
    )
    assert gc.parse_smi_csv(text) == [(0, 1021), (87, 20480), (100, 20512), (93, 2)]


def test_parse_smi_csv_without_header(gc: ModuleType) -> None:
    assert gc.parse_smi_csv("55, 300\n60, 310\n") == [(55, 300), (60, 310)]


def test_gpu_utilisation_summary(gc: ModuleType) -> None:
    summary = gc.gpu_utilisation([(20.0, 100.0), (80.0, 300.0), (50.0, 200.0)])
    assert summary == {"samples": 3, "util_mean": 50.0, "util_max": 80.0, "memory_max_mib": 300.0}
    assert gc.gpu_utilisation([]) is None


def test_sampler_without_nvidia_smi_reports_none(
    gc: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi on it
    with gc.GpuSampler(tmp_path / "smi.csv") as sampler:
        pass
    assert sampler.summary() is None


# ---------------------------------------------------------------------------- budget


def test_sweep_rates_follow_the_raw_ceiling(gc: ModuleType) -> None:
    settings = gc.gpu_settings()
    assert gc.sweep_rates(4000.0, settings) == (2400.0, 5000.0)
    assert gc.sweep_rates(0.5, settings) == (1.0, 1.0)  # never below 1 req/s


@pytest.mark.parametrize(
    ("start", "max_rate", "bisect", "runs"),
    [
        (2400.0, 5000.0, 2, 4),  # 2400, 4800, then two bisection steps
        (4.0, 22.0, 1, 4),  # 4, 8, 16, then one
        (10.0, 10.0, 0, 1),
        (10.0, 80.0, 2, 6),  # 10, 20, 40, 80 (the boundary counts), then two
    ],
)
def test_max_sweep_runs(
    gc: ModuleType, start: float, max_rate: float, bisect: int, runs: int
) -> None:
    assert gc.max_sweep_runs(start, max_rate, bisect) == runs


def test_gpu_plan_fits_the_budget_and_six_minutes(gc: ModuleType) -> None:
    planned = gc.plan_s(gc.gpu_settings(), ["resnet50", "bert-base"], [1, 2, 4])
    assert 200 < planned <= 330
    args = gc.parse_args(["--out", "x"])
    assert args.budget_s + args.grace_s < 360


def test_dry_run_plan_is_short(gc: ModuleType) -> None:
    assert gc.plan_s(gc.dry_run_settings(), ["resnet50", "bert-base"], [1, 2]) < 150


def test_fits_and_next_estimate(gc: ModuleType) -> None:
    assert gc.fits(300.0, 30.0, 330.0)
    assert not gc.fits(300.0, 31.0, 330.0)
    settings = gc.gpu_settings()
    planned = gc.next_serve_estimate_s(settings, 4, None)
    assert planned == gc.serve_estimate_s(settings, 4, settings.server_start_s)
    assert gc.next_serve_estimate_s(settings, 4, 40.0) == pytest.approx(46.0)


def test_settings_reject_inverted_sweep(gc: ModuleType) -> None:
    with pytest.raises(ValueError, match="start_fraction"):
        gc.Settings(**{**_settings_fields(gc.gpu_settings()), "max_fraction": 0.1})


def _settings_fields(settings: Any) -> dict[str, Any]:
    return {name: getattr(settings, name) for name in settings.__dataclass_fields__}


# ------------------------------------------------------------------ commands and flags


def test_commands_parse_with_the_real_cli(gc: ModuleType, tmp_path: Path) -> None:
    args = gc.parse_args(["--out", str(tmp_path), "--workers", "2", "--serve-args=--fp16 --trt"])
    model = gc.Model("bert-base", tmp_path / "m.onnx", lambda rows, rng: {}, tmp_path / "in.npz")
    serve = gc.serve_command(model, 4, 64, args)
    assert serve[1:3] == ["-m", "batchserve"]
    parsed = build_parser().parse_args(serve[3:])
    assert (parsed.device.kind, parsed.instances, parsed.max_batch_size) == ("cuda", 4, 64)
    assert (parsed.workers, parsed.fp16, parsed.trt) == (2, True, True)
    assert (parsed.host, parsed.port, parsed.name) == ("127.0.0.1", 0, "bert-base")

    bench = gc.bench_command("http://h:1", model, (2400.0, 5000.0), args.settings, tmp_path / "b")
    parsed = build_parser().parse_args(bench[3:])
    assert parsed.binary
    assert parsed.sweep
    assert (parsed.start_rate, parsed.max_rate, parsed.slo_p99_ms) == (2400, 5000, 100)
    assert (parsed.duration, parsed.warmup, parsed.processes) == (3, 1, 6)
    assert parsed.input == str(tmp_path / "in.npz")


def test_dry_run_arguments(gc: ModuleType) -> None:
    args = gc.parse_args(["--cpu-dry-run"])
    assert args.settings.device == "cpu"
    assert args.instances == [1, 2]
    assert args.settings.bert.layers < 12
    assert gc.parse_args(["--cpu-dry-run", "--processes", "1"]).settings.processes == 1
    assert gc.parse_args([]).instances == [1, 2, 4]


# ----------------------------------------------------------------------------- tables


def _report(rate: float, achieved: float, p99: float, batch: float = 30.0) -> dict[str, Any]:
    latency = {"p50": p99 / 3, "p90": p99 / 2, "p95": p99 * 0.8, "p99": p99}
    return {
        "target_rate": rate,
        "achieved_rps": achieved,
        "latency_ms": latency,
        "server": {"mean_batch_rows": batch},
    }


def _summary(device: str = "cuda") -> dict[str, Any]:
    held = {"best": _report(5200.0, 5180.0, 61.5), "curve": []}
    return {
        "gpu": "NVIDIA H100 80GB HBM3, 570.00",
        "device": device,
        "onnxruntime": "1.31.1",
        "providers": ["CUDAExecutionProvider", "CPUExecutionProvider"],
        "processes": 6,
        "bench_duration_s": 3.0,
        "bench_warmup_s": 1.0,
        "slo_p99_ms": 100.0,
        "budget_s": 330.0,
        "elapsed_s": 290.0,
        "models": {
            "resnet50": {
                "raw_rows_per_s": {"1": 700.0, "64": 6000.0, "128": 5900.0},
                "raw_best": 6000.0,
                "serve": [
                    {"instances": 1, "bench": {"best": None}, "gpu": None, "exit": 0},
                    {
                        "instances": 2,
                        "bench": held,
                        "gpu": {"util_mean": 71.2, "util_max": 99.0, "memory_max_mib": 5120.0},
                        "exit": 0,
                    },
                ],
                "notes": ["skipped 4 instance(s): budget"],
            }
        },
        "notes": [],
    }


def test_serve_row(gc: ModuleType) -> None:
    model = _summary()["models"]["resnet50"]
    none, held = (gc.serve_row(e, 6000.0) for e in model["serve"])
    assert none == {"instances": 1, "held": False, "gpu": None, "exit": 0}
    assert held["ratio"] == pytest.approx(5180.0 / 6000.0)
    assert (held["rate"], held["p99"], held["mean_batch"]) == (5200.0, 61.5, 30.0)


def test_markdown_tables(gc: ModuleType) -> None:
    text = gc.markdown(_summary())
    assert "NVIDIA H100 80GB HBM3" in text
    assert "| 64 | 6,000 |" in text
    assert "Ceiling: **6,000 rows/s** at batch 64." in text
    assert "| 1 | none held |" in text
    assert (
        "| 2 | 5,200 | 5,180 | 20.50 | 49.20 | 61.50 | 0.86× | 30.0 | 71 / 99 | 5,120 | 0 |" in text
    )
    assert "- skipped 4 instance(s): budget" in text


def test_targets(gc: ModuleType) -> None:
    checks = {name: (measured, met) for name, measured, met in gc.targets(_summary())}
    assert checks["ResNet-50 over HTTP ≥ 80% of raw ORT best batch"] == (
        "0.86× (2 instance(s))",
        True,
    )
    assert checks["ResNet-50 > 5,000 images/s at p99 < 100 ms"] == ("5,180", True)
    summary = _summary()
    summary["models"]["resnet50"]["raw_best"] = 7000.0
    ratio = {n: met for n, _, met in gc.targets(summary)}
    assert not ratio["ResNet-50 over HTTP ≥ 80% of raw ORT best batch"]
    assert gc.targets(_summary(device="cpu")) == []  # the GPU targets mean nothing on a CPU


# --------------------------------------------------------------------------- dry run


@pytest.mark.slow
def test_smallest_cpu_dry_run_end_to_end(tmp_path: Path) -> None:
    """The real script on CPU: a small BERT, one instance count, one load generator process."""
    command = [sys.executable, str(SCRIPT), "--cpu-dry-run", "--out", str(tmp_path)]
    command += ["--models", "bert-base", "--instances", "1", "--processes", "1"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    model = summary["models"]["bert-base"]
    assert set(model["raw_rows_per_s"]) == {"1", "8"}
    (entry,) = model["serve"]
    assert entry["exit"] == 0  # SIGTERM drained it
    assert entry["bench"]["curve"], entry.get("bench_error")
    assert entry["bench"]["best"] is not None
    text = (tmp_path / "gpu_check.md").read_text()
    assert "## bert-base" in text
    assert text in done.stdout


def _processes(field: int, value: int) -> list[int]:
    """Live processes whose /proc stat field (1: parent, 2: process group) is `value`: the
    servers run in sessions of their own, so they are not in the test's process group."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        if int(fields[field]) == value and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
def test_sigterm_mid_run_keeps_partial_results_and_leaves_no_server(tmp_path: Path) -> None:
    command = [sys.executable, str(SCRIPT), "--cpu-dry-run", "--out", str(tmp_path)]
    command += ["--models", "bert-base", "--instances", "1", "--processes", "1"]
    log = tmp_path / "check.log"  # a file, never a pipe that could fill up unread
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)

    def serving() -> list[int]:  # the raw step is done (and saved) once serving begins
        return _processes(1, process.pid) if "serve --instances 1" in log.read_text() else []

    try:
        # No event crosses processes: the check's output and its server child are polled for.
        server = block_until(serving, "the check's server")[0]
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 143, log.read_text()
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    assert set(summary["models"]["bert-base"]["raw_rows_per_s"]) == {"1", "8"}
    assert any("stopped by a signal" in note for note in summary["notes"]), summary["notes"]
    assert "## bert-base" in (tmp_path / "gpu_check.md").read_text()
    # The server and its whole process group were killed:
    block_until(lambda: not _processes(2, server), "the server's process group to end")
    assert not _alive(server)
    assert _processes(2, server) == []


def test_a_cuda_run_not_on_cuda_stops_the_check(gc: ModuleType, tmp_path: Path) -> None:
    gc.require_device(["CUDAExecutionProvider", "CPUExecutionProvider"], "cuda", "raw")
    gc.require_device(["CPUExecutionProvider"], "cpu", "raw")  # the dry run
    with pytest.raises(gc.CheckStopped, match=r"smoke test: .*\['CPUExecutionProvider'\]"):
        gc.require_device(["CPUExecutionProvider"], "cuda", "smoke test")
    smoke = gc.smoke_test("cpu", tmp_path)
    assert smoke["providers"] == ["CPUExecutionProvider"]
    assert "seconds" in smoke  # how long it took is the report's figure, not a check here
