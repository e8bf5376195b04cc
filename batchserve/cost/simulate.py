"""Past one machine, on paper: replay a request-rate trace through an autoscaled fleet.

SimPy runs the control loops as processes: the KEDA/HPA, Container Apps or Azure Monitor scaler
polling its metric, the cluster autoscaler adding and removing nodes, and each pod, node or
instance that is starting. The fleet records each change of state; the queue in front of the
ready replicas (`queueing.Backlog`) is computed second by second from that record, lazily, up to
the moment a scaler reads its signal, so the scalers see what their real triggers would: requests
in flight (Little's law on the measured latency curve, plus the backlog) or utilisation.

Approximations, on purpose:
- Load is spread evenly over ready replicas, which drain a shared backlog at their capacity at
  the SLO; a request counts within the SLO if its wait in the backlog is at most the SLO (a
  lenient bound: its own service time is not added). Requests past the server's request timeout
  are dropped; with no ready replica every request of that second is a miss.
- One row per request: the queue-rows trigger never asks for more replicas than the in-flight
  one (every queued row is a request in flight, and its threshold is not lower), so only the
  in-flight trigger is modelled.
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
from batchserve.cost.fleet import Fleet
from batchserve.cost.model import (
    SECONDS_PER_MONTH,
    PlanInputs,
    ReplicaSeconds,
    around_the_replicas,
    container_apps_bill,
    fixed_usd_per_hour,
    node_usd_per_hour,
)
from batchserve.cost.pricing import Platform, Pricing
from batchserve.cost.queueing import Backlog
from batchserve.cost.rules import AzureMonitorRules, ContainerAppsRules, Delays, KedaHpaRules

__all__ = [
    "REQUEST_TIMEOUT_S",
    "AzureMonitorRules",
    "ContainerAppsRules",
    "Delays",
    "KedaHpaRules",
    "SimConfig",
    "SimResult",
    "simulate",
]

if TYPE_CHECKING:
    import simpy

FloatArray = npt.NDArray[np.float64]
# BATCHSERVE_REQUEST_TIMEOUT_MS in every shipped manifest: the server answers 504 at this age.
REQUEST_TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True)
class SimConfig:
    """plan: the steady-state inputs (utilisation is the fallback rate target; the request and
    response sizes price the data). request_timeout_s: the server's deadline
    (BATCHSERVE_REQUEST_TIMEOUT_MS in the shipped manifests): longer waits are dropped.
    max_replicas: the bound where a platform names none."""

    plan: PlanInputs = field(default_factory=PlanInputs)
    keda: KedaHpaRules = field(default_factory=KedaHpaRules)
    container_apps: ContainerAppsRules = field(default_factory=ContainerAppsRules)
    azure_ml: AzureMonitorRules = field(default_factory=AzureMonitorRules)
    delays: Delays = field(default_factory=Delays)
    request_timeout_s: float = REQUEST_TIMEOUT_S
    max_replicas: int = 1000
    cluster_autoscaler_scan_s: float = 10.0


@dataclass(slots=True)
class SimResult:
    platform: str
    controller: str
    signal: str
    requests: float
    attainment: float
    dropped: float
    replica_hours: float
    node_hours: float
    cost_usd: float
    peak_replicas: int
    breakdown: dict[str, float] = field(repr=False)
    replicas: FloatArray = field(repr=False)
    p99_ms: FloatArray = field(repr=False)
    backlog: FloatArray = field(repr=False)
    in_flight: FloatArray = field(repr=False)

    @property
    def usd_per_million(self) -> float:
        return self.cost_usd / (self.requests / 1e6) if self.requests else math.inf

    def summary(self) -> dict[str, Any]:
        return {
            "platform": self.platform,
            "controller": self.controller,
            "signal": self.signal,
            "requests": self.requests,
            "slo_attainment": self.attainment,
            "dropped": self.dropped,
            "replica_hours": self.replica_hours,
            "node_hours": self.node_hours,
            "cost_usd": self.cost_usd,
            "breakdown": self.breakdown,
            "usd_per_million": self.usd_per_million,
            "peak_replicas": self.peak_replicas,
            "max_backlog": float(self.backlog.max()),
        }


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


def azure_monitor(
    env: simpy.Environment,
    fleet: Fleet,
    utilisation: Callable[[float, float], float],
    rules: AzureMonitorRules,
    bounds: tuple[int, int],
) -> Generator[simpy.Event, Any, None]:
    """Azure Monitor autoscale: threshold rules on windowed utilisation (percent), a fixed
    step, and a cooldown after every action. A scale-out rule wins over a scale-in one."""
    low, high = bounds
    last_action = -math.inf
    while True:
        yield env.timeout(rules.evaluation_s)
        if env.now - last_action < rules.cooldown_s:
            continue
        size = fleet.spec
        busy = 100 * utilisation(env.now, rules.scale_out_window_s)
        idle = 100 * utilisation(env.now, rules.scale_in_window_s)
        if busy > rules.scale_out_above and size < high:
            fleet.scale_to(min(high, size + rules.step))
            last_action = env.now
        elif idle < rules.scale_in_below and size > low:
            fleet.scale_to(max(low, size - rules.step))
            last_action = env.now


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
    if not config.request_timeout_s > 0:
        raise CostError("the request timeout must be > 0 s")
    env = simpy.Environment()
    fleet = _fleet(env, platform, config)
    queue = Backlog(trace, curve, fleet.timeline, config.request_timeout_s)
    controller, signal = _control(env, fleet, queue, platform, curve, config)
    env.run(until=float(trace.size))
    fleet.record()
    queue.advance(trace.size)
    return _evaluate(platform, pricing, queue, fleet, config, (controller, signal))


def _fleet(env: simpy.Environment, platform: Platform, config: SimConfig) -> Fleet:
    delays, gpu = config.delays, platform.device == "gpu"
    if platform.service == "azure_ml":
        start = delays.gpu_aml_instance_start_s if gpu else delays.aml_instance_start_s
        return Fleet(env, start, None, 0.0)
    if platform.service == "aks":
        provision = delays.gpu_node_provision_s if gpu else delays.node_provision_s
        return Fleet(
            env, delays.pod_start_s, platform.replicas_per_node, provision + delays.image_pull_s
        )
    return Fleet(env, delays.gpu_cold_start_s if gpu else delays.cold_start_s, None, 0.0)


def _bounds(platform: Platform, config: SimConfig) -> tuple[int, int]:
    high = platform.max_replicas if platform.max_replicas is not None else config.max_replicas
    return platform.min_replicas, high


def _control(
    env: simpy.Environment,
    fleet: Fleet,
    queue: Backlog,
    platform: Platform,
    curve: LatencyCurve,
    config: SimConfig,
) -> tuple[str, str]:
    """Start the fleet warm for the first second's load and its scaler; (controller, signal)."""
    low, high = bounds = _bounds(platform, config)
    planned = curve.capacity_rps * config.plan.utilisation
    first = float(queue.trace[0])
    fleet.warm(min(max(_warm_size(first, platform, curve, planned), low), high))
    if platform.service == "azure_ml":
        rules = config.azure_ml
        env.process(azure_monitor(env, fleet, queue.served_share, rules, bounds))
        signal = f"utilisation > {rules.scale_out_above:g}% / < {rules.scale_in_below:g}%"
        return "azure-monitor", signal
    metric, target, signal = _signal(queue, platform, curve, planned)
    if platform.service == "aks":
        env.process(
            cluster_autoscaler(
                env, fleet, config.cluster_autoscaler_scan_s, config.delays.node_scale_down_s
            )
        )
        env.process(scaler(env, fleet, metric, config.keda, target, bounds))
        return "keda-hpa", signal
    env.process(scaler(env, fleet, metric, config.container_apps, target, bounds))
    return "container-apps", signal


def _warm_size(rate: float, platform: Platform, curve: LatencyCurve, planned_rps: float) -> int:
    """Replicas the scaler would settle on for `rate`: the fewest whose in flight per replica is
    within the target (or, on the rate signal, whose rate per replica is)."""
    target = platform.in_flight_target
    if target is None or curve.mean_ms is None or platform.service == "azure_ml":
        return _recommend(rate, 0, planned_rps, 0.0)
    size = max(1, math.ceil(rate / curve.capacity_rps))
    while rate > 0 and curve.in_flight(rate / size) > target:
        size += 1
    return size if rate > 0 else 0


def _signal(
    queue: Backlog, platform: Platform, curve: LatencyCurve, planned_rps: float
) -> tuple[Callable[[float, float], float], float, str]:
    """The shipped trigger where the curve can say what it reads (in flight per replica);
    otherwise its rate equivalent at the planned utilisation."""
    if platform.in_flight_target is not None and curve.mean_ms is not None:
        target = platform.in_flight_target
        return queue.mean_in_flight, target, f"in flight, {target:g} per replica"
    return _offered(queue.trace), planned_rps, f"offered rate, {planned_rps:,.0f} req/s per replica"


def _offered(trace: FloatArray) -> Callable[[float, float], float]:
    """Mean offered rate over the `window` seconds before `now` (prefix sums: O(1) a query)."""
    sums = np.concatenate(([0.0], np.cumsum(trace)))

    def mean(now: float, window: float) -> float:
        end = min(int(now), trace.size)
        begin = max(0, end - max(1, int(window)))
        return float((sums[end] - sums[begin]) / (end - begin)) if end > begin else 0.0

    return mean


def _series(fleet: Fleet, seconds: int) -> tuple[FloatArray, FloatArray]:
    """(pods, nodes) per second from the change timeline."""
    times = np.array([t for t, *_ in fleet.timeline], dtype=np.float64)
    values = np.array([v for _, *v in fleet.timeline], dtype=np.float64)
    index = np.searchsorted(times, np.arange(seconds, dtype=np.float64), side="right") - 1
    picked = values[np.maximum(index, 0)]
    return picked[:, 1], picked[:, 2]


def _evaluate(
    platform: Platform,
    pricing: Pricing,
    queue: Backlog,
    fleet: Fleet,
    config: SimConfig,
    names: tuple[str, str],
) -> SimResult:
    trace = queue.trace
    pods, nodes = _series(fleet, trace.size)
    total = float(trace.sum())
    hours = trace.size / 3600.0
    if platform.service == "container_apps":
        bill, node_hours = _container_apps_bill(platform, pricing, trace, pods), 0.0
    else:
        billed = nodes if platform.service == "aks" else np.ceil(pods / platform.replicas_per_node)
        node_hours = float(billed.sum() / 3600.0)
        bill = {"nodes": node_hours * node_usd_per_hour(platform, pricing)}
        if platform.service == "aks":
            bill["control_plane_and_system_pool"] = fixed_usd_per_hour(platform, pricing) * hours
    grant = trace.size / SECONDS_PER_MONTH
    bill |= around_the_replicas(platform, pricing, hours, total, config.plan.traffic, grant)
    return SimResult(
        platform=platform.name,
        controller=names[0],
        signal=names[1],
        requests=total,
        attainment=float(queue.within.sum() / total) if total else 1.0,
        dropped=float(queue.dropped.sum()),
        replica_hours=float(pods.sum() / 3600.0),
        node_hours=node_hours,
        cost_usd=float(sum(bill.values())),
        peak_replicas=int(pods.max()),
        breakdown=bill,
        replicas=queue.ready.copy(),
        p99_ms=queue.p99_ms(),
        backlog=queue.backlog.copy(),
        in_flight=queue.in_flight.copy(),
    )


def _container_apps_bill(
    platform: Platform, pricing: Pricing, trace: FloatArray, pods: FloatArray
) -> dict[str, float]:
    busy = trace > 0
    usage = ReplicaSeconds(
        active=float(pods[busy].sum()),
        idle=float(pods[~busy].sum()),
        requests=float(trace.sum()),
    )
    return container_apps_bill(platform, pricing, usage, grant_share=trace.size / SECONDS_PER_MONTH)
