"""Tables, assumptions and charts for `batchserve cost`. matplotlib is imported only by the chart
functions (it is in the `cost` extra, not the server's base install)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from batchserve.cost.model import HOURS_PER_MONTH, Estimate, PlanInputs, spare_nodes
from batchserve.cost.pricing import Pricing
from batchserve.cost.simulate import SimResult

CHART_BUCKET_S = 60  # plot one point a minute: a day of seconds is too dense to draw
ZOOM_BEFORE_S = 600
ZOOM_AFTER_S = 1800


def estimate_table(
    estimates: Sequence[Estimate], currency: str = "USD", data_priced: bool = True
) -> str:
    """One row per platform; the load balancer, egress and Redis columns are part of the
    monthly figure ("-": the platform has no such item; without the request and response sizes
    the data charges are not priced, and the load balancer's cell holds its hours alone)."""
    lines = [
        f"| platform | req/s per replica | replicas (load + spare) | nodes | load balancer "
        f"| egress | Redis | monthly {currency} | {currency} per 1M requests |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for e in estimates:
        spare = e.replicas - e.replicas_for_load
        lb, egress, redis = (e.breakdown.get(k) for k in ("load_balancer", "egress", "redis"))
        cells = [
            _money(lb) + ("" if data_priced or lb is None else " (hours only)"),
            _money(egress) if data_priced else "not priced",
            _money(redis),
        ]
        lines.append(
            f"| {e.platform} | {e.capacity_rps:,.0f} | {e.replicas} ({e.replicas_for_load} + "
            f"{spare}) | {e.nodes} | {' | '.join(cells)} | {e.monthly_usd:,.2f} | "
            f"{e.usd_per_million:,.4f} |"
        )
    return "\n".join(lines)


def _money(value: float | None) -> str:
    return "-" if value is None else f"{value:,.2f}"


def skipped_lines(skipped: Sequence[tuple[str, str]]) -> list[str]:
    """The platforms left out, grouped by reason."""
    reasons: dict[str, list[str]] = {}
    for name, why in skipped:
        reasons.setdefault(why, []).append(name)
    return [f"{', '.join(names)}: {why}" for why, names in reasons.items()]


def simulation_table(results: Sequence[SimResult], currency: str = "USD") -> str:
    lines = [
        f"| platform | scaler (signal) | within SLO | dropped | peak replicas | replica-hours "
        f"| node-hours | {currency} for the trace | {currency} per 1M requests |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.platform} | {r.controller} ({r.signal}) | {100 * r.attainment:.3f}% | "
            f"{r.dropped:,.0f} | {r.peak_replicas} | {r.replica_hours:,.1f} | "
            f"{r.node_hours:,.1f} | {r.cost_usd:,.2f} | {r.usd_per_million:,.4f} |"
        )
    return "\n".join(lines)


# What no row prices, for every run's assumptions and docs/cost.md.
EXCLUDED = (
    "disks (OS disks of nodes and instances, the model share on Azure Files)",
    "container registry",
    "Log Analytics ingestion and retention, managed Prometheus and Grafana",
    "DNS zones and queries",
    "Key Vault operations",
    "public IP addresses",
    "inter-zone and inter-region data transfer",
    "support plans, reservations and savings plans",
)


def assumptions(pricing: Pricing, inputs: PlanInputs, cpu_origin: str | None) -> list[str]:
    spares = spare_nodes(inputs.availability)
    cpu = cpu_origin or "none given (CPU platforms without their own figure are left out)"
    notes = [
        f"prices: {pricing.origin or 'built in'} ({pricing.currency}, {pricing.region}, list "
        f"prices as of {pricing.as_of}); override with --pricing FILE or --price PATH=VALUE",
        f"capacity per CPU replica: {cpu}; GPU platforms only from their own figure; "
        f"planned at {inputs.utilisation:.0%} of capacity",
        f"target {inputs.target_rps:,.0f} req/s for {inputs.duty_cycle:.0%} of a "
        f"{HOURS_PER_MONTH:g}-hour month",
        f"availability {inputs.availability:.4%}: {spares} spare node(s) "
        "(N+1 from 99.9%, N+2 from 99.99%); each platform's shipped minimum replicas apply",
        "AKS: control-plane tier and system node pool as in each platform entry; one node "
        "failure takes all the replicas on it, hence whole spare nodes; the ingress's Azure "
        "Load Balancer Standard (hours, and GB processed both ways); Managed Redis where the "
        "overlay uses it",
        "Container Apps: billed per second of allocated vCPU/GiB (GPU-seconds for serverless "
        "GPU), idle rates while held at min replicas without traffic, monthly free grant "
        "spent on active seconds first, HTTP requests charged; ingress included",
        _traffic_note(pricing, inputs),
        "not included: " + "; ".join(EXCLUDED),
    ]
    notes.extend(f"price override: {override}" for override in pricing.overrides)
    notes.extend(
        f"estimate, not a list price: {item} ({source.note})"
        for item, source in pricing.sources()
        if source.estimate
    )
    return notes


def _traffic_note(pricing: Pricing, inputs: PlanInputs) -> str:
    traffic = inputs.traffic
    if traffic is None:
        return (
            "data charges NOT priced (load balancer GB processed, internet egress): the request "
            "and response sizes are unknown; give --request-bytes and --response-bytes"
        )
    bw = pricing.bandwidth
    return (
        f"data: {traffic.request_bytes:,.0f} B per request, {traffic.response_bytes:,.0f} B per "
        f"response; responses leave Azure as internet egress ({bw.usd_per_gb:g} "
        f"{pricing.currency}/GB after {bw.free_gb_per_month:g} GB a month free), both "
        "directions pass the AKS load balancer"
    )


# ---------------------------------------------------------------------------------------------
# charts


def cost_chart(estimates: Sequence[Estimate], path: str | Path, title: str) -> None:
    from matplotlib.figure import Figure

    names = [e.platform for e in estimates]
    values = [e.usd_per_million for e in estimates]
    figure = Figure(figsize=(8, 0.5 * len(names) + 1.5), layout="constrained")
    axes = figure.subplots()
    bars = axes.barh(names, values, color="#4878a8")
    axes.invert_yaxis()
    axes.set_xlabel("USD per 1M requests")
    axes.set_title(title, fontsize=10)
    # No "$": matplotlib would read a pair of them as mathtext.
    labels = [
        f"{e.usd_per_million:,.3f}  ({e.replicas} replicas, {e.monthly_usd:,.0f} USD/month)"
        for e in estimates
    ]
    axes.bar_label(bars, labels=labels, padding=3, fontsize=8)
    axes.set_xlim(0, max(values, default=1.0) * 1.6)
    figure.savefig(path, dpi=120)


def simulation_chart(
    trace: np.ndarray, results: Sequence[SimResult], slo_p99_ms: float, path: str | Path
) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 10.5), layout="constrained")
    rate_ax, replica_ax, p99_ax, zoom_ax = figure.subplots(4, 1)
    for ax in (rate_ax, replica_ax):
        ax.sharex(p99_ax)
        ax.tick_params(labelbottom=False)
    hours = _buckets(np.arange(trace.size, dtype=np.float64), "first") / 3600.0
    rate_ax.plot(hours, _buckets(trace, "mean"), color="black", linewidth=1)
    rate_ax.set_ylabel("offered req/s")
    rate_ax.set_title("request rate, ready replicas and replica p99 over the trace", fontsize=10)
    for result in results:
        replicas = _buckets(result.replicas, "first")
        replica_ax.step(hours, replicas, where="post", label=result.platform)
        p99_ax.plot(hours, _buckets(result.p99_ms, "max"), linewidth=1, label=result.platform)
    replica_ax.set_ylabel("ready replicas")
    replica_ax.legend(fontsize=8, ncols=2, loc="upper left")
    p99_ax.axhline(slo_p99_ms, color="red", linestyle="--", linewidth=1, label="SLO")
    p99_ax.set_yscale("log")
    p99_ax.set_ylabel("replica p99 ms (worst in minute)")
    p99_ax.set_xlabel("hour")
    p99_ax.legend(fontsize=8, ncols=2, loc="upper left")
    _zoom(zoom_ax, trace, results)
    figure.savefig(path, dpi=110)


def _zoom(axes: Any, trace: np.ndarray, results: Sequence[SimResult]) -> None:
    """Second by second around the busiest moment: how long new replicas take to arrive."""
    peak = int(np.argmax(trace))
    start, end = max(0, peak - ZOOM_BEFORE_S), min(trace.size, peak + ZOOM_AFTER_S)
    minutes = (np.arange(start, end) - peak) / 60.0
    for result in results:
        axes.step(minutes, result.replicas[start:end], where="post", label=result.platform)
    axes.set_ylabel("ready replicas")
    axes.set_xlabel("minutes from the busiest second")
    rate = axes.twinx()
    rate.plot(minutes, trace[start:end], color="black", linewidth=0.8, alpha=0.5)
    rate.set_ylabel("offered req/s (grey)")
    axes.set_title("zoom: the busiest second, -10 to +30 minutes", fontsize=10)
    axes.legend(fontsize=8, ncols=2, loc="upper left")


def _nanmax(values: np.ndarray, axis: int) -> np.ndarray:
    filled = np.where(np.isnan(values), -np.inf, values)
    worst = filled.max(axis=axis)
    return np.where(np.isinf(worst), np.nan, worst)


def _buckets(values: np.ndarray, how: Literal["mean", "first", "max"]) -> np.ndarray:
    """One value per CHART_BUCKET_S seconds: the mean, the first, or the largest (NaN-aware)."""
    count = math.ceil(values.size / CHART_BUCKET_S)
    padded = np.full(count * CHART_BUCKET_S, np.nan)
    padded[: values.size] = values
    shaped = padded.reshape(count, CHART_BUCKET_S)
    if how == "mean":
        return np.asarray(np.nanmean(shaped, axis=1))  # the padding is the only NaN here
    if how == "first":
        return shaped[:, 0]
    return _nanmax(shaped, axis=1)
