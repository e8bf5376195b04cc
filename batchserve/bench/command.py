"""`batchserve bench`: metadata → workload → load (or a sweep) → report; the CLI parses the
flags."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from batchserve.bench.errors import BenchError
from batchserve.bench.loadgen import LoadConfig
from batchserve.bench.measure import (
    Target,
    at_rate,
    check_url,
    choose_protocol,
    curve_table,
    measure,
    request_headers,
    sweep,
)
from batchserve.bench.report import Report
from batchserve.bench.workload import Workload, build_workload


def _config(args: argparse.Namespace, **load: Any) -> LoadConfig:
    return LoadConfig(
        duration_s=args.duration,
        warmup_s=args.warmup,
        arrivals=args.arrivals,
        max_outstanding=args.max_outstanding,
        timeout_s=args.timeout,
        processes=args.processes,
        **load,
    )


def request_parameters(pairs: Sequence[str]) -> dict[str, Any]:
    """`--parameter KEY=VALUE` as V2 parameters: VALUE read as JSON (`1`, `true`, `"x"`), or
    as text when it is not JSON."""
    parameters: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise BenchError(f"--parameter {pair!r}: expected KEY=VALUE")
        try:
            value = orjson.loads(text)
        except orjson.JSONDecodeError:
            value = text
        if not isinstance(value, bool | int | float | str):
            raise BenchError(f"--parameter {pair!r}: a number, true/false or text")
        parameters[key] = value
    return parameters


def run_bench(args: argparse.Namespace, url: str, model: str | None) -> int:
    if model is None:
        raise BenchError("name the model with --model")
    protocol = choose_protocol(url, args.protocol, args.streaming)
    check_url(url, protocol)
    headers = request_headers(args.header or (), args.api_key)
    target = Target(url, model, headers, protocol)
    metadata = target.metadata(args.version)
    workload = build_workload(
        url,
        model,
        metadata,
        binary=args.binary,
        rows=args.rows,
        input_file=args.input,
        version=args.version,
        variants=args.distinct,
        unique_fraction=args.unique_fraction,
        headers=headers,
        protocol=protocol,
        parameters=request_parameters(args.parameter or ()),
    )
    output: dict[str, Any] = {
        "url": url,
        "model": model,
        "protocol": protocol,
        "binary": args.binary or protocol != "http",  # gRPC's tensors are always raw bytes
        "rows": args.rows,
    }
    if args.sweep:
        output.update(_run_sweep(args, target, workload))
    else:
        if args.rate is not None:
            config = _config(args, rate=args.rate)
        else:
            concurrency = 64 if args.concurrency is None else args.concurrency
            config = _config(args, concurrency=concurrency)
        report = measure(target, workload, config)
        print(report.text())
        output["report"] = report.as_dict()
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(output, indent=1))
    return 0


def _run_sweep(args: argparse.Namespace, target: Target, workload: Workload) -> dict[str, Any]:
    """Open-loop rates stepped up, then bisected, to the highest one under the p99 SLO."""
    base = _config(args, rate=args.start_rate)

    def run(rate: float) -> Report:
        report = measure(target, workload, at_rate(base, rate))
        print(report.text(), flush=True)
        return report

    curve, best = sweep(run, args.slo_p99_ms, args.start_rate, args.max_rate, args.bisect_steps)
    print(f"\nlatency-throughput curve (SLO p99 < {args.slo_p99_ms:g} ms):")
    print(curve_table(curve, args.slo_p99_ms))
    if best is None:
        print(f"no rate from {args.start_rate:g} req/s held p99 < {args.slo_p99_ms:g} ms")
    else:
        print(
            f"\nhighest rate under the SLO: {best.target_rate:,.0f} req/s "
            f"(achieved {best.achieved_rps:,.0f}, p99 {best.p99_ms:.2f} ms)"
        )
    return {
        "slo_p99_ms": args.slo_p99_ms,
        "curve": [r.as_dict() for r in curve],
        "best": best.as_dict() if best else None,
    }
