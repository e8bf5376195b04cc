"""GPU check: raw ONNX Runtime CUDA ceilings, then batchserve over HTTP against them.

    python benchmarks/gpu/gpu_check.py --out DIR [--models resnet50,bert-base]
        [--instances 1,2,4] [--variants uint8,fp16] [--worker-counts 2,4]
        [--budget-s 500] [--cpu-dry-run]

For each model (generated here: the example `resnet50` and a BERT-base-sized encoder at
sequence length 128):

1. raw ONNX Runtime throughput by batch size, one session, inputs and outputs numpy arrays on
   the host (as the server hands them over): the best batch is the ceiling;
2. for each instance count: a real `python -m batchserve serve --device cuda` process, driven
   by `python -m batchserve bench --binary --sweep` (open loop, several load generator
   processes) to find the highest request rate whose p99 stays under the SLO, while
   `nvidia-smi` samples GPU utilisation; then SIGTERM, and the server must exit 0;
3. ResNet-50 only, at the best instance count: the input variants (images sent as UINT8 with
   FP32 weights, FP16 with FP16 weights: `serve --input-format` / `--fp16`), each against raw
   ONNX Runtime on the same graph (same input type and precision); then the best variant with
   `--workers` 2 and 4 (processes sharing the GPU), with each process's GPU memory.

Every step is skipped (with a note) when its estimated cost would overrun `--budget-s`.
First a one-second smoke test: on `--device cuda`, a session that does not really run on CUDA
stops the check at once, with the reason in the report. Writes `DIR/gpu_check.json` and
`DIR/gpu_check.md` after every step (atomically), and prints the markdown at the end. SIGTERM
(a timeout) stops it: servers and load generators are killed, partial results stay written.

`--cpu-dry-run` runs the same code on `--device cpu` with tiny durations, small batch lists,
a small BERT and a looser SLO, so the whole path can be proven on a machine without a GPU.
"""

# ruff: noqa: RUF001  -- the report prints the multiplication sign on purpose
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import IO, Any

import numpy as np

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run as a file from anywhere: batchserve comes from this tree
    sys.path.insert(0, str(REPO))

from batchserve.examples import BertConfig, build_bert, write_example  # noqa: E402

# Server output lines worth keeping whatever follows them (ORT's own prints included).
WARNING_LINE = re.compile(r"warn|error|fail|fall(ing)? back", re.IGNORECASE)
# ... except the FP16 converter's line per weight too small for FP16 (thousands with --fp16),
# which would crowd out the lines that matter.
CONVERTER_NOISE = re.compile(
    r"onnxconverter_common/float16\.py:\d+: UserWarning|^\s*warnings\.warn\("
)
SWEEP_FACTOR = 2.0  # `batchserve bench --sweep` steps the rate by this factor
BERT_SMALL = BertConfig(layers=2, hidden=128, heads=2, ffn=512, vocab=30522, seq=128)
# torchvision's ImageNet normalisation in pixel units (0..255), as `serve --input-format` takes it.
IMAGENET_PIXELS = "mean=123.675/116.28/103.53:std=58.395/57.12/57.375"
IMAGE_MODELS = ("resnet50",)  # the models the input variants apply to (input `input`, NCHW)


@dataclass(frozen=True, slots=True)
class Variant:
    """How clients send an image model's input, and the precision of its weights."""

    name: str
    datatype: str  # what clients send: UINT8 (normalised by the graph) or FP16 (as it is)
    fp16: bool  # weights converted to FP16 (`serve --fp16`)

    @property
    def input_format(self) -> str:
        if self.datatype == "UINT8":
            return f"input=UINT8:{IMAGENET_PIXELS}"
        return f"input={self.datatype}"

    def serve_args(self) -> list[str]:
        return [*(["--fp16"] if self.fp16 else []), "--input-format", self.input_format]

    def bytes_per_row(self, elements: int) -> int:
        return elements * (1 if self.datatype == "UINT8" else 2)


VARIANTS = {
    "uint8": Variant("uint8", "UINT8", fp16=False),
    "fp16": Variant("fp16", "FP16", fp16=True),
    "uint8-fp16": Variant("uint8-fp16", "UINT8", fp16=True),
}


# ---------------------------------------------------------------------------- settings


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything that differs between the GPU run and the CPU dry run."""

    device: str
    batches: dict[str, tuple[int, ...]]
    raw_seconds: float
    bench_duration_s: float
    bench_warmup_s: float
    bisect_steps: int
    processes: int
    slo_p99_ms: float
    bert: BertConfig
    # The sweep starts at start_fraction x the raw ceiling and may go up to max_fraction x it:
    # with factor 2 that is 0.6 and 1.2 (several sessions may pass one session's ceiling),
    # then bisection (0.9, then 0.75 or 1.05): four runs, finest where the 80% target lies.
    start_fraction: float = 0.6
    max_fraction: float = 1.25
    request_timeout_s: float = 2.0  # far past the SLO: a slower answer already failed it
    # Per bench run on top of warm-up and duration: `bench` gives its spawned load generators
    # 2 s to import, then collects; measured 2.2 s.
    run_overhead_s: float = 2.5
    server_start_s: float = 10.0  # estimate before a configuration of the model was measured
    build_s: dict[str, float] = field(default_factory=lambda: {"resnet50": 8.0, "bert-base": 15.0})
    # A variant's graph made here for its raw ceiling (the FP16 conversion of ResNet-50 takes a
    # few seconds), on top of its raw measurement at one batch size.
    variant_prepare_s: float = 8.0

    def __post_init__(self) -> None:
        if self.start_fraction <= 0 or self.max_fraction < self.start_fraction:
            raise ValueError("need 0 < start_fraction <= max_fraction")
        if self.bench_duration_s <= 0 or self.raw_seconds <= 0 or self.processes < 1:
            raise ValueError("durations must be > 0 and processes >= 1")


def gpu_settings() -> Settings:
    return Settings(
        device="cuda",
        batches={"resnet50": (1, 8, 32, 64, 128), "bert-base": (1, 8, 32, 64)},
        raw_seconds=2.0,
        bench_duration_s=3.0,
        bench_warmup_s=1.0,
        bisect_steps=2,
        # A Python load generator process tops out around 7k small requests/s; the machine
        # has 16 cores, and the server needs some.
        processes=6,
        slo_p99_ms=100.0,
        bert=BertConfig(),
    )


def dry_run_settings() -> Settings:
    return Settings(
        device="cpu",
        batches={"resnet50": (1, 4), "bert-base": (1, 8)},
        raw_seconds=0.5,
        bench_duration_s=1.0,
        bench_warmup_s=0.5,
        bisect_steps=1,
        processes=2,
        # One ResNet-50 image alone takes ~60 ms on 2 cores: a 100 ms SLO would leave the
        # "best rate" branch unexercised.
        slo_p99_ms=1000.0,
        bert=BERT_SMALL,
        server_start_s=5.0,
    )


# ------------------------------------------------------------------------ pure helpers


def sweep_rates(raw_best: float, settings: Settings) -> tuple[float, float]:
    """(start, max) request rates for one-row requests, from the raw ceiling."""
    start = max(1.0, raw_best * settings.start_fraction)
    return start, max(start, raw_best * settings.max_fraction)


def max_sweep_runs(start: float, max_rate: float, bisect_steps: int) -> int:
    """Most bench runs one sweep can take: every step up to max_rate, then the bisection."""
    steps = math.floor(math.log(max_rate / start, SWEEP_FACTOR) + 1e-9) + 1
    return steps + bisect_steps


def serve_estimate_s(settings: Settings, runs: int, server_start_s: float) -> float:
    per_run = settings.bench_warmup_s + settings.bench_duration_s + settings.run_overhead_s
    return server_start_s + runs * per_run + 5.0  # + drain and exit


def next_serve_estimate_s(settings: Settings, runs: int, last_seconds: float | None) -> float:
    """The plan until a configuration of the model has run, then what the last one took
    (plus 15%: more instances take longer to start)."""
    if last_seconds is None:
        return serve_estimate_s(settings, runs, settings.server_start_s)
    return last_seconds * 1.15


def raw_estimate_s(settings: Settings, batches: int) -> float:
    return 5.0 + batches * (settings.raw_seconds + 0.5)  # session build, warm-up per batch


def plan_s(
    settings: Settings,
    models: Sequence[str],
    instances: Sequence[int],
    variants: Sequence[str] = (),
    worker_counts: Sequence[int] = (),
) -> float:
    """The whole run as estimated before anything was measured (the raw ceiling sets the
    sweep's range, and only the ratio of its ends counts, so a ceiling of 1 stands in)."""
    start, max_rate = sweep_rates(1e6, settings)
    runs = max_sweep_runs(start, max_rate, settings.bisect_steps)
    serve_s = serve_estimate_s(settings, runs, settings.server_start_s)
    per_model = [
        settings.build_s.get(name, 15.0)
        + raw_estimate_s(settings, len(settings.batches[name]))
        + len(instances) * serve_s
        + (variants_estimate_s(settings, len(variants), serve_s) if name in IMAGE_MODELS else 0)
        + (len(worker_counts) * serve_s if name in IMAGE_MODELS and variants else 0)
        for name in models
    ]
    return sum(per_model)


def variants_estimate_s(settings: Settings, count: int, serve_s: float) -> float:
    return count * (settings.variant_prepare_s + raw_estimate_s(settings, 1) + serve_s)


def fits(elapsed_s: float, estimate_s: float, budget_s: float) -> bool:
    return elapsed_s + estimate_s <= budget_s


def parse_smi_csv(text: str) -> list[tuple[float, float]]:
    """(utilisation %, memory MiB) per sample of `nvidia-smi --query-gpu=utilization.gpu,
    memory.used --format=csv` (header and units allowed; unreadable lines skipped)."""
    samples = []
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 2:
            continue
        try:
            util, memory = (float(p.split()[0]) for p in parts)
        except (ValueError, IndexError):
            continue  # the header, "[N/A]", a line cut off when the sampler stopped
        samples.append((util, memory))
    return samples


def gpu_utilisation(samples: Sequence[tuple[float, float]]) -> dict[str, float] | None:
    if not samples:
        return None
    util = [s[0] for s in samples]
    return {
        "samples": len(samples),
        "util_mean": float(np.mean(util)),
        "util_max": max(util),
        "memory_max_mib": max(s[1] for s in samples),
    }


def parse_apps_csv(text: str) -> dict[int, float]:
    """{pid: MiB} from `nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,
    nounits` (unreadable lines skipped)."""
    apps = {}
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        try:
            apps[int(parts[0])] = float(parts[1].split()[0])
        except (ValueError, IndexError):
            continue  # "[N/A]" (no permission to see it), a header
    return apps


def best_batch(rows_per_s: dict[int, float]) -> tuple[int, float]:
    batch = max(rows_per_s, key=lambda b: rows_per_s[b])
    return batch, rows_per_s[batch]


def serve_row(entry: dict[str, Any], raw_best: float | None) -> dict[str, Any]:
    """The figures one instance count contributes to the table, from `bench --json`."""
    best = (entry.get("bench") or {}).get("best")
    row: dict[str, Any] = {"instances": entry["instances"], "held": best is not None}
    if best:
        lat = best["latency_ms"]
        row.update(
            rate=best["target_rate"],
            achieved=best["achieved_rps"],
            p50=lat["p50"],
            p95=lat["p95"],
            p99=lat["p99"],
            mean_batch=(best.get("server") or {}).get("mean_batch_rows"),
            ratio=best["achieved_rps"] / raw_best if raw_best else None,
        )
    row["gpu"] = entry.get("gpu")
    row["exit"] = entry.get("exit")
    return row


def _num(value: float | None, spec: str = ",.0f") -> str:
    return "n/a" if value is None else format(value, spec)


def model_markdown(name: str, model: dict[str, Any], slo_p99_ms: float) -> list[str]:
    lines = [f"## {name}", ""]
    raw = {int(b): v for b, v in (model.get("raw_rows_per_s") or {}).items()}
    if raw:
        batch, ceiling = best_batch(raw)
        lines += ["| batch | raw ORT rows/s |", "|---:|---:|"]
        lines += [f"| {b} | {v:,.0f} |" for b, v in sorted(raw.items())]
        lines += ["", f"Ceiling: **{ceiling:,.0f} rows/s** at batch {batch}.", ""]
    rows = [serve_row(e, model.get("raw_best")) for e in model.get("serve", [])]
    if rows:
        lines += [
            f"batchserve over HTTP, binary tensors, one row per request, open loop, "
            f"highest rate with p99 < {slo_p99_ms:g} ms:",
            "",
            "| instances | best rate | achieved req/s | p50 ms | p95 ms | p99 ms | ÷ raw best "
            "| mean batch | GPU util mean / max % | GPU mem max MiB | exit |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            gpu = r["gpu"] or {}
            util = (
                f"{gpu['util_mean']:.0f} / {gpu['util_max']:.0f}" if gpu else "n/a"
            )  # no nvidia-smi (dry run)
            if not r["held"]:
                lines.append(
                    f"| {r['instances']} | none held | | | | | | | {util} | "
                    f"{_num(gpu.get('memory_max_mib'))} | {r['exit']} |"
                )
                continue
            lines.append(
                f"| {r['instances']} | {r['rate']:,.0f} | {r['achieved']:,.0f} | {r['p50']:.2f} "
                f"| {r['p95']:.2f} | {r['p99']:.2f} | {_num(r['ratio'], '.2f')}× "
                f"| {_num(r['mean_batch'], '.1f')} | {util} | "
                f"{_num(gpu.get('memory_max_mib'))} | {r['exit']} |"
            )
        lines.append("")
    lines += variant_markdown(model, slo_p99_ms)
    lines += workers_markdown(model)
    lines += [f"- {note}" for note in model.get("notes", [])]
    return lines


IMAGE_ELEMENTS = 3 * 224 * 224
BYTES = {"FP32": 4, "FP16": 2, "UINT8": 1}


def _util(gpu: dict[str, Any]) -> str:
    return f"{gpu['util_mean']:.0f} / {gpu['util_max']:.0f}" if gpu else "n/a"


def _per_process(entry: dict[str, Any]) -> str:
    memory = entry.get("gpu_memory") or {}
    mib = memory.get("processes_mib") or memory.get("all_mib")
    return " / ".join(f"{m:,.0f}" for m in mib) if mib else "n/a"


def _served(row: dict[str, Any]) -> str:
    """best rate | achieved | p50 | p99 | ÷ raw, or 'none held'."""
    if not row["held"]:
        return "none held | | | |"
    return (
        f"{row['rate']:,.0f} | {row['achieved']:,.0f} | {row['p50']:.2f} | {row['p99']:.2f} "
        f"| {_num(row['ratio'], '.2f')}×"
    )


def variant_markdown(model: dict[str, Any], slo_p99_ms: float) -> list[str]:
    records = model.get("variants") or {}
    if not records:
        return []
    lines = [
        f"Input variants, one image per request, p99 < {slo_p99_ms:g} ms; ÷ raw is against raw "
        "ORT on the same graph (same input type and weights) at the same batch:",
        "",
        "| input | weights | KB per image | instances | raw ORT rows/s | best rate "
        "| achieved req/s | p50 ms | p99 ms | ÷ raw | GPU util mean / max % "
        "| GPU MiB per process | exit |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    fp32 = [(e, serve_row(e, model.get("raw_best"))) for e in model.get("serve", [])]
    held = [pair for pair in fp32 if pair[1]["held"]]
    if held:
        entry, row = max(held, key=lambda pair: pair[1]["achieved"])
        lines.append(_variant_line("FP32", False, model["raw_best"], entry, row))
    for record in records.values():
        for entry in record["serve"]:
            row = serve_row(entry, record["raw_best"])
            lines.append(
                _variant_line(record["datatype"], record["fp16"], record["raw_best"], entry, row)
            )
    return [*lines, ""]


def _variant_line(
    datatype: str, fp16: bool, raw: float, entry: dict[str, Any], row: dict[str, Any]
) -> str:
    size = IMAGE_ELEMENTS * BYTES[datatype] / 1000
    return (
        f"| {datatype} | {'FP16' if fp16 else 'FP32'} | {size:,.0f} | {row['instances']} "
        f"| {raw:,.0f} | {_served(row)} | {_util(row['gpu'] or {})} | {_per_process(entry)} "
        f"| {row['exit']} |"
    )


def workers_markdown(model: dict[str, Any]) -> list[str]:
    entries = model.get("workers") or []
    if not entries:
        return []
    name = entries[0].get("variant")
    record = model["variants"][name]
    lines = [
        f"Worker processes sharing the GPU (`--workers`), input variant {name}, "
        f"{entries[0]['instances']} instance(s) each:",
        "",
        "| workers | best rate | achieved req/s | p50 ms | p99 ms | ÷ raw | GPU util mean / max % "
        "| GPU mem max MiB | GPU MiB per process | exit |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for entry in [*record["serve"][:1], *entries]:
        row = serve_row(entry, record["raw_best"])
        gpu = row["gpu"] or {}
        lines.append(
            f"| {entry.get('workers', 1)} | {_served(row)} | {_util(gpu)} "
            f"| {_num(gpu.get('memory_max_mib'))} | {_per_process(entry)} | {row['exit']} |"
        )
    return [*lines, ""]


def all_rows(model: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(label, row) of every ResNet-50 configuration measured, each row's ratio against the
    raw ceiling of its own graph."""
    found = [
        (f"{e['instances']} instance(s)", serve_row(e, model.get("raw_best")))
        for e in model.get("serve", [])
    ]
    records = model.get("variants") or {}
    for name, record in records.items():
        for entry in record["serve"]:
            label = f"{entry['instances']} instance(s), {name}"
            found.append((label, serve_row(entry, record["raw_best"])))
    for entry in model.get("workers") or []:
        label = f"{entry['workers']} workers x {entry['instances']} instance(s), {entry['variant']}"
        found.append((label, serve_row(entry, records[entry["variant"]]["raw_best"])))
    return found


def targets(summary: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """The GPU issue's ResNet-50 targets against the best configuration measured (instance
    counts, input variants, workers), its ratio against raw ORT on its own graph."""
    model = summary.get("models", {}).get("resnet50")
    if not model or summary.get("device") != "cuda":
        return []
    held = [(label, row) for label, row in all_rows(model) if row["held"]]
    if not held:
        return [("ResNet-50: any rate under the SLO", "none", False)]
    label, top = max(held, key=lambda pair: pair[1]["achieved"])
    ratio = top["ratio"] or 0.0
    achieved = f"{top['achieved']:,.0f}"
    return [
        (
            "ResNet-50 over HTTP ≥ 80% of raw ORT best batch, same input and precision",
            f"{ratio:.2f}× ({label})",
            ratio >= 0.8,
        ),
        ("ResNet-50 > 5,000 images/s at p99 < 100 ms", achieved, top["achieved"] > 5000),
        ("≥ 1,000 req/s at p99 < 100 ms, one replica", achieved, top["achieved"] >= 1000),
    ]


def markdown(summary: dict[str, Any]) -> str:
    lines = [
        "# GPU check",
        "",
        f"- GPU: {summary.get('gpu') or 'none (nvidia-smi absent)'}",
        f"- onnxruntime {summary['onnxruntime']}, providers {', '.join(summary['providers'])}",
        f"- device `{summary['device']}`, load generator processes {summary['processes']}, "
        f"{summary['bench_duration_s']:g} s per rate after {summary['bench_warmup_s']:g} s "
        f"warm-up, SLO p99 < {summary['slo_p99_ms']:g} ms",
        f"- took {summary.get('elapsed_s', 0):.0f} s of a {summary['budget_s']:g} s budget"
        + (" (CPU dry run)" if summary.get("dry_run") else ""),
        "",
    ]
    for name, model in summary.get("models", {}).items():
        lines += model_markdown(name, model, summary["slo_p99_ms"])
        if lines[-1]:
            lines.append("")
    checks = targets(summary)
    if checks:
        lines += ["## Targets", "", "| target | measured | met |", "|---|---:|:---:|"]
        lines += [f"| {t} | {m} | {'yes' if ok else 'no'} |" for t, m, ok in checks]
        lines.append("")
    lines += [f"- {note}" for note in summary.get("notes", [])]
    return "\n".join(lines).rstrip() + "\n"


# --------------------------------------------------------------------------- the machine


def gpu_name() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader", "-i", "0"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def gpu_process_memory(group: int) -> dict[str, Any] | None:
    """GPU memory of each process in process group `group` (a server and its workers), and of
    every compute process, as nvidia-smi reports them now; None without nvidia-smi. In a
    container that hides other PID namespaces the group's list can be empty: `all_mib` stays."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    apps = parse_apps_csv(out.stdout)
    mine = [mib for pid, mib in sorted(apps.items()) if _group_of(pid) == group]
    return {"processes_mib": mine, "all_mib": sorted(apps.values())}


def _group_of(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None  # gone, or in another PID namespace


class GpuSampler:
    """`nvidia-smi --loop-ms` in the background for the length of a `with` block (none if
    absent)."""

    def __init__(self, path: Path, interval_ms: int = 500) -> None:
        self.path = path
        self.interval_ms = interval_ms
        self._process: subprocess.Popen[bytes] | None = None
        self._file: IO[bytes] | None = None

    def __enter__(self) -> GpuSampler:
        self._file = self.path.open("wb")
        query = "--query-gpu=utilization.gpu,memory.used"
        try:
            self._process = subprocess.Popen(
                ["nvidia-smi", query, "--format=csv", "-i", "0", f"--loop-ms={self.interval_ms}"],
                stdout=self._file,
                stderr=subprocess.DEVNULL,
            )
        except OSError:
            self._process = None
        return self

    def __exit__(self, *exc: object) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        if self._file is not None:
            self._file.close()

    def summary(self) -> dict[str, float] | None:
        return gpu_utilisation(parse_smi_csv(self.path.read_text(errors="replace")))


def child_env() -> dict[str, str]:
    """Children import batchserve from this tree, next to whatever PYTHONPATH already holds."""
    env = dict(os.environ)
    paths = [str(REPO), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


# ------------------------------------------------------------------------------ models


@dataclass(frozen=True, slots=True)
class Model:
    name: str
    path: Path
    feeds: Callable[[int, np.random.Generator], dict[str, np.ndarray]]
    bench_input: Path | None  # None: `bench` draws random inputs from the metadata
    # What raw ONNX Runtime runs when it is not the served file: the graph the server makes
    # from it (an input variant), so both sides compute the same thing.
    raw_path: Path | None = None


def variant_model(model: Model, variant: Variant, tmp: Path) -> Model:
    """`model` as the server serves it with the variant's flags, made by the same code
    (`batchserve.runtime`): the served file stays the original."""
    from batchserve.runtime.fp16 import convert_fp16
    from batchserve.runtime.input_prefix import add_prefixes, parse_input_format

    data = model.path.read_bytes()
    if variant.fp16:
        with warnings.catch_warnings():
            # One line per weight too small for FP16 (thousands for ResNet-50): not news here.
            warnings.filterwarnings("ignore", category=UserWarning, module="onnxconverter_common")
            data = convert_fp16(data, model.name)
    data = add_prefixes(data, (parse_input_format(variant.input_format),), model.name)
    raw_path = tmp / f"{model.name}-{variant.name}.onnx"
    raw_path.write_bytes(data)

    def images(rows: int, rng: np.random.Generator) -> dict[str, Any]:
        if variant.datatype == "UINT8":
            return {"input": rng.integers(0, 256, (rows, 3, 224, 224), dtype=np.uint8)}
        return {
            "input": rng.standard_normal((rows, 3, 224, 224), dtype=np.float32).astype(np.float16)
        }

    return Model(model.name, model.path, images, None, raw_path)


def build_model(name: str, settings: Settings, tmp: Path) -> Model:
    path = tmp / f"{name}.onnx"
    if name == "resnet50":
        write_example(name, path)

        def images(rows: int, rng: np.random.Generator) -> dict[str, Any]:
            return {"input": rng.standard_normal((rows, 3, 224, 224), dtype=np.float32)}

        return Model(name, path, images, None)
    if name != "bert-base":
        raise ValueError(f"unknown model {name!r}: choose resnet50 or bert-base")
    path.write_bytes(build_bert(settings.bert, name=name))
    bert = settings.bert

    def tokens(rows: int, rng: np.random.Generator) -> dict[str, Any]:
        ids = rng.integers(1000, bert.vocab, (rows, bert.seq), dtype=np.int64)
        ids[:, 0] = 101  # [CLS]
        return {"input_ids": ids, "attention_mask": np.ones_like(ids)}

    # `bench` would send all-zero ids and masks for INT64 inputs: send a plausible sentence.
    sample = tmp / "bert-input.npz"
    np.savez(sample, **tokens(1, np.random.default_rng(0)))
    return Model(name, path, tokens, sample)


class CheckStopped(RuntimeError):
    """A failure that makes every later step pointless (e.g. ONNX Runtime is not on CUDA)."""


def ort_providers(device: str) -> list[Any]:
    if device == "cpu":
        return ["CPUExecutionProvider"]
    cuda = {"device_id": "0", "cudnn_conv_algo_search": "HEURISTIC"}  # as the server sets it
    return [("CUDAExecutionProvider", cuda), "CPUExecutionProvider"]


def require_device(providers: Sequence[str], device: str, what: str) -> None:
    """CheckStopped unless a CUDA session really runs on CUDA: ORT only warns and gives CPU
    when the CUDA provider's libraries do not load, and CPU figures are no CUDA ceiling."""
    if device == "cuda" and list(providers[:1]) != ["CUDAExecutionProvider"]:
        raise CheckStopped(
            f"{what}: ONNX Runtime runs on {list(providers)}, not CUDA (its warning on stderr "
            "says which library failed to load): stopped, nothing later can measure CUDA"
        )


def ort_session(path: Path, device: str, what: str) -> Any:
    import onnxruntime as ort

    try:
        # No silent retry on fewer providers: a failure must show, with its reason.
        session = ort.InferenceSession(
            str(path), providers=ort_providers(device), enable_fallback=0
        )
    except Exception as err:  # ORT's own untyped errors
        lines = [line for line in str(err).splitlines() if line.strip()][:3]
        reason = " | ".join(lines)
        raise CheckStopped(f"{what}: no ONNX Runtime session on {device}: {reason}") from err
    require_device(session.get_providers(), device, what)
    return session


def smoke_test(device: str, tmp: Path) -> dict[str, Any]:
    """A small model on the device, one run: seconds, and the providers it really got."""
    started = time.monotonic()
    path = write_example("mlp", tmp / "smoke-mlp.onnx")
    session = ort_session(path, device, "smoke test")
    (spec,) = session.get_inputs()
    rows = np.zeros((1, *spec.shape[1:]), dtype=np.float32)
    session.run(None, {spec.name: rows})
    return {"providers": session.get_providers(), "seconds": time.monotonic() - started}


def raw_throughput(
    model: Model, settings: Settings, batches: Sequence[int] | None = None
) -> dict[int, float]:
    """Rows/s per batch size: one session, numpy inputs and outputs on the host."""
    path = model.raw_path or model.path
    session = ort_session(path, settings.device, f"{path.stem} raw ONNX Runtime")
    rng = np.random.default_rng(0)
    result = {}
    for batch in batches or settings.batches[model.name]:
        feeds = model.feeds(batch, rng)
        for _ in range(3):  # first runs per shape plan memory and pick kernels
            session.run(None, feeds)
        runs, started = 0, time.perf_counter()
        while runs < 2 or time.perf_counter() - started < settings.raw_seconds:
            session.run(None, feeds)
            runs += 1
        result[batch] = runs * batch / (time.perf_counter() - started)
        print(f"    raw batch {batch}: {result[batch]:,.0f} rows/s", flush=True)
    return result


# ------------------------------------------------------------------------------ serving


class Server:
    """A `python -m batchserve serve` process; its log is drained by a thread so the pipe
    never fills, and the last lines are kept for the report."""

    def __init__(self, command: list[str]) -> None:
        self.command = command
        self.url: str | None = None
        self.banner = ""
        self.log: collections.deque[str] = collections.deque(maxlen=60)
        # Kept apart: start-up warnings (TensorRT missing, CUDA libraries) scroll out of `log`.
        self.warnings: list[str] = []
        self._listening = threading.Event()
        # stdout too: ORT prints some of its errors there. A session of its own, so its
        # process group (workers included) can be killed as one.
        self.process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=child_env(),
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.log.append(line.rstrip())
            keep = WARNING_LINE.search(line) and not CONVERTER_NOISE.search(line)
            if keep and len(self.warnings) < 20:
                self.warnings.append(line.rstrip()[:1000])
            found = re.search(r"listening on (http://\S+)", line)
            if found and self.url is None:
                self.url = found.group(1)
                self.banner = line.strip()  # says how many workers serve
                self._listening.set()
        self._listening.set()  # exited: wake the waiter

    def wait_listening(self, timeout_s: float) -> str:
        self._listening.wait(timeout_s)
        if self.url is None:
            raise RuntimeError("the server did not start:\n" + "\n".join(list(self.log)[-15:]))
        return self.url

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM (drain, exit 0 expected); killed if it outlives `timeout_s`."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            kill_group(self.process)
            code = self.process.wait()
            self.log.append(f"killed after {timeout_s:g} s without exiting")
        self._reader.join(timeout=5)
        return code


def served_inputs(url: str, name: str) -> list[str] | None:
    """`NAME DATATYPE` of each input the server reports: proves what clients sent."""
    try:
        with urllib.request.urlopen(f"{url}/v2/models/{name}", timeout=10) as response:
            metadata = json.loads(response.read())
    except (OSError, ValueError):
        return None
    return [f"{spec['name']} {spec['datatype']}" for spec in metadata.get("inputs", [])]


def kill_group(process: subprocess.Popen[Any]) -> None:
    """SIGKILL a child started with start_new_session, and whatever it started."""
    with contextlib.suppress(ProcessLookupError, PermissionError):  # the group is gone already
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@contextmanager
def serving(command: list[str]) -> Iterator[Server]:
    server = Server(command)
    try:
        yield server
    finally:
        kill_group(server.process)  # also after a clean exit: no worker may outlive it


def run_group(command: list[str], timeout_s: float) -> tuple[int | None, str, str]:
    """(exit code, stdout, stderr) of a child in its own process group, which is killed on a
    timeout (exit code None) or when this process is being stopped."""
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(),
        start_new_session=True,
    )
    try:
        out, err = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        kill_group(process)
        out, err = process.communicate()
        return None, out, err
    except BaseException:
        kill_group(process)
        raise
    return process.returncode, out, err


def serve_command(
    model: Model,
    instances: int,
    batch: int,
    args: argparse.Namespace,
    extra: Sequence[str] = (),
    workers: int | None = None,
) -> list[str]:
    # gRPC off: the load goes over HTTP, and workers would otherwise share port 8001 too.
    return [
        sys.executable, "-m", "batchserve", "serve", str(model.path),
        "--name", model.name,
        "--device", args.settings.device,
        "--instances", str(instances),
        "--max-batch-size", str(batch),
        "--workers", str(workers or args.workers),
        "--host", "127.0.0.1", "--port", "0", "--grpc-port", "off",
        *extra,
        *shlex.split(args.serve_args),
    ]  # fmt: skip


def bench_command(
    url: str, model: Model, rates: tuple[float, float], settings: Settings, json_path: Path
) -> list[str]:
    command = [
        sys.executable, "-m", "batchserve", "bench", url, "-m", model.name,
        "--binary", "--sweep",
        "--slo-p99-ms", f"{settings.slo_p99_ms:g}",
        "--start-rate", f"{rates[0]:.0f}", "--max-rate", f"{rates[1]:.0f}",
        "--duration", f"{settings.bench_duration_s:g}",
        "--warmup", f"{settings.bench_warmup_s:g}",
        "--bisect-steps", str(settings.bisect_steps),
        "--processes", str(settings.processes),
        "--timeout", f"{settings.request_timeout_s:g}",
        "--json", str(json_path),
    ]  # fmt: skip
    if model.bench_input is not None:
        command += ["--input", str(model.bench_input)]
    return command


def serve_once(
    model: Model,
    instances: int,
    batch: int,
    rates: tuple[float, float],
    args: argparse.Namespace,
    deadline: float,
    tmp: Path,
    variant: Variant | None = None,
    workers: int | None = None,
) -> dict[str, Any]:
    """One configuration: start, sweep under the GPU sampler, each process's GPU memory,
    SIGTERM, exit code."""
    workers = workers or args.workers
    entry: dict[str, Any] = {"instances": instances, "max_batch_size": batch, "workers": workers}
    extra: list[str] = []
    if variant is not None:
        entry.update(variant=variant.name, datatype=variant.datatype, fp16=variant.fp16)
        extra = variant.serve_args()
    label = f"{model.name}-{variant.name if variant else 'fp32'}-{instances}-{workers}"
    started = time.monotonic()
    with serving(serve_command(model, instances, batch, args, extra, workers)) as server:
        url = server.wait_listening(timeout_s=max(10.0, min(240.0, deadline - time.monotonic())))
        entry["start_s"] = time.monotonic() - started
        entry["listening"] = server.banner
        entry["inputs"] = served_inputs(url, model.name)
        json_path = tmp / f"bench-{label}.json"
        command = bench_command(url, model, rates, args.settings, json_path)
        with GpuSampler(tmp / f"smi-{label}.csv") as sampler:
            code, out, err = run_group(command, max(10.0, deadline - time.monotonic()))
            entry["bench_exit"] = code
            if code is None:
                entry["bench_error"] = "bench overran the hard deadline and was stopped"
            elif code != 0:
                entry["bench_error"] = (err or out)[-1500:]
            # Before SIGTERM: the sessions (and their arenas) are still held.
            entry["gpu_memory"] = gpu_process_memory(server.process.pid)
        entry["gpu"] = sampler.summary()
        entry["bench"] = json.loads(json_path.read_text()) if json_path.exists() else None
        entry["exit"] = server.stop()
        entry["server_log_tail"] = list(server.log)[-8:]
        entry["server_warnings"] = server.warnings
    entry["seconds"] = time.monotonic() - started
    return entry


# ------------------------------------------------------------------------------- driver


@dataclass(slots=True)
class Run:
    """The summary under construction, and the clock the budget is kept against."""

    args: argparse.Namespace
    summary: dict[str, Any]
    started: float = field(default_factory=time.monotonic)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def log(self, message: str) -> None:
        print(f"[{self.elapsed:6.1f} s] {message}", flush=True)

    def fits(self, estimate_s: float) -> bool:
        return fits(self.elapsed, estimate_s, self.args.budget_s)

    @property
    def hard_deadline(self) -> float:
        budget: float = self.args.budget_s + self.args.grace_s
        return self.started + budget

    def save(self) -> str:
        """Write the report as it stands; a run stopped at any point leaves its results."""
        self.summary["elapsed_s"] = self.elapsed
        out = Path(self.args.out)
        text = markdown(self.summary)
        write_atomically(out / "gpu_check.json", json.dumps(self.summary, indent=1))
        write_atomically(out / "gpu_check.md", text)
        return text


def write_atomically(path: Path, text: str) -> None:
    temp = path.with_name(path.name + ".tmp")
    temp.write_text(text)
    os.replace(temp, path)  # a reader (or a kill) never sees half a file


def check_model(run: Run, model: Model, tmp: Path) -> None:
    settings: Settings = run.args.settings
    entry: dict[str, Any] = {"serve": [], "notes": []}
    run.summary["models"][model.name] = entry
    batches = settings.batches[model.name]
    if not run.fits(raw_estimate_s(settings, len(batches))):
        entry["notes"].append(f"skipped: raw ORT would overrun the budget at {run.elapsed:.0f} s")
        return
    run.log(f"{model.name}: raw ONNX Runtime on {settings.device}")
    try:
        raw = raw_throughput(model, settings)
    except CheckStopped as err:
        entry["notes"].append(str(err))
        raise
    batch, ceiling = best_batch(raw)
    entry.update(
        raw_rows_per_s={str(b): v for b, v in raw.items()}, raw_best=ceiling, raw_best_batch=batch
    )
    run.save()
    rates = sweep_rates(ceiling, settings)
    runs = max_sweep_runs(rates[0], rates[1], settings.bisect_steps)
    last_seconds: float | None = None
    for instances in run.args.instances:
        estimate = next_serve_estimate_s(settings, runs, last_seconds)
        if not run.fits(estimate):
            entry["notes"].append(
                f"skipped {instances} instance(s): ~{estimate:.0f} s more would overrun the "
                f"{run.args.budget_s:g} s budget at {run.elapsed:.0f} s"
            )
            continue
        run.log(
            f"{model.name}: serve --instances {instances} --max-batch-size {batch}, sweep "
            f"{rates[0]:,.0f}..{rates[1]:,.0f} req/s"
        )
        try:
            result = serve_once(model, instances, batch, rates, run.args, run.hard_deadline, tmp)
        except RuntimeError as err:
            result = {"instances": instances, "error": str(err), "exit": None}
        entry["serve"].append(result)
        run.save()
        last_seconds = result.get("seconds", last_seconds)
        log_result(run, result, ceiling)
    if model.name not in IMAGE_MODELS or not run.args.variants:
        return
    instances = best_instances(entry["serve"], ceiling) or run.args.instances[0]
    best = check_variants(run, model, tmp, batch, instances, last_seconds)
    if best is not None:
        check_workers(run, model, tmp, batch, instances, best)


def log_result(run: Run, result: dict[str, Any], ceiling: float | None) -> None:
    row = serve_row(result, ceiling)
    rate = f"{row['achieved']:,.0f} req/s, p99 {row['p99']:.1f} ms" if row["held"] else "none"
    run.log(f"  -> best under SLO: {rate}; server exit {result.get('exit')}")


def best_instances(entries: Sequence[dict[str, Any]], ceiling: float | None) -> int | None:
    """The instance count that served the most under the SLO (None: none held)."""
    held = [row for row in (serve_row(e, ceiling) for e in entries) if row["held"]]
    return max(held, key=lambda row: row["achieved"])["instances"] if held else None


def check_variants(
    run: Run, model: Model, tmp: Path, batch: int, instances: int, last_seconds: float | None
) -> str | None:
    """Each input variant at `instances`, against raw ORT on the same graph at `batch`; the
    name of the one that served the most under the SLO."""
    settings: Settings = run.args.settings
    entry = run.summary["models"][model.name]
    records: dict[str, Any] = entry.setdefault("variants", {})
    start, max_rate = sweep_rates(1e6, settings)
    runs = max_sweep_runs(start, max_rate, settings.bisect_steps)
    for name in run.args.variants:
        variant = VARIANTS[name]
        estimate = settings.variant_prepare_s + raw_estimate_s(settings, 1)
        estimate += next_serve_estimate_s(settings, runs, last_seconds)
        if not run.fits(estimate):
            entry["notes"].append(
                f"skipped variant {name}: ~{estimate:.0f} s more would overrun the "
                f"{run.args.budget_s:g} s budget at {run.elapsed:.0f} s"
            )
            continue
        run.log(f"{model.name} {name}: raw ONNX Runtime on the same graph, batch {batch}")
        try:
            served = variant_model(model, variant, tmp)
        except Exception as err:  # the conversion's own errors (e.g. no onnxconverter-common)
            entry["notes"].append(f"variant {name}: cannot build its graph: {err}")
            continue
        try:
            result = measure_variant(run, served, variant, batch, instances, tmp)
        except CheckStopped as err:
            # The smoke test already proved the device: this graph alone failed (an operator
            # without an FP16 kernel, say). Later steps still measure.
            entry["notes"].append(f"variant {name}: {err}")
            continue
        finally:
            if served.raw_path is not None:
                served.raw_path.unlink()
        last_seconds = result.get("seconds", last_seconds)
    achieved = {}
    for name, record in records.items():
        rows = [serve_row(e, record["raw_best"]) for e in record["serve"]]
        if rows and rows[0]["held"]:
            achieved[name] = rows[0]["achieved"]
    return max(achieved, key=lambda n: achieved[n]) if achieved else None


def measure_variant(
    run: Run, served: Model, variant: Variant, batch: int, instances: int, tmp: Path
) -> dict[str, Any]:
    """The variant's raw ceiling at `batch`, then the server with its flags."""
    settings: Settings = run.args.settings
    ceiling = raw_throughput(served, settings, [batch])[batch]
    record: dict[str, Any] = {
        "datatype": variant.datatype,
        "fp16": variant.fp16,
        "raw_rows_per_s": {str(batch): ceiling},
        "raw_best": ceiling,
        "serve": [],
    }
    run.summary["models"][served.name]["variants"][variant.name] = record
    run.save()
    run.log(f"{served.name} {variant.name}: serve --instances {instances} {variant.serve_args()}")
    rates = sweep_rates(ceiling, settings)
    try:
        result = serve_once(
            served, instances, batch, rates, run.args, run.hard_deadline, tmp, variant
        )
    except RuntimeError as err:  # the server did not start: its log says why
        result = {"instances": instances, "variant": variant.name, "error": str(err), "exit": None}
    record["serve"].append(result)
    run.save()
    log_result(run, result, ceiling)
    return result


def check_workers(run: Run, model: Model, tmp: Path, batch: int, instances: int, name: str) -> None:
    """The best variant with several server processes sharing the GPU."""
    settings: Settings = run.args.settings
    entry = run.summary["models"][model.name]
    record = entry["variants"][name]
    results: list[dict[str, Any]] = entry.setdefault("workers", [])
    last_seconds = record["serve"][0].get("seconds")
    start, max_rate = sweep_rates(1e6, settings)
    runs = max_sweep_runs(start, max_rate, settings.bisect_steps)
    for workers in run.args.worker_counts:
        # More processes take longer to start: scale the last estimate by them.
        estimate = next_serve_estimate_s(settings, runs, last_seconds) * (1 + 0.05 * workers)
        if not run.fits(estimate):
            entry["notes"].append(
                f"skipped {workers} workers: ~{estimate:.0f} s more would overrun the "
                f"{run.args.budget_s:g} s budget at {run.elapsed:.0f} s"
            )
            continue
        run.log(f"{model.name} {name}: serve --workers {workers} --instances {instances}")
        rates = sweep_rates(record["raw_best"], settings)
        result = serve_once(
            model, instances, batch, rates, run.args, run.hard_deadline, tmp, VARIANTS[name],
            workers,
        )  # fmt: skip
        results.append(result)
        run.save()
        last_seconds = result.get("seconds", last_seconds)
        log_result(run, result, record["raw_best"])


def describe_ort(summary: dict[str, Any], device: str) -> None:
    import onnxruntime as ort

    if device != "cpu" and hasattr(ort, "preload_dlls"):
        ort.preload_dlls()  # CUDA/cuDNN from pip's nvidia-* packages, as the server does
    summary.update(onnxruntime=ort.__version__, providers=ort.get_available_providers())
    if device != "cpu" and "CUDAExecutionProvider" not in summary["providers"]:
        raise CheckStopped(
            f"onnxruntime {ort.__version__} has no CUDA provider ({summary['providers']}): "
            "install onnxruntime-gpu (benchmarks/gpu/README.md)"
        )


def stop_on_sigterm(signum: int, frame: object) -> None:
    # A second SIGTERM must not cut the cleanup short.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise SystemExit(128 + signum)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="output folder")
    parser.add_argument("--models", default="resnet50,bert-base")
    parser.add_argument("--instances", default=None, help="default 1,2,4 (dry run: 1,2)")
    parser.add_argument(
        "--variants",
        default="uint8,fp16",
        help=f"ResNet-50 input variants after the instance counts, of {', '.join(VARIANTS)} "
        "('' for none)",
    )
    parser.add_argument(
        "--worker-counts",
        default=None,
        help="--workers of the best variant's extra runs: default 2,4 (dry run 2; '' for none)",
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=500.0,
        help="no step starts if its estimate would end past this",
    )
    parser.add_argument(
        "--grace-s",
        type=float,
        default=20.0,
        help="a running step is stopped this long after the budget",
    )
    parser.add_argument(
        "--processes", type=int, default=None, help="load generator processes (6; dry run 2)"
    )
    parser.add_argument("--workers", type=int, default=1, help="server processes (--workers)")
    parser.add_argument("--serve-args", default="", help="extra `batchserve serve` flags")
    parser.add_argument("--cpu-dry-run", action="store_true")
    args = parser.parse_args(argv)
    args.settings = dry_run_settings() if args.cpu_dry_run else gpu_settings()
    if args.processes is not None:
        args.settings = replace(args.settings, processes=args.processes)
    default = "1,2" if args.cpu_dry_run else "1,2,4"
    args.instances = [int(k) for k in (args.instances or default).split(",")]
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}: choose from {', '.join(VARIANTS)}")
    counts = (
        args.worker_counts
        if args.worker_counts is not None
        else ("2" if args.cpu_dry_run else "2,4")
    )
    args.worker_counts = [int(n) for n in counts.split(",") if n.strip()]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    settings: Settings = args.settings
    Path(args.out).mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {
        "gpu": gpu_name(),
        "device": settings.device,
        "dry_run": args.cpu_dry_run,
        "budget_s": args.budget_s,
        "processes": settings.processes,
        "workers": args.workers,
        "variants": args.variants,
        "worker_counts": args.worker_counts,
        "serve_args": args.serve_args,
        "bench_duration_s": settings.bench_duration_s,
        "bench_warmup_s": settings.bench_warmup_s,
        "slo_p99_ms": settings.slo_p99_ms,
        "bert": asdict(settings.bert),
        "onnxruntime": None,
        "providers": [],
        "models": {},
        "notes": [],
    }
    run = Run(args, summary)
    # A timeout's SIGTERM becomes SystemExit: the `finally` blocks kill the children and
    # write what was measured.
    previous = signal.signal(signal.SIGTERM, stop_on_sigterm)
    try:
        return check(run)
    finally:
        signal.signal(signal.SIGTERM, previous)


def check(run: Run) -> int:
    args, summary = run.args, run.summary
    settings: Settings = args.settings
    stopped = False
    try:
        describe_ort(summary, settings.device)
        summary["planned_s"] = plan_s(
            settings, args.models, args.instances, args.variants, args.worker_counts
        )
        run.log(f"plan: ~{summary['planned_s']:.0f} s estimated, budget {args.budget_s:g} s")
        ort_line = f"onnxruntime {summary['onnxruntime']} {summary['providers']}"
        run.log(f"GPU {summary['gpu']}; {ort_line}")
        with tempfile.TemporaryDirectory(prefix="gpu-check-") as name:
            tmp = Path(name)
            summary["smoke"] = smoke_test(settings.device, tmp)
            run.log(f"smoke test: {summary['smoke']}")
            run.save()
            check_models(run, tmp)
    except CheckStopped as err:
        stopped = True
        summary["notes"].append(f"stopped at {run.elapsed:.0f} s: {err}")
    except SystemExit as err:
        summary["notes"].append(f"stopped by a signal at {run.elapsed:.0f} s: partial results")
        raise SystemExit(err.code) from None
    finally:
        text = run.save()
        print("\n" + text, flush=True)
    exits = [e.get("exit") for m in summary["models"].values() for e in m["serve"]]
    return 0 if not stopped and all(code == 0 for code in exits) else 1


def check_models(run: Run, tmp: Path) -> None:
    summary, settings = run.summary, run.args.settings
    for model_name in run.args.models:
        build_s = settings.build_s.get(model_name, 15.0)
        raw_s = raw_estimate_s(settings, len(settings.batches[model_name]))
        if not run.fits(build_s + raw_s):
            summary["notes"].append(
                f"skipped {model_name}: building and measuring it would overrun the "
                f"budget at {run.elapsed:.0f} s"
            )
            continue
        model = build_model(model_name, settings, tmp)
        run.log(f"built {model.name} ({model.path.stat().st_size / 1e6:.0f} MB)")
        try:
            check_model(run, model, tmp)
        finally:
            model.path.unlink()  # BERT-base is 438 MB: don't keep it past its turn


if __name__ == "__main__":
    sys.exit(main())
