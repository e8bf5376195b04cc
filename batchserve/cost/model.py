"""Steady-state arithmetic: replicas for a target load, monthly cost and cost per 1M requests.

    replicas for load  N = ceil(target_rps / (capacity_rps * utilisation))
    spare nodes        S = 0 below 99.9% availability, 1 from 99.9%, 2 from 99.99%
    replicas           R = max(N + S * replicas_per_node, min_replicas)
    nodes              ceil(R / replicas_per_node)
    monthly requests   target_rps * duty_cycle * 730 h * 3600 s
    cost per 1M        monthly cost / (monthly requests / 1e6)

Beside the replicas: the load balancer in front of AKS (hours, and GB processed both ways),
internet egress (response bytes past the monthly free GB), and a Managed Redis cache where the
platform has one. The data charges need the bytes per request and per response.

A spare is a whole node because a node is what fails (or is drained for an upgrade) at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from batchserve.cost.errors import CostError
from batchserve.cost.pricing import Platform, Pricing

HOURS_PER_MONTH = 730.0
SECONDS_PER_MONTH = HOURS_PER_MONTH * 3600.0
# Float noise must not buy a whole replica: 1000 / (500 * 1.0) is 2, not 3.
_CEIL_SLACK = 1e-9


GB = 1e9  # Azure bills data in GB; taken as 10^9 bytes


@dataclass(frozen=True, slots=True)
class Traffic:
    """Bytes on the wire per request (client to server) and per response (back to the client)."""

    request_bytes: float
    response_bytes: float

    def gb_processed(self, requests: float) -> float:
        """What a load balancer in the path processes: both directions."""
        return requests * (self.request_bytes + self.response_bytes) / GB

    def gb_out(self, requests: float) -> float:
        """What leaves Azure for the internet: the responses."""
        return requests * self.response_bytes / GB


@dataclass(frozen=True, slots=True)
class PlanInputs:
    """What the plan must carry.

    target_rps: request rate to serve while traffic flows.
    availability: target share of time in service; sets the spare nodes (see spare_nodes).
    utilisation: plan replicas at this fraction of measured capacity (headroom for bursts and
        for a replica's share of a failed neighbour's load).
    duty_cycle: share of the month with traffic; the rest is idle (bursty workloads). Always-on
        platforms pay for idle time too; Container Apps pays idle rates or scales to zero.
    request_bytes, response_bytes: bytes on the wire per request and per response, for the
        load balancer's data processing and internet egress; None: unknown, not priced.
    """

    target_rps: float = 1000.0
    availability: float = 0.999
    utilisation: float = 0.7
    duty_cycle: float = 1.0
    request_bytes: float | None = None
    response_bytes: float | None = None

    def __post_init__(self) -> None:
        if not self.target_rps > 0:
            raise CostError(f"target rate must be > 0 req/s, got {self.target_rps}")
        if not 0 < self.availability < 1:
            raise CostError(f"availability must be a fraction in (0, 1), got {self.availability}")
        if not 0 < self.utilisation <= 1:
            raise CostError(f"utilisation must be in (0, 1], got {self.utilisation}")
        if not 0 < self.duty_cycle <= 1:
            raise CostError(f"duty cycle must be in (0, 1], got {self.duty_cycle}")
        sizes = (self.request_bytes, self.response_bytes)
        if (sizes[0] is None) != (sizes[1] is None):
            raise CostError("give both the request and the response size, or neither")
        if any(size is not None and not 0 <= size < math.inf for size in sizes):
            raise CostError("request and response sizes must be >= 0 bytes")

    @property
    def traffic(self) -> Traffic | None:
        if self.request_bytes is None or self.response_bytes is None:
            return None
        return Traffic(self.request_bytes, self.response_bytes)

    @property
    def monthly_requests(self) -> float:
        return self.target_rps * self.duty_cycle * SECONDS_PER_MONTH


@dataclass(frozen=True, slots=True)
class Estimate:
    platform: str
    service: str
    device: str
    capacity_rps: float
    replicas_for_load: int
    spare_nodes: int
    replicas: int
    nodes: int
    monthly_usd: float
    monthly_requests: float
    breakdown: dict[str, float] = field(default_factory=dict)

    @property
    def usd_per_million(self) -> float:
        return self.monthly_usd / (self.monthly_requests / 1e6)


def spare_nodes(availability: float) -> int:
    """N+1 from 99.9% (one node can fail or be upgraded without breaking the SLO), N+2 from
    99.99% (a failure during an upgrade)."""
    if availability >= 0.9999:
        return 2
    if availability >= 0.999:
        return 1
    return 0


def replicas_for_load(target_rps: float, capacity_rps: float, utilisation: float) -> int:
    if not capacity_rps > 0:
        raise CostError(f"per-replica capacity must be > 0 req/s, got {capacity_rps}")
    return max(1, math.ceil(target_rps / (capacity_rps * utilisation) - _CEIL_SLACK))


def estimate(
    platform: Platform, pricing: Pricing, capacity_rps: float, inputs: PlanInputs
) -> Estimate:
    per_node = platform.replicas_per_node
    needed = replicas_for_load(inputs.target_rps, capacity_rps, inputs.utilisation)
    spares = spare_nodes(inputs.availability)
    replicas = max(needed + spares * per_node, platform.min_replicas)
    nodes = math.ceil(replicas / per_node)
    if platform.service == "azure_ml":
        breakdown = _azure_ml(platform, pricing, nodes)
    elif platform.service == "aks":
        breakdown = _aks(platform, pricing, nodes)
    else:
        breakdown = _container_apps(platform, pricing, replicas, inputs)
    breakdown |= around_the_replicas(
        platform, pricing, HOURS_PER_MONTH, inputs.monthly_requests, inputs.traffic, 1.0
    )
    return Estimate(
        platform=platform.name,
        service=platform.service,
        device=platform.device,
        capacity_rps=capacity_rps,
        replicas_for_load=needed,
        spare_nodes=spares,
        replicas=replicas,
        nodes=nodes,
        monthly_usd=sum(breakdown.values()),
        monthly_requests=inputs.monthly_requests,
        breakdown=breakdown,
    )


def node_usd_per_hour(platform: Platform, pricing: Pricing) -> float:
    """What one node of the platform costs per hour while it exists (VM platforms)."""
    assert platform.vm is not None
    price = pricing.vms[platform.vm].usd_per_hour
    if platform.service == "azure_ml":
        price += pricing.azure_ml.surcharge_usd_per_hour
    return price


def fixed_usd_per_hour(platform: Platform, pricing: Pricing) -> float:
    """Costs that do not scale with replicas: AKS control plane and system node pool."""
    if platform.service != "aks":
        return 0.0
    return pricing.aks.control_plane_usd_per_hour[platform.control_plane] + _system_usd_per_hour(
        platform, pricing
    )


def _system_usd_per_hour(platform: Platform, pricing: Pricing) -> float:
    if not platform.system_nodes or platform.system_vm is None:
        return 0.0
    return platform.system_nodes * pricing.vms[platform.system_vm].usd_per_hour


def _azure_ml(platform: Platform, pricing: Pricing, nodes: int) -> dict[str, float]:
    # Managed online endpoints keep at least one instance per deployment: always on.
    return {"instances": nodes * node_usd_per_hour(platform, pricing) * HOURS_PER_MONTH}


def _aks(platform: Platform, pricing: Pricing, nodes: int) -> dict[str, float]:
    control_plane = pricing.aks.control_plane_usd_per_hour[platform.control_plane]
    return {
        "nodes": nodes * node_usd_per_hour(platform, pricing) * HOURS_PER_MONTH,
        "control_plane": control_plane * HOURS_PER_MONTH,
        "system_pool": _system_usd_per_hour(platform, pricing) * HOURS_PER_MONTH,
    }


def around_the_replicas(
    platform: Platform,
    pricing: Pricing,
    hours: float,
    requests: float,
    traffic: Traffic | None,
    grant_share: float,
) -> dict[str, float]:
    """What the platform pays beside its replicas over `hours` carrying `requests`: the load
    balancer, internet egress (the monthly free GB times grant_share spent first) and Redis.
    Without `traffic` the data charges are left out (the caller says so), not priced at 0."""
    bill: dict[str, float] = {}
    if platform.load_balancer:
        lb = pricing.load_balancer
        bill["load_balancer"] = lb.usd_per_hour * hours
        if traffic is not None:
            bill["load_balancer"] += traffic.gb_processed(requests) * lb.usd_per_gb_processed
    if traffic is not None:
        bw = pricing.bandwidth
        billed_gb = max(0.0, traffic.gb_out(requests) - bw.free_gb_per_month * grant_share)
        bill["egress"] = billed_gb * bw.usd_per_gb
    if platform.redis is not None:
        bill["redis"] = pricing.redis[platform.redis].usd_per_hour * hours
    return bill


@dataclass(frozen=True, slots=True)
class ReplicaSeconds:
    """Container Apps usage to bill: replica-seconds while serving and while idle."""

    active: float
    idle: float
    requests: float


def _container_apps(
    platform: Platform, pricing: Pricing, replicas: int, inputs: PlanInputs
) -> dict[str, float]:
    active_s = SECONDS_PER_MONTH * inputs.duty_cycle
    idle_s = SECONDS_PER_MONTH - active_s
    usage = ReplicaSeconds(
        active=replicas * active_s,
        idle=platform.min_replicas * idle_s,
        requests=inputs.monthly_requests,
    )
    return container_apps_bill(platform, pricing, usage, grant_share=1.0)


def container_apps_bill(
    platform: Platform, pricing: Pricing, usage: ReplicaSeconds, grant_share: float
) -> dict[str, float]:
    """Bill Container Apps usage. grant_share is the share of the monthly free grant that the
    usage period gets (1 for a month, 1/30.4 for a simulated day). The grant is spent on active
    seconds first (Azure does not say in which order it is applied; this order is the cheaper)."""
    ca = pricing.container_apps
    requests = max(0.0, usage.requests - ca.free_requests * grant_share)
    bill = {"requests": requests / 1e6 * ca.usd_per_million_requests}
    if platform.gpu_profile is not None:
        # No idle discount is published for GPU seconds: an idle GPU replica bills in full.
        rate = pricing.serverless_gpu[platform.gpu_profile].usd_per_second
        bill["gpu_seconds"] = (usage.active + usage.idle) * rate
        return bill
    vcpu_active, vcpu_idle = _after_grant(
        usage.active * platform.vcpu, usage.idle * platform.vcpu, ca.free_vcpu_seconds * grant_share
    )
    gib_active, gib_idle = _after_grant(
        usage.active * platform.memory_gib,
        usage.idle * platform.memory_gib,
        ca.free_gib_seconds * grant_share,
    )
    bill["active"] = (
        vcpu_active * ca.active_usd_per_vcpu_second + gib_active * ca.active_usd_per_gib_second
    )
    bill["idle"] = vcpu_idle * ca.idle_usd_per_vcpu_second + gib_idle * ca.idle_usd_per_gib_second
    return bill


def _after_grant(active: float, idle: float, grant: float) -> tuple[float, float]:
    from_active = min(active, grant)
    from_idle = min(idle, grant - from_active)
    return active - from_active, idle - from_idle
