"""`batchserve cost`: replicas, monthly cost and cost per 1M requests per Azure platform, and an
optional autoscaling simulation over a day's request-rate trace."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from batchserve.cost.capacity import (
    Capacity,
    LatencyCurve,
    read_bench_json,
    read_sweep_curve,
    read_traffic,
)
from batchserve.cost.errors import CostError
from batchserve.cost.model import Estimate, PlanInputs, estimate
from batchserve.cost.pricing import Platform, Pricing, load_pricing
from batchserve.cost.report import (
    assumptions,
    cost_chart,
    estimate_table,
    simulation_chart,
    simulation_table,
    skipped_lines,
)
from batchserve.cost.simulate import REQUEST_TIMEOUT_S, Delays, SimConfig, simulate
from batchserve.cost.trace import DiurnalShape, diurnal, read_csv

EXIT_USAGE = 2
DELAY_HELP = {
    "pod_start_s": "AKS pod start on a ready node: model load, warm-up, readiness",
    "node_provision_s": "AKS CPU node provisioning",
    "gpu_node_provision_s": "AKS GPU node provisioning (driver, device plugin)",
    "image_pull_s": "image pull on a new AKS node, after it joins",
    "node_scale_down_s": "cluster autoscaler: how long a node is unneeded before removal",
    "cold_start_s": "Container Apps CPU replica start",
    "gpu_cold_start_s": "Container Apps GPU replica start",
    "aml_instance_start_s": "Azure ML CPU instance start (VM, image, model)",
    "gpu_aml_instance_start_s": "Azure ML GPU instance start (VM, image, model)",
}


@dataclass(frozen=True, slots=True)
class Sized:
    """A platform to price with its capacity and, from a sweep, its latency curve."""

    platform: Platform
    capacity: Capacity
    curve: LatencyCurve | None


def add_cost_parser(commands: Any) -> None:
    cost = commands.add_parser(
        "cost",
        help="replicas, monthly cost and cost per 1M requests on Azure (and a scaling simulation)",
        description="CPU capacity comes from --throughput, --bench-json or --sweep-json; a GPU "
        "platform needs its own figure (--platform-throughput or --platform-bench-json) and is "
        "left out without one. Prices from the shipped table (deploy/azure/pricing.json) unless "
        "overridden. See docs/cost.md.",
    )
    source = cost.add_mutually_exclusive_group()
    source.add_argument(
        "--throughput", type=float, help="measured req/s per CPU replica at the SLO"
    )
    source.add_argument(
        "--bench-json",
        help="a `batchserve bench --json` file of a CPU replica (sweep or single run); FILE#a.b "
        "reads the object at key path a.b",
    )
    cost.add_argument(
        "--platform-throughput",
        action="append",
        default=[],
        metavar="NAME=RPS",
        help="one platform's req/s per replica (every GPU platform needs one, or a bench file)",
    )
    cost.add_argument(
        "--platform-bench-json",
        action="append",
        default=[],
        metavar="NAME=FILE",
        help="one platform's capacity (and, from a sweep, its latency curve) from a bench file "
        "measured on that platform's hardware; repeatable",
    )
    cost.add_argument("--request-bytes", type=float, help="bytes per request on the wire")
    cost.add_argument("--response-bytes", type=float, help="bytes per response on the wire")
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
    cost.add_argument(
        "--request-timeout-s",
        type=float,
        default=REQUEST_TIMEOUT_S,
        help="the server's request deadline: longer waits are dropped (default %(default)s)",
    )
    defaults = Delays()
    for item in fields(Delays):
        cost.add_argument(
            "--" + item.name.replace("_", "-"),
            type=float,
            help=f"simulation delay: {DELAY_HELP[item.name]} "
            f"(default {getattr(defaults, item.name):g})",
        )


def run_cost(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except CostError as err:
        print(f"batchserve: error: {err.message}", file=sys.stderr)
        return EXIT_USAGE


def _run(args: argparse.Namespace) -> int:
    pricing = load_pricing(args.pricing, args.price)
    traffic = _traffic(args)
    inputs = PlanInputs(
        args.target_rps, args.availability, args.utilisation, args.duty_cycle, *traffic
    )
    general = _capacity(args)
    sized, skipped = _size(args, pricing, general)
    estimates = [estimate(s.platform, pricing, s.capacity.rps, inputs) for s in sized]
    notes = assumptions(pricing, inputs, general.origin if general else None)
    notes.extend(f"capacity of {s.platform.name}: {s.capacity.origin}" for s in sized
                 if s.capacity is not general)  # fmt: skip
    notes.extend(_over_maximum(estimates, pricing))
    print(estimate_table(estimates, pricing.currency, inputs.traffic is not None))
    if skipped:
        print("\nleft out:\n" + "\n".join(f"  - {line}" for line in skipped_lines(skipped)))
    print("\nassumptions:\n" + "\n".join(f"  - {note}" for note in notes))
    output: dict[str, Any] = {
        "inputs": asdict(inputs) | {"slo_p99_ms": args.slo_p99_ms},
        "capacity": asdict(general) if general else None,
        "capacities": {s.platform.name: asdict(s.capacity) for s in sized},
        "pricing": {"origin": pricing.origin, "as_of": pricing.as_of, "region": pricing.region},
        "assumptions": notes,
        "estimates": [_estimate_dict(e) for e in estimates],
        "skipped": [{"platform": name, "reason": why} for name, why in skipped],
    }
    if args.chart:
        title = f"{inputs.target_rps:,.0f} req/s, p99 < {args.slo_p99_ms:g} ms, {pricing.region}"
        _chart(lambda: cost_chart(estimates, args.chart, title), args.chart)
    if args.simulate:
        output["simulation"] = _simulate(args, pricing, inputs, sized)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(output, indent=1))
    return 0


def _traffic(args: argparse.Namespace) -> tuple[float | None, float | None]:
    """Bytes per request and response: the flags, else what the bench file records."""
    if args.request_bytes is not None or args.response_bytes is not None:
        return args.request_bytes, args.response_bytes
    path = args.bench_json or args.sweep_json
    found = read_traffic(path) if path else None
    return found if found is not None else (None, None)


def _capacity(args: argparse.Namespace) -> Capacity | None:
    """The CPU replica's capacity, if given."""
    if args.throughput is not None:
        return Capacity(args.throughput, None, "--throughput")
    path = args.bench_json or args.sweep_json
    return read_bench_json(path, args.slo_p99_ms) if path is not None else None


def _size(
    args: argparse.Namespace, pricing: Pricing, general: Capacity | None
) -> tuple[list[Sized], list[tuple[str, str]]]:
    """Each chosen platform with the capacity that applies to it; the rest, and why."""
    own = _platform_figures(args, pricing)
    sized: list[Sized] = []
    skipped: list[tuple[str, str]] = []
    for platform in _platforms(pricing, args.platforms):
        if platform.name in own:
            capacity, curve = own[platform.name]
            sized.append(Sized(platform, capacity, curve))
        elif platform.device == "cpu" and general is not None:
            sized.append(Sized(platform, general, None))
        elif platform.device == "gpu":
            skipped.append((platform.name, _NO_GPU_FIGURE))
        else:
            skipped.append((platform.name, _NO_CPU_FIGURE))
    if not sized:
        raise CostError(
            "no platform has a capacity figure: give --throughput, --bench-json or --sweep-json "
            "(a CPU replica), or --platform-throughput / --platform-bench-json NAME=... (any, "
            "and every GPU platform)"
        )
    return sized, skipped


_NO_GPU_FIGURE = (
    "no GPU figure: --throughput, --bench-json and --sweep-json measure a CPU replica; give "
    "--platform-throughput NAME=RPS or --platform-bench-json NAME=FILE measured on this GPU"
)
_NO_CPU_FIGURE = "no CPU figure: give --throughput, --bench-json or --sweep-json"


def _platforms(pricing: Pricing, names: str | None) -> list[Platform]:
    if not names:
        return list(pricing.platforms)
    return [pricing.platform(name.strip()) for name in names.split(",") if name.strip()]


def _platform_figures(
    args: argparse.Namespace, pricing: Pricing
) -> dict[str, tuple[Capacity, LatencyCurve | None]]:
    result: dict[str, tuple[Capacity, LatencyCurve | None]] = {}
    for item in args.platform_throughput:
        name, sep, value = item.partition("=")
        try:
            rps = float(value)
        except ValueError:
            rps = -1.0
        if not sep or not rps > 0:
            raise CostError(f"--platform-throughput {item!r}: expected NAME=RPS with RPS > 0")
        origin = f"--platform-throughput {pricing.platform(name).name}={rps:g}"
        result[name] = (Capacity(rps, None, origin), None)
    for item in args.platform_bench_json:
        name, sep, path = item.partition("=")
        if not sep or not path:
            raise CostError(f"--platform-bench-json {item!r}: expected NAME=FILE")
        pricing.platform(name)
        capacity = read_bench_json(path, args.slo_p99_ms)
        result[name] = (capacity, _sweep_or_none(path, args.slo_p99_ms))
    return result


def _sweep_or_none(path: str, slo_p99_ms: float) -> LatencyCurve | None:
    try:
        return read_sweep_curve(path, slo_p99_ms)
    except CostError:
        return None  # a single run: capacity only, no curve


def _over_maximum(estimates: list[Estimate], pricing: Pricing) -> list[str]:
    notes = []
    for e in estimates:
        high = pricing.platform(e.platform).max_replicas
        if high is not None and e.replicas > high:
            notes.append(
                f"{e.platform} needs {e.replicas} replicas, more than the shipped maximum "
                f"({high}): raise it in the deployment and with --price "
                f"platforms.{e.platform}.max_replicas=N"
            )
    return notes


def _estimate_dict(e: Estimate) -> dict[str, Any]:
    return asdict(e) | {"usd_per_million": e.usd_per_million}


def _chart(draw: Any, path: str) -> None:
    try:
        draw()
    except ImportError:
        raise CostError("charts need matplotlib: pip install 'batchserve[cost]'") from None
    print(f"wrote {path}")


def _simulate(
    args: argparse.Namespace, pricing: Pricing, inputs: PlanInputs, sized: list[Sized]
) -> dict[str, Any]:
    trace = (
        diurnal(DiurnalShape(peak_rps=inputs.target_rps))
        if args.simulate == "diurnal"
        else read_csv(args.simulate)
    )
    sweep = read_sweep_curve(args.sweep_json, args.slo_p99_ms) if args.sweep_json else None
    config = SimConfig(plan=inputs, delays=_delays(args), request_timeout_s=args.request_timeout_s)
    try:
        results = [
            simulate(s.platform, pricing, trace, _curve(s, sweep, args.slo_p99_ms), config)
            for s in sized
        ]
    except ImportError:
        raise CostError("the simulation needs SimPy: pip install 'batchserve[cost]'") from None
    print(
        f"\nsimulation: {trace.size:,} s trace ({args.simulate}), {trace.sum():,.0f} requests, "
        f"peak {trace.max():,.0f} req/s; CPU curve from "
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


def _curve(sized: Sized, sweep: LatencyCurve | None, slo_p99_ms: float) -> LatencyCurve:
    """The platform's own sweep; else, for a CPU platform, the CPU sweep at its capacity; else
    one step at the capacity (no mean latencies: the scaler then uses the rate signal)."""
    if sized.curve is not None:
        return sized.curve
    if sweep is not None and sized.platform.device == "cpu":
        return sweep.scaled(sized.capacity.rps)
    return LatencyCurve.step(sized.capacity, slo_p99_ms)


def _delays(args: argparse.Namespace) -> Delays:
    given = {f.name: getattr(args, f.name) for f in fields(Delays)}
    return replace(Delays(), **{k: v for k, v in given.items() if v is not None})
