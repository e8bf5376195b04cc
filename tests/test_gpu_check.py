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


def test_gpu_plan_fits_the_budget_and_nine_minutes(gc: ModuleType) -> None:
    args = gc.parse_args(["--out", "x"])
    assert (args.variants, args.worker_counts) == (["uint8", "fp16"], [2, 4])
    planned = gc.plan_s(
        gc.gpu_settings(), args.models, args.instances, args.variants, args.worker_counts
    )
    assert 400 < planned <= args.budget_s
    # The device call's limit is 10 minutes: installing takes some, the check the rest.
    assert args.budget_s + args.grace_s <= 9 * 60
    without = gc.plan_s(gc.gpu_settings(), args.models, args.instances)
    assert without < planned  # the variants and workers are planned for
    # ... and only for the image model.
    assert gc.plan_s(gc.gpu_settings(), ["bert-base"], [1], ["uint8"], [2]) == gc.plan_s(
        gc.gpu_settings(), ["bert-base"], [1]
    )


def test_dry_run_plan_is_short(gc: ModuleType) -> None:
    args = gc.parse_args(["--cpu-dry-run"])
    assert args.worker_counts == [2]
    planned = gc.plan_s(gc.dry_run_settings(), args.models, [1, 2], args.variants, [2])
    assert planned < 240


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


@pytest.mark.parametrize("variant", ["uint8", "fp16", "uint8-fp16"])
def test_variant_commands_parse_with_the_real_cli(
    gc: ModuleType, tmp_path: Path, variant: str
) -> None:
    from batchserve.flags import settings_from_args

    args = gc.parse_args(["--out", str(tmp_path)])
    model = gc.Model("resnet50", tmp_path / "m.onnx", lambda rows, rng: {}, None)
    chosen = gc.VARIANTS[variant]
    serve = gc.serve_command(model, 2, 64, args, chosen.serve_args(), workers=4)
    parsed = build_parser().parse_args(serve[3:])
    assert (parsed.workers, parsed.instances, parsed.grpc_port) == (4, 2, None)
    runtime = settings_from_args(parsed).runtime
    assert runtime.fp16 is chosen.fp16
    (spec,) = runtime.input_formats
    assert (spec.name, spec.datatype) == ("input", chosen.datatype)
    if chosen.datatype == "UINT8":  # normalised by the graph, as torchvision does
        assert spec.mean == (123.675, 116.28, 103.53)
        assert spec.std == (58.395, 57.12, 57.375)
    else:  # the client sends what the model takes, in half the bytes
        assert not spec.normalises


def test_variant_model_is_the_graph_the_server_makes(gc: ModuleType, tmp_path: Path) -> None:
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, load

    from models import tiny_image

    path = tiny_image(tmp_path / "tiny.onnx", size=224)
    model = gc.Model("tiny", path, lambda rows, rng: {}, None)
    for name, elem, dtype in [("uint8", TensorProto.UINT8, np.uint8),
                              ("fp16", TensorProto.FLOAT16, np.float16)]:  # fmt: skip
        served = gc.variant_model(model, gc.VARIANTS[name], tmp_path)
        assert served.path == path  # the server gets the original and its flags
        assert load(served.raw_path).graph.input[0].type.tensor_type.elem_type == elem
        feeds = served.feeds(2, np.random.default_rng(0))
        assert feeds["input"].dtype == dtype
        (logits,) = ort.InferenceSession(str(served.raw_path)).run(None, feeds)
        assert logits.shape == (2, 4)


def test_converter_noise_is_not_a_server_warning(gc: ModuleType) -> None:
    noise = [
        "/site/onnxconverter_common/float16.py:52: UserWarning: the float32 number 9e-08 will "
        "be truncated to 1e-07",
        "  warnings.warn(",
    ]
    kept = "WARNING batchserve.runtime: TensorRT execution provider unavailable, serving with CUDA"
    assert all(gc.WARNING_LINE.search(line) and gc.CONVERTER_NOISE.search(line) for line in noise)
    assert gc.WARNING_LINE.search(kept)
    assert not gc.CONVERTER_NOISE.search(kept)


def test_parse_apps_csv(gc: ModuleType) -> None:
    text = "4242, 1821\n4243, 1790\n17, [N/A]\npid, used_gpu_memory [MiB]\n"
    assert gc.parse_apps_csv(text) == {4242: 1821.0, 4243: 1790.0}
    assert gc.parse_apps_csv("") == {}


def test_dry_run_arguments(gc: ModuleType) -> None:
    args = gc.parse_args(["--cpu-dry-run"])
    assert args.settings.device == "cpu"
    assert args.instances == [1, 2]
    assert args.settings.bert.layers < 12
    assert gc.parse_args(["--cpu-dry-run", "--processes", "1"]).settings.processes == 1
    assert gc.parse_args([]).instances == [1, 2, 4]
    assert gc.parse_args(["--variants", "", "--worker-counts", ""]).variants == []
    with pytest.raises(SystemExit):
        gc.parse_args(["--variants", "uint8,int4"])


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


RATIO = "ResNet-50 over HTTP ≥ 80% of raw ORT best batch, same input and precision"


def _with_variants() -> dict[str, Any]:
    """_summary() plus an input variant at 2 instances and its 4-worker run."""
    summary = _summary()
    model = summary["models"]["resnet50"]
    uint8 = {
        "instances": 2,
        "workers": 1,
        "variant": "uint8",
        "bench": {"best": _report(5400.0, 5390.0, 70.0)},
        "gpu": {"util_mean": 80.0, "util_max": 100.0, "memory_max_mib": 5300.0},
        "gpu_memory": {"processes_mib": [5200.0], "all_mib": [5200.0]},
        "exit": 0,
    }
    model["variants"] = {
        "uint8": {"datatype": "UINT8", "fp16": False, "raw_rows_per_s": {"64": 6500.0},
                  "raw_best": 6500.0, "serve": [uint8]},
        "fp16": {"datatype": "FP16", "fp16": True, "raw_rows_per_s": {"64": 9000.0},
                 "raw_best": 9000.0, "serve": [{**uint8, "variant": "fp16",
                                                "bench": {"best": None}, "exit": 1}]},
    }  # fmt: skip
    model["workers"] = [
        {
            **uint8,
            "workers": 4,
            "bench": {"best": _report(6000.0, 5980.0, 80.0)},
            "gpu_memory": {"processes_mib": [1821.0, 1790.0, 1790.0, 1802.0], "all_mib": []},
        }
    ]
    return summary


def test_markdown_variant_and_worker_tables(gc: ModuleType) -> None:
    text = gc.markdown(_with_variants())
    # FP32 (the best instance count) first, for comparison; sizes of a 3x224x224 image.
    assert "| FP32 | FP32 | 602 | 2 | 6,000 | 5,200 | 5,180 | 20.50 | 61.50 | 0.86× |" in text
    assert "| UINT8 | FP32 | 151 | 2 | 6,500 | 5,400 | 5,390 | 23.33 | 70.00 | 0.83× " in text
    assert "| FP16 | FP16 | 301 | 2 | 9,000 | none held | | | | | 80 / 100 | 5,200 | 1 |" in text
    assert "input variant uint8, 2 instance(s) each" in text
    assert "| 1 | 5,400 | 5,390 | 23.33 | 70.00 | 0.83× | 80 / 100 | 5,300 | 5,200 | 0 |" in text
    assert "| 4 | 6,000 | 5,980 | 26.67 | 80.00 | 0.92× | 80 / 100 | 5,300 | " in text
    assert "| 1,821 / 1,790 / 1,790 / 1,802 | 0 |" in text


def test_targets_take_the_best_configuration_against_its_own_graph(gc: ModuleType) -> None:
    checks = {name: (measured, met) for name, measured, met in gc.targets(_with_variants())}
    # 4 workers of the UINT8 variant served most: 5,980 / 6,500 (UINT8's own raw ceiling).
    assert checks[RATIO] == ("0.92× (4 workers x 2 instance(s), uint8)", True)
    assert checks["ResNet-50 > 5,000 images/s at p99 < 100 ms"] == ("5,980", True)


def test_targets(gc: ModuleType) -> None:
    checks = {name: (measured, met) for name, measured, met in gc.targets(_summary())}
    assert checks[RATIO] == (
        "0.86× (2 instance(s))",
        True,
    )
    assert checks["ResNet-50 > 5,000 images/s at p99 < 100 ms"] == ("5,180", True)
    summary = _summary()
    summary["models"]["resnet50"]["raw_best"] = 7000.0
    ratio = {n: met for n, _, met in gc.targets(summary)}
    assert not ratio[RATIO]
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


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_cpu_dry_run_of_the_input_variants_and_workers(tmp_path: Path) -> None:
    """The real script on CPU: ResNet-50 at one instance count, then its UINT8 and FP16 input
    variants, each against raw ORT on its own graph, then the best one with 2 workers."""
    command = [sys.executable, str(SCRIPT), "--cpu-dry-run", "--out", str(tmp_path)]
    command += ["--models", "resnet50", "--instances", "1", "--processes", "1"]
    command += ["--variants", "uint8,fp16", "--worker-counts", "2"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    model = summary["models"]["resnet50"]
    assert model["notes"] == []  # nothing skipped, nothing failed
    batch = str(model["raw_best_batch"])
    for name, datatype, fp16 in [("uint8", "UINT8", False), ("fp16", "FP16", True)]:
        record = model["variants"][name]
        assert (record["datatype"], record["fp16"]) == (datatype, fp16)
        assert set(record["raw_rows_per_s"]) == {batch}  # raw ORT on the variant's graph
        (entry,) = record["serve"]
        assert (entry["variant"], entry["workers"], entry["exit"]) == (name, 1, 0)
        assert entry["inputs"] == [f"input {datatype}"]  # what the server took
        # The converter's line per small weight (--fp16) does not crowd out real warnings.
        assert not [w for w in entry["server_warnings"] if "float16.py" in w], entry
        assert entry["bench"]["best"] is not None, entry.get("bench_error")
    (workers,) = model["workers"]
    assert workers["variant"] in ("uint8", "fp16")
    assert (workers["workers"], workers["exit"]) == (2, 0)  # both drained on SIGTERM
    assert workers["inputs"] == [f"input {model['variants'][workers['variant']]['datatype']}"]
    assert workers["bench"]["curve"], workers.get("bench_error")
    assert "listening on http://127.0.0.1:" in workers["listening"]
    assert workers["listening"].endswith("(2 workers)")
    text = (tmp_path / "gpu_check.md").read_text()
    assert "| UINT8 | FP32 | 151 | 1 |" in text
    assert "| FP16 | FP16 | 301 | 1 |" in text
    assert "Worker processes sharing the GPU" in text


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
