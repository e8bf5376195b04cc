"""The pods fit the AKS nodes they are deployed on: allocatable CPU and memory of every node size
the guide (docs/deploy.md) and the cost model (deploy/azure/pricing.json) name, from AKS's
published reservation rules, less the DaemonSets that run on every such node, must hold the
pods each node is meant to carry: one server pod per GPU (two per time-sliced GPU), and as
many CPU replicas per node as the cost model prices.

AKS reservations (https://learn.microsoft.com/azure/aks/node-resource-reservations, the rules for
Kubernetes 1.29 and later; the manifests need 1.30 or later):
- CPU: kube-reserved by the node's core count, a table of 60, 100, 140, 180, 260, 420 and 740
  millicores for 1, 2, 4, 8, 16, 32 and 64 cores;
- memory: kube-reserved = the lesser of 20 MB x the node's max pods + 50 MB and 25% of the
  node's memory, plus the kubelet's hard eviction threshold, memory.available < 100Mi.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_deploy_k8s import K8S, containers, find, overlay, pod_specs, render, server_env

ROOT = Path(__file__).resolve().parent.parent
GUIDE = ROOT / "docs" / "deploy.md"
PRICING = json.loads((ROOT / "deploy" / "azure" / "pricing.json").read_text())
SERVER = "batchserve"

Manifest = dict[str, Any]

# -- AKS's reservation rules -------------------------------------------------------------------

# The published table (cores on the host: kube-reserved millicores).
KUBE_RESERVED_CPU_TABLE = {1: 60, 2: 100, 4: 140, 8: 180, 16: 260, 32: 420, 64: 740}
EVICTION_MI = 100  # memory.available < 100Mi, Kubernetes 1.29 and later
# Azure CNI Overlay, the guide's network plugin, gives every node 250 pods unless --max-pods
# says otherwise (https://learn.microsoft.com/azure/aks/azure-cni-overlay).
OVERLAY_DEFAULT_MAX_PODS = 250
# The kernel keeps part of a VM's memory: the node's capacity is below the size's nominal
# memory. Published AKS node listings show 4025836Ki on a 4 GiB size (96.0%, Azure/AKS#3525)
# and 16403296Ki on a 16 GiB one (97.8%, Azure/AKS#1216); the lower share is used.
CAPACITY_SHARE = 0.959


def kube_reserved_cpu_m(cores: int) -> int:
    """The published table, which between its columns grows by 60 m for the first core, 40 m
    for the second, 20 m each for the third and fourth and 10 m for each core above four
    (24 and 40 cores, the A100 and H100 sizes, are not columns of the table)."""
    steps = (60, 40, 20, 20)
    return sum(steps[:cores]) + 10 * max(0, cores - 4)


def kube_reserved_memory_mb(memory_mb: float, max_pods: int) -> float:
    """Kubernetes 1.29 and later. The page writes MB; both figures are read as MiB here, which
    reserves a little more than decimal megabytes would."""
    return min(20 * max_pods + 50, 0.25 * memory_mb)


def legacy_kube_reserved_memory_mb(memory_mb: float) -> float:
    """Before 1.29: 25% of the first 4 GB, 20% of the next 4, 10% of the next 8, 6% of the next
    112 and 2% above 128 GB (with a 750Mi eviction threshold). Only used to check this model of
    a node's capacity against a published node (the manifests need 1.30)."""
    brackets = ((4096, 0.25), (4096, 0.20), (8192, 0.10), (114688, 0.06), (float("inf"), 0.02))
    reserved, left = 0.0, memory_mb
    for size, share in brackets:
        reserved += min(left, size) * share
        left -= min(left, size)
    return reserved


@dataclass(frozen=True)
class NodeSize:
    name: str
    cores: int
    memory_gib: float
    gpus: int

    @classmethod
    def priced(cls, name: str) -> NodeSize:
        """The size as deploy/azure/pricing.json describes it (vCPU, GiB, "1x NVIDIA ...")."""
        vm = PRICING["prices"]["vms"][name]
        gpus = int(re.match(r"(\d+)x ", vm["gpu"]).group(1)) if vm["gpu"] else 0  # type: ignore[union-attr]
        return cls(name, vm["vcpu"], vm["memory_gib"], gpus)


@dataclass(frozen=True)
class Resources:
    cpu_m: float
    memory_mi: float

    def __add__(self, other: Resources) -> Resources:
        return Resources(self.cpu_m + other.cpu_m, self.memory_mi + other.memory_mi)

    def __mul__(self, times: int) -> Resources:
        return Resources(self.cpu_m * times, self.memory_mi * times)

    def within(self, room: Resources) -> bool:
        return self.cpu_m <= room.cpu_m and self.memory_mi <= room.memory_mi


def allocatable(size: NodeSize, max_pods: int = OVERLAY_DEFAULT_MAX_PODS) -> Resources:
    """What the kubelet offers pods on a node of this size (`status.allocatable`)."""
    nominal_mi = size.memory_gib * 1024
    capacity_mi = nominal_mi * CAPACITY_SHARE
    # 25% of the nominal memory: the larger reading of "the node's memory", so the smaller
    # allocatable.
    reserved_mi = kube_reserved_memory_mb(nominal_mi, max_pods)
    return Resources(
        size.cores * 1000 - kube_reserved_cpu_m(size.cores),
        capacity_mi - reserved_mi - EVICTION_MI,
    )


# -- what else runs on every node ------------------------------------------------------------


@dataclass(frozen=True)
class DaemonSet:
    name: str
    requests: Resources
    gpu_nodes_only: bool
    source: str


# The requests of the DaemonSets on the guide's nodes (AKS, Azure CNI Overlay with the Cilium
# data plane and policy engine, the NVIDIA device plugin or GPU Operator on GPU pools,
# kube-prometheus-stack, and managed Prometheus as the guide's alternative). AKS does not
# publish the requests of its own add-ons; where no published figure exists the one AKS deploys
# today is used, and a margin covers the rest: check a live node with `kubectl describe node`
# (Non-terminated Pods).
# Not here, because they are Deployments on the system pool, not on every node:
# konnectivity-agent, CoreDNS, metrics-server, the KEDA operator and metrics server, and
# kube-prometheus-stack's Prometheus, Grafana and operator.
DAEMONSETS = (
    DaemonSet("kube-proxy", Resources(100, 0), False,
              "AKS kube-system; 100m as in AKS Engine's add-on (Azure/aks-engine#1800); Cilium "
              "replaces it, and its 100m stays counted towards Cilium's agent"),
    DaemonSet("azure-cns", Resources(40, 250), False,
              "Azure CNI's node agent; 250Mi: Azure/AKS#3525 (550 MB with azure-npm's 300Mi)"),
    DaemonSet("azure-ip-masq-agent", Resources(100, 50), False, "AKS kube-system"),
    DaemonSet("cloud-node-manager", Resources(50, 50), False,
              "cloud-provider-azure's chart defaults"),
    DaemonSet("csi-azuredisk-node", Resources(30, 60), False,
              "azuredisk-csi-driver: 3 containers x 10m/20Mi"),
    DaemonSet("csi-azurefile-node", Resources(30, 60), False,
              "azurefile-csi-driver: 3 containers x 10m/20Mi"),
    DaemonSet("network policy engine", Resources(250, 300), False,
              "the guide's is Cilium, whose agent's request AKS does not publish: counted as "
              "azure-npm, 250m/300Mi (Azure/AKS#2033, #2792), as much as Calico's 250m "
              "(Azure/aks-engine#1800)"),
    DaemonSet("ama-metrics-node", Resources(70, 180), False,
              "managed Prometheus (--enable-azure-monitor-metrics): Azure/prometheus-collector "
              "addon chart, collector 50m/150Mi + addon-token-adapter 20m/30Mi"),
    DaemonSet("prometheus-node-exporter", Resources(0, 0), False,
              "kube-prometheus-stack: no requests by default"),
    DaemonSet("nvidia-device-plugin", Resources(0, 0), True,
              "NVIDIA k8s-device-plugin chart: no requests by default"),
    DaemonSet("GPU Operator operands", Resources(0, 0), True,
              "driver, toolkit, device plugin, GFD, DCGM exporter, validator: no requests "
              "by default"),
    DaemonSet("node-feature-discovery worker", Resources(5, 64), True,
              "node-feature-discovery chart defaults (GPU Operator dependency)"),
    DaemonSet("margin", Resources(100, 256), False,
              "add-ons not listed and changes between AKS releases"),
)  # fmt: skip


def daemonsets_on(size: NodeSize) -> Resources:
    total = Resources(0, 0)
    for daemonset in DAEMONSETS:
        if size.gpus or not daemonset.gpu_nodes_only:
            total += daemonset.requests
    return total


def room_for_pods(size: NodeSize) -> Resources:
    free = allocatable(size, guide_max_pods())
    used = daemonsets_on(size)
    return Resources(free.cpu_m - used.cpu_m, free.memory_mi - used.memory_mi)


# -- what the pods ask for -------------------------------------------------------------------

_CPU = re.compile(r"^(\d+(?:\.\d+)?)(m?)$")
_BYTES = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6,
          "G": 10**9, "T": 10**12, "": 1}  # fmt: skip
_MEMORY = re.compile(r"^(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|k|M|G|T|)$")


def cpu_m(quantity: str | float) -> float:
    match = _CPU.match(str(quantity))
    assert match, f"not a CPU quantity: {quantity!r}"
    return float(match.group(1)) * (1 if match.group(2) else 1000)


def memory_mi(quantity: str | float) -> float:
    match = _MEMORY.match(str(quantity))
    assert match, f"not a memory quantity: {quantity!r}"
    return float(match.group(1)) * _BYTES[match.group(2)] / 2**20


def container_requests(container: Manifest) -> Resources:
    requests = container.get("resources", {}).get("requests", {})
    return Resources(cpu_m(requests.get("cpu", 0)), memory_mi(requests.get("memory", 0)))


def pod_requests(spec: Manifest) -> Resources:
    """What the scheduler counts for a pod: the sum of its containers, or its largest init
    container where that is more (init containers run one at a time, before the others)."""
    running = Resources(0, 0)
    for c in spec["containers"]:
        running += container_requests(c)
    cpu, memory = running.cpu_m, running.memory_mi
    for c in spec.get("initContainers", []):
        init = container_requests(c)
        cpu, memory = max(cpu, init.cpu_m), max(memory, init.memory_mi)
    return Resources(cpu, memory)


def server_spec(objects: list[Manifest]) -> Manifest:
    spec: Manifest = find(objects, "Deployment")["spec"]["template"]["spec"]
    return spec


def other_pods(objects: list[Manifest]) -> Resources:
    """Every other workload the overlay deploys, once (the in-cluster Redis of the CPU
    overlays): counted on the same node, the worst case."""
    total = Resources(0, 0)
    for name, spec in pod_specs(objects):
        if name != SERVER:
            total += pod_requests(spec)
    return total


def misfits(objects: list[Manifest], size: NodeSize, per_node: int) -> list[str]:
    """Why `per_node` server pods (and the overlay's other pods) do not fit on one node of
    `size`; empty when they fit."""
    room = room_for_pods(size)
    needed = pod_requests(server_spec(objects)) * per_node + other_pods(objects)
    problems = []
    if needed.cpu_m > room.cpu_m:
        problems.append(f"{size.name}: {needed.cpu_m:.0f}m CPU requested, {room.cpu_m:.0f}m free")
    if needed.memory_mi > room.memory_mi:
        problems.append(
            f"{size.name}: {needed.memory_mi:.0f}Mi requested, {room.memory_mi:.0f}Mi free"
        )
    return problems


# -- the guide and the cost model ------------------------------------------------------------


def guide_text() -> str:
    return GUIDE.read_text()


def guide_max_pods() -> int:
    """--max-pods where the guide sets it (the largest, which reserves the most memory), else
    Azure CNI Overlay's default."""
    found = [int(n) for n in re.findall(r"--max-pods[ =](\d+)", guide_text())]
    return max(found, default=OVERLAY_DEFAULT_MAX_PODS)


def gpu_sizes_in_the_guide() -> set[str]:
    return set(re.findall(r"\bStandard_NC\w+", guide_text()))


def aks_platforms(device: str) -> list[Manifest]:
    return [p for p in PRICING["platforms"] if p["service"] == "aks" and p["device"] == device]


def time_slices() -> int:
    """How many pods share one GPU under cluster/gpu-sharing."""
    sharing = find(render(K8S / "cluster" / "gpu-sharing"), "ConfigMap", "batchserve-gpu-sharing")
    config = yaml.safe_load(sharing["data"]["time-sliced-2"])
    replicas: int = config["sharing"]["timeSlicing"]["resources"][0]["replicas"]
    return replicas


# The overlays and the node sizes each one is documented for, with server pods per node.
GPU_OVERLAYS = ("aks-gpu", "aks-gpu-shared")
CPU_OVERLAYS = ("cpu", "cpu-hpa")


def gpu_cases() -> list[tuple[str, str]]:
    sizes = sorted({p["vm"] for p in aks_platforms("gpu")} | gpu_sizes_in_the_guide())
    return [(name, size) for name in GPU_OVERLAYS for size in sizes]


def pods_per_gpu_node(name: str, size: NodeSize) -> int:
    return size.gpus * (time_slices() if name == "aks-gpu-shared" else 1)


# -- the rules themselves --------------------------------------------------------------------


def test_the_cpu_rule_reproduces_the_published_table() -> None:
    assert {c: kube_reserved_cpu_m(c) for c in KUBE_RESERVED_CPU_TABLE} == KUBE_RESERVED_CPU_TABLE


def test_the_memory_rule_reproduces_the_published_examples() -> None:
    # 8 GB and 30 pods: 650 MB kube-reserved, 7.25 GB allocatable; 4 GB and 70 pods: 25%.
    assert kube_reserved_memory_mb(8000, 30) == 650
    assert 8000 - kube_reserved_memory_mb(8000, 30) - 100 == 7250
    assert kube_reserved_memory_mb(4000, 70) == 1000


def test_the_capacity_model_reproduces_a_published_node() -> None:
    """Azure/AKS#3525: a 2-core, 4 GiB node (Kubernetes 1.24, the older rules) listed capacity
    4025836Ki, allocatable 1900m and 2209260Ki: 25% of the nominal 4 GiB and a 750Mi eviction
    threshold off the capacity, to the KiB. CAPACITY_SHARE is at most that node's share."""
    capacity_ki, allocatable_ki = 4025836, 2209260
    reserved_ki = legacy_kube_reserved_memory_mb(4096) * 1024
    assert capacity_ki - reserved_ki - 750 * 1024 == allocatable_ki
    assert 2000 - kube_reserved_cpu_m(2) == 1900
    assert capacity_ki / (4 * 2**20) >= CAPACITY_SHARE


def test_every_daemonset_figure_names_its_source() -> None:
    for daemonset in DAEMONSETS:
        assert daemonset.source, daemonset.name
        assert daemonset.requests.cpu_m >= 0, daemonset.name
        assert daemonset.requests.memory_mi >= 0, daemonset.name


def test_the_guide_uses_the_network_plugin_the_pod_count_assumes() -> None:
    text = guide_text()
    # Without --max-pods, 250 pods per node is Azure CNI Overlay's default, not other plugins'.
    assert "--max-pods" in text or "--network-plugin-mode overlay" in text


def test_every_documented_size_is_priced() -> None:
    """The node sizes come from the pricing table: each size the guide names is there."""
    priced = set(PRICING["prices"]["vms"])
    assert gpu_sizes_in_the_guide(), "the guide names no GPU size"
    assert gpu_sizes_in_the_guide() <= priced
    for platform in aks_platforms("gpu"):
        assert NodeSize.priced(platform["vm"]).gpus >= 1, platform["vm"]


def test_allocatable_on_the_smallest_gpu_size() -> None:
    """Standard_NC4as_T4_v3 (4 vCPU, 28 GiB), worked by hand: 4000 - 140 = 3860m; 28 GiB x
    0.959 - (20 x 250 + 50) - 100 = 22,346 MiB."""
    t4 = allocatable(NodeSize.priced("Standard_NC4as_T4_v3"), OVERLAY_DEFAULT_MAX_PODS)
    assert t4.cpu_m == 3860
    assert t4.memory_mi == pytest.approx(28 * 1024 * CAPACITY_SHARE - 5050 - 100)


# -- the overlays on their nodes -------------------------------------------------------------


@pytest.mark.parametrize(("name", "size"), gpu_cases())
def test_gpu_pods_fit_one_per_gpu(name: str, size: str) -> None:
    node = NodeSize.priced(size)
    objects = overlay(name)
    per_node = pods_per_gpu_node(name, node)
    assert per_node >= 1
    assert not misfits(objects, node, per_node)


@pytest.mark.parametrize("name", CPU_OVERLAYS)
def test_cpu_pods_fit_as_many_per_node_as_the_cost_model_prices(name: str) -> None:
    objects = overlay(name)
    (platform,) = aks_platforms("cpu")
    node = NodeSize.priced(platform["vm"])
    assert platform["replicas_per_node"] >= 1
    assert not misfits(objects, node, platform["replicas_per_node"])
    # The guide's cluster has no CPU pool: there a CPU replica lands on a system-pool node, which
    # must hold one beside the DaemonSets (the system Deployments are not counted here).
    system = NodeSize.priced(platform["system_vm"])
    assert not misfits(objects, system, 1)


@pytest.mark.parametrize("name", GPU_OVERLAYS)
def test_gpu_server_threads_fit_the_cpu_limit(name: str) -> None:
    objects = overlay(name)
    env = server_env(objects)
    threads = int(env.get("BATCHSERVE_INTRA_OP_THREADS") or 0)
    instances = int(env.get("BATCHSERVE_INSTANCES") or 1)
    server = next(c for c in server_spec(objects)["containers"] if c["name"] == SERVER)
    limit_m = cpu_m(server["resources"]["limits"]["cpu"])
    # One ONNX Runtime thread per session, and the event loop beside them.
    assert 0 < threads * instances * 1000 <= limit_m
    assert server["resources"]["limits"] == server["resources"]["requests"], "Guaranteed QoS"


def test_the_check_rejects_an_oversized_request() -> None:
    """The request the GPU overlay had (4 cores on a 4-vCPU T4 node) does not fit, nor does
    one replica too many on a CPU node, nor memory beyond the node."""
    t4 = NodeSize.priced("Standard_NC4as_T4_v3")
    objects = overlay("aks-gpu")
    for c in containers(server_spec(objects)):
        if c["name"] == SERVER:
            c["resources"]["requests"]["cpu"] = "4"
    assert misfits(objects, t4, 1) == [f"{t4.name}: 4000m CPU requested, "
                                       f"{room_for_pods(t4).cpu_m:.0f}m free"]  # fmt: skip
    (platform,) = aks_platforms("cpu")
    f8 = NodeSize.priced(platform["vm"])
    assert misfits(overlay("cpu"), f8, platform["replicas_per_node"] + 1)
    objects = overlay("aks-gpu-shared")
    for c in containers(server_spec(objects)):
        if c["name"] == SERVER:
            c["resources"]["requests"]["memory"] = "12Gi"
    assert misfits(objects, t4, pods_per_gpu_node("aks-gpu-shared", t4))
