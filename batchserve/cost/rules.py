"""The scaling rules and start-up delays the simulation replays, each with where it comes from.
The shipped deployment files are the source: tests/test_cost_shapes.py compares them."""

from __future__ import annotations

import math
from dataclasses import dataclass

from batchserve.cost.errors import CostError


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

    The per-replica target is the platform's `in_flight_target` (the trigger's threshold,
    pricing.json; a test keeps it equal to the shipped one), compared with the requests in
    flight derived from the latency curve. Without a curve that has mean latencies, the
    target falls back to its rate equivalent, capacity x utilisation req/s per replica.
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
    read without a rate window. The target is the platform's `in_flight_target` (the app's
    concurrentRequests), as for KEDA."""

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
class AzureMonitorRules:
    """Azure ML managed online endpoints scale by Azure Monitor autoscale rules on the
    deployment; these are the rules docs/deploy.md creates (a test reads them from there):
    one more instance while utilisation averaged over 5 minutes is above 70%, one fewer while
    its 10-minute average is below 25%, each followed by the rule's cooldown (5 minutes, the
    `az monitor autoscale rule create --cooldown` default). The engine evaluates once a minute.
    Utilisation is the share of the replicas' capacity at the SLO they serve.
    """

    evaluation_s: float = 60.0
    scale_out_above: float = 70.0
    scale_out_window_s: float = 300.0
    scale_in_below: float = 25.0
    scale_in_window_s: float = 600.0
    step: int = 1
    cooldown_s: float = 300.0


@dataclass(frozen=True, slots=True)
class Delays:
    """How long capacity takes to arrive (and leave); each is a `batchserve cost` flag.

    pod_start_s: container start, model load, warm-up, readiness probe (AKS, free node).
    node_provision_s / gpu_node_provision_s: cluster autoscaler adds a VM to the pool and it
        joins (GPU: driver, device plugin and a multi-GB image on top).
    image_pull_s: pulling the server image onto a new node, after it joins (0: counted in the
        provisioning time above; nodes already running have the image).
    node_scale_down_s: cluster autoscaler's scale-down-unneeded-time (10 min default).
    cold_start_s / gpu_cold_start_s: a Container Apps replica from request to ready.
    aml_instance_start_s / gpu_aml_instance_start_s: an Azure ML instance from the autoscale
        action to ready (VM allocation, image pull, model load); Azure publishes no figure, so
        these are assumptions.
    """

    pod_start_s: float = 20.0
    node_provision_s: float = 180.0
    gpu_node_provision_s: float = 300.0
    image_pull_s: float = 0.0
    node_scale_down_s: float = 600.0
    cold_start_s: float = 20.0
    gpu_cold_start_s: float = 60.0
    aml_instance_start_s: float = 300.0
    gpu_aml_instance_start_s: float = 600.0

    def __post_init__(self) -> None:
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if not 0 <= value < math.inf:
                raise CostError(f"{name.replace('_', '-')} must be >= 0 seconds, got {value}")
