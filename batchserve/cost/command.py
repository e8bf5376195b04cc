"""`batchserve cost`: replicas, monthly cost and cost per 1M requests per Azure platform, and an
optional autoscaling simulation over a day's request-rate trace."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from batchserve.cost.capacity import Capacity, LatencyCurve, read_bench_json, read_sweep_curve
from batchserve.cost.errors import CostError
from batchserve.cost.model import Estimate, PlanInputs, estimate
from batchserve.cost.pricing import Platform, Pricing, load_pricing
from batchserve.cost.report import (
    assumptions,
    cost_chart,
    estimate_table,
    simulation_chart,
    simulation_table,
)
from batchserve.cost.simulate import Delays, SimConfig, simulate
from batchserve.cost.trace import DiurnalShape, diurnal, read_csv

EXIT_USAGE = 2


def add_cost_parser(commands: Any) -> None:
    cost = commands.add_parser(
        "cost",
        help="replicas, monthly cost and cost per 1M requests on Azure (and a scaling simulation)",
        description="Capacity comes from --throughput, --bench-json or --sweep-json; prices from "
        "the shipped table (deploy/azure/pricing.json) unless overridden. See docs/cost.md.",
    )
    source = cost.add_mutually_exclusive_group()
    source.add_argument("--throughput", type=float, help="measured req/s per replica at the SLO")
    source.add_argument(
        "--bench-json",
        help="a `batchserve bench --json` file (sweep or single run); FILE#a.b reads the object "
        "at key path a.b",
    )
    cost.add_argument(
        "--platform-throughput",
        action="append",
        default=[],
        metavar="NAME=RPS",
        help="per-platform req/s per replica (GPU and CPU replicas differ); repeatable",
    )
    cost.add_argument("--platforms", help="comma-separated platform names (default: all)")
    cost.add_argument("--target-rps", type=float, default=1000.0)
    cost.add_argument("--availability", type=float, default=0.999)
    cost.add_argument("--slo-p99-ms", type=float, default=100.0)
    cost.add_argument(
        "--utilisation", type=float, default=0.7, help="plan replicas at this share of capacity"
    )
    cost.add_argument(
        "--duty-cycle", type=float, default=1.0, help="share of the month with traffic (bursty)"
    )
    cost.add_argument("--pricing", help="pricing JSON (default: the shipped table)")
    cost.add_argument(
        "--price",
        action="append",
        default=[],
        metavar="PATH=VALUE",
        help="override one value, e.g. prices.vms.Standard_F8s_v2.usd_per_hour=0.30; repeatable",
    )
    cost.add_argument("--json", dest="json_out", help="write the results to this file")
    cost.add_argument("--chart", help="write a cost-per-1M bar chart (PNG)")
    cost.add_argument(
        "--simulate", metavar="TRACE", help="'diurnal' (built in, 5x spike) or a seconds,rate CSV"
    )
    cost.add_argument(
        "--sweep-json", help="a `batchserve bench --sweep --json` file: the latency-vs-load curve"
    )
    cost.add_argument("--sim-chart", help="write rate, replicas and p99 over the trace (PNG)")
    cost.add_argument("--pod-start-s", type=float, help="pod start-up time (model load)")
    cost.add_argument("--node-provision-s", type=float, help="CPU node provisioning time")
    cost.add_argument("--gpu-node-provision-s", type=float, help="GPU node provisioning time")


def run_cost(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except CostError as err:
        print(f"batchserve: error: {err.message}", file=sys.stderr)
        return EXIT_USAGE


def _run(args: argparse.Namespace) -> int:
    pricing = load_pricing(args.pricing, args.price)
    inputs = PlanInputs(args.target_rps, args.availability, args.utilisation, args.duty_cycle)
    capacity = _capacity(args)
    platforms = _platforms(pricing, args.platforms)
    per_platform = _platform_capacity(args.platform_throughput, pricing, capacity.rps)
    estimates = [
        estimate(p, pricing, per_platform.get(p.name, capacity.rps), inputs) for p in platforms
    ]
    notes = assumptions(pricing, inputs, capacity.origin)
    if per_platform:
        notes.append(f"per-platform capacity overrides: {per_platform}")
    print(estimate_table(estimates, pricing.currency))
    print("\nassumptions:\n" + "\n".join(f"  - {note}" for note in notes))
    output: dict[str, Any] = {
        "inputs": asdict(inputs) | {"slo_p99_ms": args.slo_p99_ms},
        "capacity": asdict(capacity),
        "pricing": {"origin": pricing.origin, "as_of": pricing.as_of, "region": pricing.region},
        "assumptions": notes,
        "estimates": [_estimate_dict(e) for e in estimates],
    }
    if args.chart:
        title = f"{inputs.target_rps:,.0f} req/s, p99 < {args.slo_p99_ms:g} ms, {pricing.region}"
        _chart(lambda: cost_chart(estimates, args.chart, title), args.chart)
    if args.simulate:
        output["simulation"] = _simulate(args, pricing, inputs, capacity, platforms, per_platform)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(output, indent=1))
    return 0


def _capacity(args: argparse.Namespace) -> Capacity:
    if args.throughput is not None:
        return Capacity(args.throughput, None, "--throughput")
    path = args.bench_json or args.sweep_json
    if path is None:
        raise CostError("give the per-replica capacity: --throughput, --bench-json or --sweep-json")
    return read_bench_json(path, args.slo_p99_ms)


def _platforms(pricing: Pricing, names: str | None) -> list[Platform]:
    if not names:
        return list(pricing.platforms)
    return [pricing.platform(name.strip()) for name in names.split(",") if name.strip()]


def _platform_capacity(items: list[str], pricing: Pricing, default: float) -> dict[str, float]:
    result: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            rps = float(value)
        except ValueError:
            rps = -1.0
        if not sep or not rps > 0:
            raise CostError(f"--platform-throughput {item!r}: expected NAME=RPS with RPS > 0")
        result[pricing.platform(name).name] = rps
    return result


def _estimate_dict(e: Estimate) -> dict[str, Any]:
    return asdict(e) | {"usd_per_million": e.usd_per_million}


def _chart(draw: Any, path: str) -> None:
    try:
        draw()
    except ImportError:
        raise CostError("charts need matplotlib: pip install 'batchserve[cost]'") from None
    print(f"wrote {path}")


def _simulate(
    args: argparse.Namespace,
    pricing: Pricing,
    inputs: PlanInputs,
    capacity: Capacity,
    platforms: list[Platform],
    per_platform: dict[str, float],
) -> dict[str, Any]:
    trace = (
        diurnal(DiurnalShape(peak_rps=inputs.target_rps))
        if args.simulate == "diurnal"
        else read_csv(args.simulate)
    )
    curve = (
        read_sweep_curve(args.sweep_json, args.slo_p99_ms)
        if args.sweep_json
        else LatencyCurve.step(capacity, args.slo_p99_ms)
    )
    delays = _delays(args, Delays())
    config = SimConfig(plan=inputs, delays=delays)
    try:
        results = [
            simulate(
                p, pricing, trace, curve.scaled(per_platform.get(p.name, capacity.rps)), config
            )
            for p in platforms
        ]
    except ImportError:
        raise CostError("the simulation needs SimPy: pip install 'batchserve[cost]'") from None
    print(
        f"\nsimulation: {trace.size:,} s trace ({args.simulate}), {trace.sum():,.0f} requests, "
        f"peak {trace.max():,.0f} req/s; curve from "
        f"{args.sweep_json or 'the capacity alone (no --sweep-json)'}"
    )
    print(simulation_table(results, pricing.currency))
    if args.sim_chart:
        _chart(
            lambda: simulation_chart(trace, results, args.slo_p99_ms, args.sim_chart),
            args.sim_chart,
        )
    return {
        "trace": args.simulate,
        "seconds": int(trace.size),
        "requests": float(trace.sum()),
        "peak_rps": float(trace.max()),
        "config": asdict(config),
        "results": [r.summary() for r in results],
    }


def _delays(args: argparse.Namespace, delays: Delays) -> Delays:
    changes = {
        "pod_start_s": args.pod_start_s,
        "node_provision_s": args.node_provision_s,
        "gpu_node_provision_s": args.gpu_node_provision_s,
    }
    for name, value in changes.items():
        if value is not None and value < 0:
            raise CostError(f"--{name.replace('_', '-')} must be >= 0")
    return replace(delays, **{k: v for k, v in changes.items() if v is not None})
