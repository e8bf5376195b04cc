"""`batchserve cost`: the arithmetic against hand-computed cases, the pricing file's validation,
reading `bench --json` output, the autoscaling simulation, and the command end to end."""

from __future__ import annotations

import argparse
import copy
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from batchserve.bench.report import Report
from batchserve.cost import (
    CostError,
    PlanInputs,
    estimate,
    load_pricing,
    read_bench_json,
    read_sweep_curve,
    replicas_for_load,
    spare_nodes,
)
from batchserve.cost.capacity import LatencyCurve
from batchserve.cost.command import add_cost_parser, run_cost
from batchserve.cost.pricing import default_pricing_path, parse_pricing

REPO = Path(__file__).resolve().parent.parent
MONTH_S = 730 * 3600
URL = "https://azure.microsoft.com/en-us/pricing/details/virtual-machines/linux/"

# ---------------------------------------------------------------------------------------------
# a small pricing table with round numbers, so every expected figure is computed by hand


def _src(**extra: Any) -> dict[str, Any]:
    return {"source": URL, "as_of": "2025-01"} | extra


def small_table() -> dict[str, Any]:
    return {
        "schema": 1,
        "currency": "USD",
        "region": "testland",
        "as_of": "2025-01-15",
        "prices": {
            "vms": {
                "cpu-vm": _src(vcpu=4, memory_gib=16, gpu=None, usd_per_hour=0.10),
                "gpu-vm": _src(vcpu=8, memory_gib=64, gpu="1x T", usd_per_hour=1.00),
                "sys-vm": _src(vcpu=2, memory_gib=8, gpu=None, usd_per_hour=0.04),
            },
            "aks": _src(control_plane_usd_per_hour={"free": 0.0, "standard": 0.10}),
            "azure_ml": _src(surcharge_usd_per_hour=0.0),
            "container_apps": _src(
                active_usd_per_vcpu_second=0.00001,
                active_usd_per_gib_second=0.000001,
                idle_usd_per_vcpu_second=0.000002,
                idle_usd_per_gib_second=0.0000005,
                usd_per_million_requests=0.5,
                free_vcpu_seconds=0,
                free_gib_seconds=0,
                free_requests=0,
            ),
            "serverless_gpu": {
                "g": _src(gpu="1x T", vcpu=8, memory_gib=56, usd_per_second=0.001, estimate=True)
            },
            "load_balancer": _src(usd_per_hour=0.02, usd_per_gb_processed=0.01),
            "bandwidth": _src(free_gb_per_month=0, usd_per_gb=0.1),
            "redis": {"r": _src(memory_gib=1, usd_per_hour=0.05)},
        },
        "platforms": [
            {"name": "aml", "service": "azure_ml", "device": "cpu", "vm": "cpu-vm",
             "min_replicas": 3},
            {"name": "aks", "service": "aks", "device": "cpu", "vm": "cpu-vm",
             "replicas_per_node": 3, "min_replicas": 2, "control_plane": "standard",
             "system_vm": "sys-vm", "system_nodes": 2},
            {"name": "aks-gpu", "service": "aks", "device": "gpu", "vm": "gpu-vm",
             "min_replicas": 1, "control_plane": "free"},
            {"name": "aks-edge", "service": "aks", "device": "cpu", "vm": "cpu-vm",
             "min_replicas": 1, "control_plane": "free", "load_balancer": True, "redis": "r"},
            {"name": "aca", "service": "container_apps", "device": "cpu", "vcpu": 2,
             "memory_gib": 4, "min_replicas": 0},
            {"name": "aca-warm", "service": "container_apps", "device": "cpu", "vcpu": 2,
             "memory_gib": 4, "min_replicas": 1},
            {"name": "aca-gpu", "service": "container_apps", "device": "gpu", "gpu_profile": "g",
             "min_replicas": 1},
        ],
    }  # fmt: skip


def write(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def table_path(tmp_path: Path) -> Path:
    return write(tmp_path / "pricing.json", small_table())


# ---------------------------------------------------------------------------------------------
# arithmetic


def test_replicas_for_load_rounds_up_but_not_on_float_noise() -> None:
    assert replicas_for_load(1000, 500, 1.0) == 2
    assert replicas_for_load(1000, 3000, 0.7) == 1
    assert replicas_for_load(10_000, 2986, 0.7) == 5  # 10000 / 2090.2 = 4.78
    assert replicas_for_load(2100, 3000, 0.7) == 1  # exactly at the planned load
    assert replicas_for_load(0.001, 3000, 0.7) == 1


def test_spares_follow_the_availability_rule() -> None:
    assert spare_nodes(0.99) == 0
    assert spare_nodes(0.999) == 1
    assert spare_nodes(0.9995) == 1
    assert spare_nodes(0.9999) == 2


# capacity 500 req/s at 50% planned utilisation -> 250 req/s per replica; 1000 req/s -> N = 4;
# 99.9% -> one spare node. Requests per month: 1000 * 3600 * 730 = 2.628e9.
INPUTS = PlanInputs(target_rps=1000, availability=0.999, utilisation=0.5)


def test_azure_ml_cost_by_hand(table_path: Path) -> None:
    pricing = load_pricing(table_path)
    e = estimate(pricing.platform("aml"), pricing, 500, INPUTS)
    assert (e.replicas_for_load, e.spare_nodes, e.replicas, e.nodes) == (4, 1, 5, 5)
    assert e.monthly_usd == pytest.approx(5 * 0.10 * 730)  # 365.0
    assert e.monthly_requests == pytest.approx(2.628e9)
    assert e.usd_per_million == pytest.approx(365.0 / 2628)


def test_azure_ml_minimum_instances_apply(table_path: Path) -> None:
    pricing = load_pricing(table_path)
    e = estimate(pricing.platform("aml"), pricing, 10_000, INPUTS)  # N = 1, +1 spare = 2 < 3
    assert (e.replicas, e.nodes) == (3, 3)
    assert e.monthly_usd == pytest.approx(3 * 0.10 * 730)


def test_aks_cost_by_hand(table_path: Path) -> None:
    pricing = load_pricing(table_path)
    e = estimate(pricing.platform("aks"), pricing, 500, INPUTS)
    # 4 replicas + a spare node's worth (3) = 7 replicas on ceil(7 / 3) = 3 nodes.
    assert (e.replicas, e.nodes) == (7, 3)
    assert e.breakdown == pytest.approx(
        {"nodes": 3 * 0.10 * 730, "control_plane": 0.10 * 730, "system_pool": 2 * 0.04 * 730}
    )
    assert e.monthly_usd == pytest.approx(219 + 73 + 58.4)
    assert e.usd_per_million == pytest.approx(350.4 / 2628)


def test_aks_gpu_free_tier_high_availability(table_path: Path) -> None:
    pricing = load_pricing(table_path)
    inputs = PlanInputs(target_rps=1000, availability=0.9999, utilisation=1.0)
    e = estimate(pricing.platform("aks-gpu"), pricing, 400, inputs)  # N = 3, N+2
    assert (e.replicas, e.nodes) == (5, 5)
    assert e.monthly_usd == pytest.approx(5 * 1.00 * 730)


def test_container_apps_cost_by_hand(table_path: Path) -> None:
    pricing = load_pricing(table_path)
    e = estimate(pricing.platform("aca"), pricing, 500, INPUTS)
    assert e.replicas == 5
    vcpu = 5 * 2 * MONTH_S * 0.00001  # 262.8
    gib = 5 * 4 * MONTH_S * 0.000001  # 52.56
    requests = 2628 * 0.5  # 1314
    assert e.breakdown == pytest.approx({"active": vcpu + gib, "idle": 0.0, "requests": requests})
    assert e.monthly_usd == pytest.approx(1629.36)


def test_container_apps_duty_cycle_idles_or_scales_to_zero(table_path: Path) -> None:
    pricing = load_pricing(table_path)
    half = PlanInputs(target_rps=1000, availability=0.999, utilisation=0.5, duty_cycle=0.5)
    cold = estimate(pricing.platform("aca"), pricing, 500, half)
    warm = estimate(pricing.platform("aca-warm"), pricing, 500, half)
    active = 5 * MONTH_S / 2 * (2 * 0.00001 + 4 * 0.000001)
    idle = 1 * MONTH_S / 2 * (2 * 0.000002 + 4 * 0.0000005)
    assert cold.breakdown["active"] == pytest.approx(active)
    assert cold.breakdown["idle"] == 0.0
    assert warm.breakdown["idle"] == pytest.approx(idle)
    assert cold.monthly_requests == pytest.approx(1.314e9)
    assert cold.usd_per_million == pytest.approx((active + 657) / 1314)


def test_container_apps_gpu_bills_idle_gpu_seconds_in_full(table_path: Path) -> None:
    pricing = load_pricing(table_path)
    half = PlanInputs(target_rps=1000, availability=0.999, utilisation=0.5, duty_cycle=0.5)
    e = estimate(pricing.platform("aca-gpu"), pricing, 500, half)
    gpu_seconds = 5 * MONTH_S / 2 + 1 * MONTH_S / 2
    assert e.breakdown == pytest.approx({"gpu_seconds": gpu_seconds * 0.001, "requests": 657})
    assert e.usd_per_million == pytest.approx((7884 + 657) / 1314)


def test_container_apps_free_grant(tmp_path: Path) -> None:
    table = small_table()
    table["prices"]["container_apps"] |= {
        "free_vcpu_seconds": 180_000, "free_gib_seconds": 360_000, "free_requests": 2_000_000,
    }  # fmt: skip
    pricing = load_pricing(write(tmp_path / "p.json", table))
    e = estimate(pricing.platform("aca"), pricing, 500, INPUTS)
    vcpu = (5 * 2 * MONTH_S - 180_000) * 0.00001
    gib = (5 * 4 * MONTH_S - 360_000) * 0.000001
    assert e.breakdown["active"] == pytest.approx(vcpu + gib)
    assert e.breakdown["requests"] == pytest.approx((2628 - 2) * 0.5)


def test_shipped_prices_give_the_documented_gpu_figure() -> None:
    pricing = load_pricing()
    inputs = PlanInputs(target_rps=1000)
    platform = pricing.platform("aks-gpu-h100")
    e = estimate(platform, pricing, 4400, inputs)
    # 2 x NC40ads_H100_v5 + Standard control plane + 3 x D4s_v5 system nodes + the load
    # balancer's hours + a Managed Redis cache, 730 h; no sizes given, so no data charges.
    assert (platform.system_nodes, platform.system_vm, platform.redis) == (
        3, "Standard_D4s_v5", "Balanced_B0"
    )  # fmt: skip
    hourly = (
        2 * 6.98 + 0.10 + 3 * 0.192
        + pricing.load_balancer.usd_per_hour + pricing.redis["Balanced_B0"].usd_per_hour
    )  # fmt: skip
    assert e.monthly_usd == pytest.approx(hourly * 730)
    assert "egress" not in e.breakdown
    assert e.usd_per_million == pytest.approx(e.monthly_usd / 2628)


def test_plan_inputs_are_validated() -> None:
    for bad in ({"target_rps": 0}, {"availability": 1.0}, {"utilisation": 0}, {"duty_cycle": 2}):
        with pytest.raises(CostError):
            PlanInputs(**bad)


# ---------------------------------------------------------------------------------------------
# the pricing file


def test_shipped_table_is_valid_dated_and_sourced() -> None:
    pricing = load_pricing()
    items = list(pricing.sources())
    assert len(items) >= 10
    for _, source in items:
        assert source.url.startswith("https://azure.microsoft.com/")
        assert source.as_of
    names = {p.name for p in pricing.platforms}
    assert {"aml-cpu", "aks-cpu", "aks-gpu-t4", "aca-cpu", "aca-gpu-a100"} <= names


def test_deploy_copy_is_identical_to_the_package_data() -> None:
    shipped = default_pricing_path().read_bytes()
    assert (REPO / "deploy" / "azure" / "pricing.json").read_bytes() == shipped


def test_overrides_change_prices_and_platforms(table_path: Path) -> None:
    pricing = load_pricing(
        table_path,
        ["prices.vms.cpu-vm.usd_per_hour=0.2", "platforms.aml.min_replicas=1"],
    )
    assert pricing.vms["cpu-vm"].usd_per_hour == 0.2
    e = estimate(pricing.platform("aml"), pricing, 10_000, INPUTS)
    assert e.replicas == 2
    assert e.monthly_usd == pytest.approx(2 * 0.2 * 730)
    assert pricing.overrides == (
        "prices.vms.cpu-vm.usd_per_hour=0.2",
        "platforms.aml.min_replicas=1",
    )
    tier = load_pricing(table_path, ["platforms.aks.control_plane=free"])
    assert tier.platform("aks").control_plane == "free"


@pytest.mark.parametrize(
    "override",
    ["prices.vms.no-such-vm.usd_per_hour=1", "prices.vms.cpu-vm.usd_per_hour", "nothing=1"],
)
def test_override_of_a_missing_path_is_an_error(table_path: Path, override: str) -> None:
    with pytest.raises(CostError, match="override"):
        load_pricing(table_path, [override])


def _broken(change: str) -> dict[str, Any]:
    table = copy.deepcopy(small_table())
    vm = table["prices"]["vms"]["cpu-vm"]
    if change == "no source":
        del vm["source"]
    elif change == "no date":
        del vm["as_of"]
    elif change == "bad date":
        vm["as_of"] = "last week"
    elif change == "http source":
        vm["source"] = "http://example.com"
    elif change == "negative price":
        vm["usd_per_hour"] = -1
    elif change == "string price":
        vm["usd_per_hour"] = "0.1"
    elif change == "unknown key":
        vm["usd_per_hours"] = 0.1
    elif change == "unknown vm":
        table["platforms"][0]["vm"] = "nope"
    elif change == "unknown tier":
        table["platforms"][1]["control_plane"] = "gold"
    elif change == "duplicate platform":
        table["platforms"].append(table["platforms"][0])
    elif change == "no vm for aks":
        del table["platforms"][1]["vm"]
    return table


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("no source", r"prices\.vms\.cpu-vm: missing 'source'"),
        ("no date", r"prices\.vms\.cpu-vm: missing 'as_of'"),
        ("bad date", "YYYY-MM"),
        ("http source", "https://"),
        ("negative price", "negative"),
        ("string price", "expected float"),
        ("unknown key", "unknown key.*usd_per_hours"),
        ("unknown vm", "'nope' has no price"),
        ("unknown tier", "unknown AKS tier 'gold'"),
        ("duplicate platform", "unique"),
        ("no vm for aks", "needs 'vm'"),
    ],
)
def test_bad_pricing_file_names_the_problem(tmp_path: Path, change: str, message: str) -> None:
    path = write(tmp_path / "bad.json", _broken(change))
    with pytest.raises(CostError, match=message) as info:
        load_pricing(path)
    assert str(path) in info.value.message


def test_unreadable_pricing_files(tmp_path: Path) -> None:
    with pytest.raises(CostError, match="cannot read"):
        load_pricing(tmp_path / "missing.json")
    (tmp_path / "junk.json").write_text("{ not json")
    with pytest.raises(CostError, match="not valid JSON"):
        load_pricing(tmp_path / "junk.json")


def test_parse_accepts_the_small_table() -> None:
    pricing = parse_pricing(small_table())
    assert pricing.serverless_gpu["g"].source.estimate is True
    assert pricing.as_of == "2025-01-15"


# ---------------------------------------------------------------------------------------------
# bench JSON, built with the bench's own Report so the structure is the one it writes


def report(rate: float | None, achieved: float, p99: float, failed: int = 0) -> dict[str, Any]:
    ok = int(achieved * 4)
    return Report(
        mode="open" if rate else "closed",
        target_rate=rate,
        concurrency=None if rate else 64,
        duration_s=4.0,
        processes=1,
        requests=ok + failed,
        ok=ok,
        achieved_rps=achieved,
        latency_ms={"p50": p99 / 4, "p90": p99 / 2, "p99": p99, "p99.9": p99 * 2, "max": p99 * 3,
                    "mean": p99 / 4},
        errors_by_status={"503": failed} if failed else {},
        errors_by_exception={},
        delayed_by_cap=0,
    ).as_dict()  # fmt: skip


def sweep_file(path: Path, slo: float = 100.0) -> Path:
    curve = [
        report(500, 500, 5.6),
        report(1000, 1000, 16.5),
        report(2000, 1999, 39.5),
        report(3000, 2986, 47.0),
        report(3250, 3238, 893.5),
        report(3500, 3331, 310.1),  # lower than its neighbour: noise
        report(4000, 1979, 3285.0, failed=3),
    ]
    best = curve[3]
    data = {"url": "http://127.0.0.1:8000", "model": "mlp", "binary": False, "rows": 1,
            "slo_p99_ms": slo, "curve": curve, "best": best}  # fmt: skip
    return write(path, data)


def single_file(path: Path, achieved: float, p99: float) -> Path:
    data = {"url": "http://127.0.0.1:8000", "model": "mlp", "binary": False, "rows": 1,
            "report": report(None, achieved, p99)}  # fmt: skip
    return write(path, data)


def test_sweep_gives_the_best_rate_under_the_slo(tmp_path: Path) -> None:
    path = sweep_file(tmp_path / "sweep.json")
    capacity = read_bench_json(str(path), 100.0)
    assert capacity.rps == 2986
    assert capacity.p99_ms == 47.0
    # A stricter SLO than the sweep's own picks an earlier point from the same curve.
    assert read_bench_json(str(path), 40.0).rps == 1999
    with pytest.raises(CostError, match="no rate"):
        read_bench_json(str(path), 5.0)


def test_single_run_counts_only_if_it_held_the_slo(tmp_path: Path) -> None:
    good = single_file(tmp_path / "good.json", 2500.0, 60.0)
    assert read_bench_json(str(good), 100.0).rps == 2500.0
    with pytest.raises(CostError, match="misses the 50 ms SLO"):
        read_bench_json(str(good), 50.0)


def test_nested_bench_json_and_bad_files(tmp_path: Path) -> None:
    nested = write(tmp_path / "suite.json", {"sweeps": {"batchserve": json.loads(
        sweep_file(tmp_path / "s.json").read_text())}})  # fmt: skip
    assert read_bench_json(f"{nested}#sweeps.batchserve", 100.0).rps == 2986
    with pytest.raises(CostError, match="no key 'nope'"):
        read_bench_json(f"{nested}#sweeps.nope", 100.0)
    with pytest.raises(CostError, match="not a `batchserve bench --json` file"):
        read_bench_json(str(write(tmp_path / "x.json", {"hello": 1})), 100.0)


def test_sweep_curve_is_monotonic_and_saturates(tmp_path: Path) -> None:
    curve = read_sweep_curve(str(sweep_file(tmp_path / "sweep.json")), 100.0)
    assert curve.rates == (500, 1000, 2000, 3000, 3250, 3500, 4000)
    assert curve.p99_ms[5] == 893.5  # the noisy 310 ms point is lifted to its neighbour
    assert all(b >= a for a, b in zip(curve.p99_ms, curve.p99_ms[1:], strict=False))
    assert curve.capacity_rps == 2986
    doubled = curve.scaled(2 * 2986)
    assert doubled.rates[0] == pytest.approx(1000)
    assert doubled.p99_ms == curve.p99_ms


def test_the_committed_suite_sweep_reads() -> None:
    capacity = read_bench_json(str(REPO / "docs/results/suite.json") + "#sweeps.batchserve", 100)
    assert 2500 < capacity.rps < 3500


# ---------------------------------------------------------------------------------------------
# simulation


@pytest.fixture
def sim() -> Any:
    from batchserve.cost import simulate

    return simulate


def flat_curve(capacity: float) -> LatencyCurve:
    return LatencyCurve((capacity / 2, capacity, capacity * 1.5), (10.0, 50.0, 2000.0), capacity,
                        100.0)  # fmt: skip


def test_flat_trace_under_capacity_is_fully_attained_and_steady(table_path: Path, sim: Any) -> None:
    from batchserve.cost.trace import flat

    pricing = load_pricing(table_path)
    trace = flat(900.0, 7200)
    config = sim.SimConfig(plan=PlanInputs(target_rps=900, utilisation=0.5))
    result = sim.simulate(pricing.platform("aks"), pricing, trace, flat_curve(500), config)
    # 900 req/s at 250 req/s per replica -> 4 replicas from the first second to the last.
    assert result.attainment == 1.0
    assert set(result.replicas.tolist()) == {4.0}
    assert result.replica_hours == pytest.approx(8.0)
    assert result.node_hours == pytest.approx(2 * 2.0)  # 4 pods on 2 nodes of 3
    assert result.cost_usd == pytest.approx(4 * 0.10 + 2 * (0.10 + 2 * 0.04))
    assert result.p99_ms.max() < 100


def test_spike_waits_for_slow_gpu_nodes(table_path: Path, sim: Any) -> None:
    from batchserve.cost.trace import flat

    pricing = load_pricing(table_path)
    trace = np.concatenate([flat(100.0, 1200), flat(1000.0, 1800)])
    delays = sim.Delays(pod_start_s=20, gpu_node_provision_s=600)
    config = sim.SimConfig(plan=PlanInputs(target_rps=100, utilisation=1.0), delays=delays)
    result = sim.simulate(pricing.platform("aks-gpu"), pricing, trace, flat_curve(100), config)
    assert result.replicas[1199] == 1
    # Polls every 15 s see the jump through the 1-minute window (325, 550, 775, 1000 req/s ->
    # 4, 6, 8, 10 replicas); the 30 s scale-up window takes the lowest recent recommendation and
    # the policy allows +4 pods (or +100%) per 60 s. So 4 replicas are asked for at 1245 s, 5 at
    # 1260 s, 8 at 1305 s, 10 at 1320 s; each new node takes 600 s and its pod 20 s more.
    assert result.replicas[1245 + 620 - 1] == 1
    assert result.replicas[1245 + 620] == 4
    assert result.replicas[1260 + 620] == 5
    assert result.replicas[1320 + 620 - 1] == 8
    assert result.replicas[1320 + 620] == 10
    assert result.replicas[-1] == 10
    assert result.attainment < 0.9
    assert result.p99_ms[1300] > 100


def test_container_apps_scales_to_zero_on_an_idle_trace(table_path: Path, sim: Any) -> None:
    from batchserve.cost.trace import flat

    pricing = load_pricing(table_path)
    trace = np.concatenate([flat(50.0, 600), flat(0.0, 86_400 - 600)])
    config = sim.SimConfig(plan=PlanInputs(target_rps=50))
    cold = sim.simulate(pricing.platform("aca"), pricing, trace, flat_curve(500), config)
    warm = sim.simulate(pricing.platform("aca-warm"), pricing, trace, flat_curve(500), config)
    assert cold.replica_hours < 0.5  # the burst, then the 300 s cooldown, then nothing
    assert cold.replicas[-1] == 0
    assert warm.replica_hours == pytest.approx(24.0, abs=0.1)
    assert cold.cost_usd < warm.cost_usd / 10


def test_container_apps_cold_start_misses_the_first_requests(table_path: Path, sim: Any) -> None:
    from batchserve.cost.trace import flat

    pricing = load_pricing(table_path)
    trace = np.concatenate([flat(0.0, 600), flat(100.0, 600)])
    config = sim.SimConfig(plan=PlanInputs(target_rps=100))
    result = sim.simulate(pricing.platform("aca"), pricing, trace, flat_curve(500), config)
    assert result.replicas[599] == 0
    assert result.replicas[-1] == 1
    assert 0.9 < result.attainment < 1.0  # up to one 30 s poll plus a 20 s cold start lost


def test_a_day_simulates_quickly(table_path: Path, sim: Any) -> None:
    from batchserve.cost.trace import DiurnalShape, diurnal

    pricing = load_pricing(table_path)
    trace = diurnal(DiurnalShape(peak_rps=20_000))
    assert trace.size == 86_400
    assert trace.max() == pytest.approx(20_000 * 5 * 0.8838, rel=0.01)  # the spike at 19:00
    config = sim.SimConfig(plan=PlanInputs(target_rps=20_000))
    result = sim.simulate(pricing.platform("aks"), pricing, trace, flat_curve(3000), config)
    assert result.peak_replicas > 30
    assert 0.9 < result.attainment < 1.0


def test_trace_csv(tmp_path: Path) -> None:
    from batchserve.cost.trace import read_csv

    path = tmp_path / "trace.csv"
    path.write_text("seconds,rate\n0,10\n60,20\n120,5\n")
    trace = read_csv(path)
    assert trace.size == 180
    assert (trace[0], trace[59], trace[60], trace[179]) == (10, 10, 20, 5)
    path.write_text("0,10\n0,20\n")
    with pytest.raises(CostError, match="must increase"):
        read_csv(path)


# ---------------------------------------------------------------------------------------------
# the command


def run(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="batchserve")
    add_cost_parser(parser.add_subparsers(dest="command", required=True))
    return run_cost(parser.parse_args(["cost", *argv]))


@pytest.mark.slow
def test_command_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sweep = sweep_file(tmp_path / "sweep.json")
    out, chart, sim_chart = tmp_path / "cost.json", tmp_path / "cost.png", tmp_path / "sim.png"
    code = run(
        "--bench-json", str(sweep), "--platforms", "aml-cpu,aks-cpu,aca-cpu",
        "--platform-throughput", "aks-cpu=2000",
        "--price", "prices.aks.control_plane_usd_per_hour.standard=0.2",
        "--json", str(out), "--chart", str(chart),
        "--simulate", "diurnal", "--sweep-json", str(sweep), "--sim-chart", str(sim_chart),
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0
    assert "| aks-cpu | 2,000 |" in printed
    assert "price override: prices.aks.control_plane_usd_per_hour.standard=0.2" in printed
    assert "simulation: 86,400 s trace" in printed
    data = json.loads(out.read_text())
    assert [e["platform"] for e in data["estimates"]] == ["aml-cpu", "aks-cpu", "aca-cpu"]
    aks = data["estimates"][1]
    assert aks["breakdown"]["control_plane"] == pytest.approx(0.2 * 730)
    assert data["capacity"]["rps"] == 2986
    results = data["simulation"]["results"]
    assert {r["platform"] for r in results} == {"aml-cpu", "aks-cpu", "aca-cpu"}
    assert all(0 < r["slo_attainment"] <= 1 and r["usd_per_million"] > 0 for r in results)
    for png in (chart, sim_chart):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_command_with_a_csv_trace_and_a_throughput(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace = tmp_path / "trace.csv"
    trace.write_text("0,100\n600,3000\n1200,100\n1800,0\n")
    code = run("--throughput", "1000", "--platforms", "aca-cpu", "--simulate", str(trace))
    printed = capsys.readouterr().out
    assert code == 0
    assert "simulation: 2,400 s trace" in printed
    assert "| aca-cpu | container-apps (" in printed


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ((), "--throughput, --bench-json or --sweep-json"),
        (("--throughput", "0"), "must be a positive number"),
        (("--throughput", "100", "--platforms", "nope"), "unknown platform 'nope'"),
        (("--throughput", "100", "--platform-throughput", "aks-cpu=x"), "NAME=RPS"),
        (("--throughput", "100", "--availability", "99.9"), "availability"),
        (("--throughput", "100", "--price", "prices.vms=1=2"), "prices.vms: expected dict"),
    ],
)
def test_command_errors_are_one_line(
    argv: tuple[str, ...], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(*argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("batchserve: error: ")
    assert len(err.strip().splitlines()) == 1
    assert any(part in err for part in message.split("|"))


def test_importing_the_command_loads_neither_simpy_nor_matplotlib() -> None:
    code = (
        "import sys, batchserve.cost.command; "
        "sys.exit(bool({'simpy', 'matplotlib'} & set(sys.modules)))"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_estimates_match_a_recomputation_from_the_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cost.json"
    assert run("--throughput", "3000", "--platforms", "aml-cpu", "--json", str(out)) == 0
    capsys.readouterr()
    (e,) = json.loads(out.read_text())["estimates"]
    # 1000 / (3000 * 0.7) -> 1 replica, +1 spare, the deployment's 2 instances of DS3_v2.
    assert e["replicas"] == 2
    assert e["monthly_usd"] == pytest.approx(
        2 * load_pricing().vms["Standard_DS3_v2"].usd_per_hour * 730
    )
    assert e["usd_per_million"] == pytest.approx(e["monthly_usd"] / 2628)
    assert not math.isnan(e["usd_per_million"])
