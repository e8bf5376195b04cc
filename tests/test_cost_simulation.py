"""The simulation's queue, scalers and delays, on small deterministic traces computed by hand."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import test_cost as base

from batchserve.cost import CostError, PlanInputs, load_pricing
from batchserve.cost.capacity import LatencyCurve
from batchserve.cost.pricing import Pricing, parse_pricing
from batchserve.cost.queueing import outside_share
from batchserve.cost.trace import flat

pytest.importorskip("simpy")
from batchserve.cost import simulate as sim  # needs SimPy

SLO_MS = 100.0


def table(*platforms: dict[str, Any]) -> Pricing:
    raw = base.small_table()
    raw["platforms"].extend(platforms)
    return parse_pricing(raw)


def curve(capacity: float, mean_ms: float | None = None) -> LatencyCurve:
    """p99 10 ms at half the capacity, 50 ms at it; a constant mean latency if given."""
    means = None if mean_ms is None else (mean_ms,) * 3
    return LatencyCurve(
        (capacity / 2, capacity, capacity * 1.5), (10.0, 50.0, 2000.0), capacity, SLO_MS, means
    )


# ---------------------------------------------------------------------------------------------
# the queue


def test_the_share_of_a_second_that_waits_past_the_slo() -> None:
    # Drained at 100 req/s, the SLO's worth of queue is 10 requests.
    assert outside_share(0, 50, 100, 0.1) == 0.0  # under capacity, no queue
    assert outside_share(0, 110, 100, 0.1) == 0.0  # reaches 10 only at the second's end
    assert outside_share(0, 120, 100, 0.1) == pytest.approx(0.5)  # 10 queued at half-time
    assert outside_share(10, 110, 100, 0.1) == 1.0
    assert outside_share(30, 60, 100, 0.1) == pytest.approx(0.5)  # drains to 10 at half-time
    assert outside_share(10, 100, 100, 0.1) == 0.0
    assert outside_share(11, 100, 100, 0.1) == 1.0


FIXED = {"name": "fixed", "service": "aks", "device": "cpu", "vm": "cpu-vm", "min_replicas": 1,
         "max_replicas": 1, "control_plane": "free"}  # fmt: skip


def test_a_load_above_capacity_builds_a_backlog_and_misses_the_slo() -> None:
    pricing = table(FIXED)
    trace = flat(110.0, 371)  # one replica of 100 req/s at 110% for 371 s
    config = sim.SimConfig(plan=PlanInputs(target_rps=100), request_timeout_s=1e6)
    result = sim.simulate(pricing.platform("fixed"), pricing, trace, curve(100), config)
    # 10 more requests queue each second; from the second second on, the queue holds at
    # least one SLO's worth (10) and every arrival waits longer than the SLO.
    assert result.backlog.tolist() == pytest.approx([10.0 * (t + 1) for t in range(371)])
    assert result.attainment == pytest.approx(1 / 371)
    assert result.dropped == 0.0
    assert result.p99_ms[-1] > 30_000  # 3,710 queued at 100 req/s: a 37 s wait


def test_the_backlog_is_bounded_by_the_request_timeout_and_drains() -> None:
    pricing = table(FIXED)
    trace = np.concatenate([flat(110.0, 300), flat(50.0, 100)])
    config = sim.SimConfig(plan=PlanInputs(target_rps=100), request_timeout_s=10.0)
    result = sim.simulate(pricing.platform("fixed"), pricing, trace, curve(100), config)
    # At most 10 s of work (1,000 requests) waits; the rest of the excess is dropped.
    assert result.backlog[99] == pytest.approx(1000)
    assert result.backlog[299] == pytest.approx(1000)
    assert result.dropped == pytest.approx(300 * 10 - 1000)
    # Then it drains at 50 req/s: 20 s to empty.
    assert result.backlog[318] == pytest.approx(50)
    assert result.backlog[319] == 0.0
    # Within the SLO: the first second, then the arrivals once the queue is under 10 again.
    drained = 50 * 0.2  # second 319 starts with 50 queued, under 10 after 0.8 s
    assert result.attainment == pytest.approx((110 + drained + 80 * 50) / trace.sum())


# ---------------------------------------------------------------------------------------------
# the scalers read the shipped signal


def keda_platform(target: float) -> dict[str, Any]:
    return {"name": "keda", "service": "aks", "device": "cpu", "vm": "cpu-vm",
            "replicas_per_node": 3, "min_replicas": 2, "max_replicas": 20,
            "control_plane": "free", "in_flight_target": target}  # fmt: skip


@pytest.mark.parametrize("load", [0.9, 1.2])
def test_keda_scales_at_the_shipped_in_flight_threshold(load: float) -> None:
    # The target is the shipped one (a test keeps it equal to the ScaledObject's threshold).
    target = load_pricing().platform("aks-cpu").in_flight_target
    assert target is not None
    pricing = table(keda_platform(target))
    capacity = 100.0
    # A constant mean latency makes in flight = rate x mean: the target sits at 60% of capacity.
    mean_ms = 1000 * target / (0.6 * capacity)
    per_replica = load * 0.6 * capacity
    # A minute at half the target, then the load: two replicas to start with.
    trace = np.concatenate([flat(2 * 0.5 * 0.6 * capacity, 60), flat(2 * per_replica, 600)])
    config = sim.SimConfig(plan=PlanInputs(target_rps=100))
    result = sim.simulate(
        pricing.platform("keda"), pricing, trace, curve(capacity, mean_ms), config
    )
    assert result.signal == f"in flight, {target:g} per replica"
    assert result.in_flight[0] == pytest.approx(target)  # 2 x half the target
    assert result.in_flight[60] == pytest.approx(2 * per_replica * mean_ms / 1000)
    if load < 1:  # 90% of the target per replica: within the HPA's 10% tolerance
        assert set(result.replicas.tolist()) == {2.0}
    else:
        # 120%: the 1-minute average passes 110% of the target at the 120 s poll, and the
        # 30 s scale-up window's lowest recommendation is 3 at 150 s; the pod is ready 20 s on.
        assert result.replicas[169] == 2
        assert result.replicas[170] == 3
        assert result.replicas[-1] == 3


def test_without_mean_latencies_the_scaler_uses_the_rate_equivalent() -> None:
    pricing = table(keda_platform(24))
    config = sim.SimConfig(plan=PlanInputs(target_rps=100, utilisation=0.5))
    result = sim.simulate(pricing.platform("keda"), pricing, flat(150.0, 120), curve(100), config)
    assert result.signal == "offered rate, 50 req/s per replica"
    assert result.replicas[-1] == 3


AML = {"name": "aml-auto", "service": "azure_ml", "device": "cpu", "vm": "cpu-vm",
       "min_replicas": 2, "max_replicas": 6}  # fmt: skip


def test_azure_ml_scales_out_on_utilisation_with_a_cooldown() -> None:
    pricing = table(AML)
    # Two replicas of 100 req/s at 90% utilisation; a new instance takes 100 s.
    trace = flat(180.0, 1200)
    delays = sim.Delays(aml_instance_start_s=100)
    config = sim.SimConfig(plan=PlanInputs(target_rps=100, utilisation=1.0), delays=delays)
    result = sim.simulate(pricing.platform("aml-auto"), pricing, trace, curve(100), config)
    assert result.controller == "azure-monitor"
    # First evaluation at 60 s: 90% > 70% -> one more instance, ready at 160 s; at 60% the
    # rules hold (between 25% and 70%).
    assert result.replicas[159] == 2
    assert result.replicas[160] == 3
    assert set(result.replicas[160:].tolist()) == {3.0}
    assert result.node_hours == pytest.approx((2 * 60 + 3 * 1140) / 3600)  # billed from 60 s


def test_azure_ml_scales_in_one_instance_per_cooldown() -> None:
    pricing = table(AML)
    rules = sim.AzureMonitorRules()
    trace = np.concatenate([flat(400.0, 60), flat(10.0, 3000)])
    config = sim.SimConfig(plan=PlanInputs(target_rps=100, utilisation=1.0))
    result = sim.simulate(pricing.platform("aml-auto"), pricing, trace, curve(100), config)
    # Warm for 400 req/s at 100%: 4 instances. Utilisation falls under 25% over the
    # 10-minute window within the first minutes; then one instance per 5-minute cooldown.
    assert result.replicas[0] == 4
    steps = np.flatnonzero(np.diff(result.replicas))
    assert result.replicas[-1] == 2
    assert len(steps) == 2
    assert steps[1] - steps[0] == pytest.approx(rules.cooldown_s, abs=rules.evaluation_s)


# ---------------------------------------------------------------------------------------------
# the delays are flags


def test_every_delay_is_a_flag_and_reaches_the_simulation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace = tmp_path / "trace.csv"
    trace.write_text("0,2000\n300,12000\n1500,0\n")
    flags = [f"--{name.replace('_', '-')}" for name in sim.Delays.__dataclass_fields__]

    def day(*extra: str) -> dict[str, Any]:
        out = tmp_path / "cost.json"
        argv = ("--throughput", "3000", "--platforms", "aks-cpu", "--simulate", str(trace))
        assert base.run(*argv, *extra, "--json", str(out)) == 0
        data: dict[str, Any] = json.loads(out.read_text())["simulation"]
        return data

    quick = day(*(arg for flag in flags for arg in (flag, "1")))
    assert set(quick["config"]["delays"].values()) == {1.0}
    slow = day("--node-provision-s", "900", "--pod-start-s", "120")
    assert slow["config"]["delays"]["node_provision_s"] == 900
    assert slow["config"]["delays"]["pod_start_s"] == 120
    (fast_result,), (slow_result,) = quick["results"], slow["results"]
    assert slow_result["slo_attainment"] < fast_result["slo_attainment"]
    capsys.readouterr()
    assert base.run("--throughput", "3000", "--simulate", str(trace), "--image-pull-s", "-1") == 2
    assert "image-pull-s must be >= 0" in capsys.readouterr().err


def test_delays_are_validated() -> None:
    with pytest.raises(CostError, match="pod-start-s"):
        sim.Delays(pod_start_s=-1)
