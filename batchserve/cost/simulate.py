"""Past one machine, on paper: replay a request-rate trace through an autoscaled fleet.

SimPy runs the control loops as processes: the KEDA/HPA (or Container Apps) scaler polling its
metric, the cluster autoscaler adding and removing nodes, and each pod or node that is starting.
Nothing happens per request or per second: the fleet records each change of state, and the
per-second figures (load per replica, p99 from the measured latency curve, SLO attainment,
cost) are computed afterwards with numpy over the whole trace. A day of one-second steps takes
well under a second per platform.

Approximations, on purpose:
- Every request in a second sees that second's load per ready replica; the replica's p99 at that
  load comes from the `bench --sweep` curve. Under the capacity at the SLO all of the second's
  requests count as attained; above it, only the share the capacity covers (the rest are misses).
  With no ready replica (cold start) every request of the second is a miss.
- Load is spread evenly over ready replicas; queues do not carry over from one second to the next.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from batchserve.cost.capacity import LatencyCurve
from batchserve.cost.errors import CostError
from batchserve.cost.model import (
    SECONDS_PER_MONTH,
    PlanInputs,
    ReplicaSeconds,
    container_apps_bill,
    estimate,
    fixed_usd_per_hour,
    node_usd_per_hour,
)
from batchserve.cost.pricing import Platform, Pricing

if TYPE_CHECKING:
    import simpy

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class KedaHpaRules:
    """The scaling rules of the shipped KEDA ScaledObject and the HPA behaviour it sets
    (deploy/k8s/components/autoscaling-keda/scaledobject.yaml); change both together.

    polling_interval_s: ScaledObject pollingInterval; the HPA's sync period is also 15 s, so
        one decision per 15 s is modelled.
    cooldown_period_s: ScaledObject cooldownPeriod (KEDA's default): with minReplicaCount 0,
        how long without traffic before scaling to zero.
    metric_window_s: the trigger's query averages over this window (`avg_over_time(...[1m])`),
        so a jump is seen gradually.
    scale_up/down_stabilization_s: behavior stabilizationWindowSeconds.
    scale_up_percent, scale_up_pods, scale_up_period_s: scale-up policies (selectPolicy Max):
        per period, the larger of +100% and +4 pods.
    scale_down_percent, scale_down_period_s: at most 25% fewer replicas per minute.
    tolerance: HPA ignores a metric within this fraction of its target.

    The trigger's per-replica in-flight threshold is represented by its rate equivalent,
    capacity x utilisation (Little's law at the planned load).
    """

    polling_interval_s: float = 15.0
    cooldown_period_s: float = 300.0
    metric_window_s: float = 60.0
    scale_up_stabilization_s: float = 30.0
    scale_down_stabilization_s: float = 300.0
    scale_up_percent: float = 100.0
    scale_up_pods: int = 4
    scale_up_period_s: float = 60.0
    scale_down_percent: float = 25.0
    scale_down_period_s: float = 60.0
    tolerance: float = 0.1

    def up_limit(self, base: int) -> int:
        """Most replicas allowed, given the count one scale-up period ago."""
        if base == 0:
            return 1  # KEDA activates 0 -> 1; the HPA takes over from one replica
        return max(math.ceil(base * (1 + self.scale_up_percent / 100)), base + self.scale_up_pods)

    def down_limit(self, base: int) -> int:
        """Fewest replicas allowed, given the count one scale-down period ago."""
        return math.ceil(base * (1 - self.scale_down_percent / 100))


@dataclass(frozen=True, slots=True)
class ContainerAppsRules:
    """Container Apps' documented scale behaviour: polling 30 s, cooldown 300 s, scale-down
    stabilisation 300 s, scale-up steps of 1, 4, 8, 16, 32, ... replicas, scale-down of every
    replica not needed. The HTTP rule's concurrent-request target is taken as the concurrency one
    replica carries at its planned rate (Little's law), so it acts as a per-replica rate target
    read without a rate window."""

    polling_interval_s: float = 30.0
    cooldown_period_s: float = 300.0
    metric_window_s: float = 1.0
    scale_up_stabilization_s: float = 0.0
    scale_down_stabilization_s: float = 300.0
    scale_up_period_s: float = 30.0
    scale_down_period_s: float = 30.0
    tolerance: float = 0.1

    def up_limit(self, base: int) -> int:
        if base == 0:
            return 1
        return max(4, 2 * base)

    def down_limit(self, base: int) -> int:
        return 0


@dataclass(frozen=True, slots=True)
class Delays:
    """How long capacity takes to arrive (and leave).

    pod_start_s: container start, model load, warm-up, readiness probe (AKS, free node).
    node_provision_s / gpu_node_provision_s: cluster autoscaler adds a VM to the pool and it
        joins (GPU: driver, device plugin and a multi-GB image on top).
    node_scale_down_s: cluster autoscaler's scale-down-unneeded-time (10 min default).
    cold_start_s / gpu_cold_start_s: a Container Apps replica from request to ready.
    """

    pod_start_s: float = 20.0
    node_provision_s: float = 180.0
    gpu_node_provision_s: float = 300.0
    node_scale_down_s: float = 600.0
    cold_start_s: float = 20.0
    gpu_cold_start_s: float = 60.0


@dataclass(frozen=True, slots=True)
class SimConfig:
    plan: PlanInputs = field(default_factory=PlanInputs)
    keda: KedaHpaRules = field(default_factory=KedaHpaRules)
    container_apps: ContainerAppsRules = field(default_factory=ContainerAppsRules)
    delays: Delays = field(default_factory=Delays)
    max_replicas: int = 1000
    cluster_autoscaler_scan_s: float = 10.0


@dataclass(slots=True)
class SimResult:
    platform: str
    controller: str
    requests: float
    attainment: float
    replica_hours: float
    node_hours: float
    cost_usd: float
    peak_replicas: int
    replicas: FloatArray = field(repr=False)
    p99_ms: FloatArray = field(repr=False)

    @property
    def usd_per_million(self) -> float:
        return self.cost_usd / (self.requests / 1e6) if self.requests else math.inf

    def summary(self) -> dict[str, Any]:
        return {
            "platform": self.platform,
            "controller": self.controller,
            "requests": self.requests,
            "slo_attainment": self.attainment,
            "replica_hours": self.replica_hours,
            "node_hours": self.node_hours,
            "cost_usd": self.cost_usd,
            "usd_per_million": self.usd_per_million,
            "peak_replicas": self.peak_replicas,
        }


# ---------------------------------------------------------------------------------------------
# the fleet: state that the control loops change, with a timeline of every change


class Fleet:
    """Pods (starting or ready) on nodes (provisioning or ready). Without a node pool
    (Container Apps, Azure ML) every pod has a place at once."""

    def __init__(
        self,
        env: simpy.Environment,
        pod_start_s: float,
        per_node: int | None,
        node_provision_s: float,
    ) -> None:
        import simpy

        self.env = env
        self.pod_start_s = pod_start_s
        self.per_node = per_node
        self.node_provision_s = node_provision_s
        self.ready = 0
        self.starting: list[simpy.Process] = []
        self.nodes_ready = 0
        self.nodes_pending = 0
        self.slots = simpy.Container(env, init=0) if per_node else None
        self.timeline: list[tuple[float, int, int, int]] = []

    @property
    def spec(self) -> int:
        return self.ready + len(self.starting)

    def record(self) -> None:
        self.timeline.append(
            (self.env.now, self.ready, self.spec, self.nodes_ready + self.nodes_pending)
        )

    def warm(self, replicas: int) -> None:
        """Start the trace with `replicas` ready (and their nodes), as after a quiet period."""
        self.ready = replicas
        if self.per_node and self.slots is not None:
            self.nodes_ready = math.ceil(replicas / self.per_node)
            free = self.nodes_ready * self.per_node - replicas
            if free:
                self.slots.put(free)
        self.record()

    def scale_to(self, replicas: int) -> None:
        while self.spec < replicas:
            self.starting.append(self.env.process(self._pod()))
        while self.spec > replicas:
            if self.starting:
                self.starting.pop().interrupt()  # the newest start is the one cancelled
            else:
                self.ready -= 1
                self._free_slot()
        self._provision_nodes()
        self.record()

    def _free_slot(self) -> None:
        if self.slots is not None:
            self.slots.put(1)

    def _pod(self) -> Generator[simpy.Event, Any, None]:
        import simpy

        holding = False
        try:
            if self.slots is not None:
                request = self.slots.get(1)
                try:
                    yield request
                except simpy.Interrupt:
                    request.cancel()
                    return
                holding = True
            yield self.env.timeout(self.pod_start_s)
        except simpy.Interrupt:
            if holding:
                self._free_slot()
            return
        self.starting.remove(self.env.active_process)  # type: ignore[arg-type]
        self.ready += 1
        self.record()

    def _provision_nodes(self) -> None:
        if not self.per_node:
            return
        wanted = math.ceil(self.spec / self.per_node)
        for _ in range(wanted - self.nodes_ready - self.nodes_pending):
            self.nodes_pending += 1
            self.env.process(self._node())

    def _node(self) -> Generator[simpy.Event, Any, None]:
        yield self.env.timeout(self.node_provision_s)
        assert self.slots is not None
        assert self.per_node
        self.nodes_pending -= 1
        self.nodes_ready += 1
        self.slots.put(self.per_node)
        self.record()

    def remove_idle_nodes(self, count: int) -> None:
        assert self.slots is not None
        assert self.per_node
        self.slots.get(count * self.per_node)  # the level is known to cover it
        self.nodes_ready -= count
        self.record()


# ---------------------------------------------------------------------------------------------
# control loops


Rules = KedaHpaRules | ContainerAppsRules


def scaler(
    env: simpy.Environment,
    fleet: Fleet,
    metric: Callable[[float, float], float],
    rules: Rules,
    target_rps: float,
    bounds: tuple[int, int],
) -> Generator[simpy.Event, Any, None]:
    """HPA-style: desired = ceil(metric / per-replica target), within the tolerance, the
    stabilisation windows and the scale-up limit; KEDA handles 0 <-> 1 with its cooldown."""
    low, high = bounds
    history: deque[tuple[float, int]] = deque()
    sizes: deque[tuple[float, int]] = deque([(env.now, fleet.spec)])
    last_traffic = env.now
    keep = max(rules.scale_up_stabilization_s, rules.scale_down_stabilization_s)
    while True:
        yield env.timeout(rules.polling_interval_s)
        value = metric(env.now, rules.metric_window_s)
        current = fleet.spec
        if value > 0:
            last_traffic = env.now
        elif low == 0 and current and env.now - last_traffic >= rules.cooldown_period_s:
            # KEDA itself scales to zero after the cooldown, bypassing the HPA's windows.
            history.clear()
            fleet.scale_to(0)
            sizes.append((env.now, 0))
            continue
        wanted = _recommend(value, current, target_rps, rules.tolerance)
        if current:
            wanted = max(wanted, 1)  # the HPA under KEDA never goes below one replica
        wanted = min(max(wanted, low), high)
        history.append((env.now, wanted))
        while history and history[0][0] < env.now - keep:
            history.popleft()
        size = _stabilised(history, current, env.now, rules, sizes)
        fleet.scale_to(size)
        sizes.append((env.now, size))
        while len(sizes) > 1 and sizes[1][0] <= env.now - keep:
            sizes.popleft()


def _recommend(value: float, current: int, target_rps: float, tolerance: float) -> int:
    if value <= 0:
        return 0
    if current and abs(value / (current * target_rps) - 1) <= tolerance:
        return current
    return math.ceil(value / target_rps)


def _stabilised(
    history: deque[tuple[float, int]],
    current: int,
    now: float,
    rules: Rules,
    sizes: deque[tuple[float, int]],
) -> int:
    """The HPA's stabilisation (up: the lowest recommendation in the window; down: the highest)
    and its rate policies (relative to the size one policy period ago)."""
    latest = history[-1][1]
    if latest > current:
        window = [w for t, w in history if t >= now - rules.scale_up_stabilization_s]
        base = _size_at(sizes, now - rules.scale_up_period_s)
        return max(current, min(min(window), rules.up_limit(base)))
    if latest < current:
        window = [w for t, w in history if t >= now - rules.scale_down_stabilization_s]
        base = _size_at(sizes, now - rules.scale_down_period_s)
        return min(current, max(max(window), rules.down_limit(base)))
    return current


def _size_at(sizes: deque[tuple[float, int]], when: float) -> int:
    """The replica count the scaler had set at `when` (the oldest known, if earlier)."""
    size = sizes[0][1]
    for t, value in sizes:
        if t > when:
            break
        size = value
    return size


def cluster_autoscaler(
    env: simpy.Environment, fleet: Fleet, scan_s: float, unneeded_s: float
) -> Generator[simpy.Event, Any, None]:
    """Remove ready nodes that no pod needs once they have been unneeded for `unneeded_s`."""
    assert fleet.per_node
    surplus_since: float | None = None
    while True:
        yield env.timeout(scan_s)
        needed = math.ceil(fleet.spec / fleet.per_node)
        surplus = fleet.nodes_ready + fleet.nodes_pending - needed
        if surplus <= 0 or fleet.nodes_pending:
            surplus_since = None
            continue
        if surplus_since is None:
            surplus_since = env.now
        elif env.now - surplus_since >= unneeded_s:
            fleet.remove_idle_nodes(min(surplus, fleet.nodes_ready))
            surplus_since = None


# ---------------------------------------------------------------------------------------------
# running one platform


def simulate(
    platform: Platform,
    pricing: Pricing,
    trace: FloatArray,
    curve: LatencyCurve,
    config: SimConfig = SimConfig(),
) -> SimResult:
    """Replay `trace` (requests per second, one value per second) on `platform`, whose replicas
    follow `curve` (already scaled to the platform's capacity)."""
    import simpy

    if trace.ndim != 1 or not trace.size:
        raise CostError("the trace must be a non-empty series of rates")
    env = simpy.Environment()
    fleet, controller = _build(env, platform, pricing, trace, curve, config)
    env.run(until=float(trace.size))
    fleet.record()
    return _evaluate(platform, pricing, trace, curve, fleet, controller)


def _build(
    env: simpy.Environment,
    platform: Platform,
    pricing: Pricing,
    trace: FloatArray,
    curve: LatencyCurve,
    config: SimConfig,
) -> tuple[Fleet, str]:
    target = curve.capacity_rps * config.plan.utilisation
    gpu = platform.device == "gpu"
    delays = config.delays
    if platform.service == "azure_ml":
        # Managed endpoints are priced here as provisioned for the planned rate (no autoscale).
        fleet = Fleet(env, delays.pod_start_s, None, 0.0)
        planned = estimate(platform, pricing, curve.capacity_rps, config.plan)
        fleet.warm(planned.replicas)
        return fleet, "static"
    metric = _metric(trace)
    bounds = (platform.min_replicas, config.max_replicas)
    start = min(max(_recommend(float(trace[0]), 0, target, 0.0), bounds[0]), bounds[1])
    rules: Rules
    if platform.service == "aks":
        provision = delays.gpu_node_provision_s if gpu else delays.node_provision_s
        fleet = Fleet(env, delays.pod_start_s, platform.replicas_per_node, provision)
        rules, name = config.keda, "keda-hpa"
        env.process(
            cluster_autoscaler(
                env, fleet, config.cluster_autoscaler_scan_s, delays.node_scale_down_s
            )
        )
    else:
        cold = delays.gpu_cold_start_s if gpu else delays.cold_start_s
        fleet = Fleet(env, cold, None, 0.0)
        rules, name = config.container_apps, "container-apps"
    fleet.warm(start)
    env.process(scaler(env, fleet, metric, rules, target, bounds))
    return fleet, name


def _metric(trace: FloatArray) -> Callable[[float, float], float]:
    """Mean offered rate over the `window` seconds before `now` (prefix sums: O(1) a query).
    Offered, not served: the shipped triggers (in-flight requests, queued rows) keep growing with
    the offered load while the fleet is saturated."""
    sums = np.concatenate(([0.0], np.cumsum(trace)))

    def mean(now: float, window: float) -> float:
        end = min(int(now), trace.size)
        begin = max(0, end - max(1, int(window)))
        return float((sums[end] - sums[begin]) / (end - begin)) if end > begin else 0.0

    return mean


def _series(fleet: Fleet, seconds: int) -> tuple[FloatArray, FloatArray, FloatArray]:
    """(ready, pods, nodes) per second from the change timeline."""
    times = np.array([t for t, *_ in fleet.timeline], dtype=np.float64)
    values = np.array([v for _, *v in fleet.timeline], dtype=np.float64)
    index = np.searchsorted(times, np.arange(seconds, dtype=np.float64), side="right") - 1
    picked = values[np.maximum(index, 0)]
    return picked[:, 0], picked[:, 1], picked[:, 2]


def _evaluate(
    platform: Platform,
    pricing: Pricing,
    trace: FloatArray,
    curve: LatencyCurve,
    fleet: Fleet,
    controller: str,
) -> SimResult:
    ready, pods, nodes = _series(fleet, trace.size)
    attained, p99 = _slo(trace, ready, curve)
    total = float(trace.sum())
    hours = trace.size / 3600.0
    if platform.service == "container_apps":
        cost, node_hours = _container_apps_cost(platform, pricing, trace, pods), 0.0
    else:
        per_node = platform.replicas_per_node
        billed = nodes if platform.service == "aks" else np.ceil(pods / per_node)
        node_hours = float(billed.sum() / 3600.0)
        price = node_usd_per_hour(platform, pricing)
        cost = node_hours * price + fixed_usd_per_hour(platform, pricing) * hours
    return SimResult(
        platform=platform.name,
        controller=controller,
        requests=total,
        attainment=float((trace * attained).sum() / total) if total else 1.0,
        replica_hours=float(pods.sum() / 3600.0),
        node_hours=float(node_hours),
        cost_usd=float(cost),
        peak_replicas=int(pods.max()),
        replicas=ready,
        p99_ms=p99,
    )


def _slo(
    trace: FloatArray, ready: FloatArray, curve: LatencyCurve
) -> tuple[FloatArray, FloatArray]:
    """Per second: the share of requests under the SLO, and the replicas' p99 (NaN when idle)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        load = np.where(ready > 0, trace / np.maximum(ready, 1), np.inf)
        share = np.where(load <= curve.capacity_rps, 1.0, curve.capacity_rps / load)
    share = np.where(trace > 0, share, 1.0)
    p99 = np.interp(np.minimum(load, curve.rates[-1]), curve.rates, curve.p99_ms)
    p99 = np.where(load > curve.rates[-1], curve.overload_p99_ms, p99)
    p99 = np.where(trace > 0, p99, np.nan)
    return share, p99


def _container_apps_cost(
    platform: Platform, pricing: Pricing, trace: FloatArray, pods: FloatArray
) -> float:
    busy = trace > 0
    usage = ReplicaSeconds(
        active=float(pods[busy].sum()),
        idle=float(pods[~busy].sum()),
        requests=float(trace.sum()),
    )
    bill = container_apps_bill(platform, pricing, usage, grant_share=trace.size / SECONDS_PER_MONTH)
    return sum(bill.values())
