"""The pricing table: list prices (each with its source and date) and the deployment shapes
priced with them, loaded from JSON into frozen dataclasses and validated strictly, so a typo in
a user's file is an error rather than a silently missing price."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, cast

from batchserve.cost.errors import CostError

Service = Literal["azure_ml", "aks", "container_apps"]
SERVICES: tuple[Service, ...] = ("azure_ml", "aks", "container_apps")
DeviceKind = Literal["cpu", "gpu"]
_AS_OF = re.compile(r"^\d{4}-\d{2}(-\d{2})?$")


def default_pricing_path() -> Path:
    """The table shipped inside the package (deploy/azure/pricing.json is the same file)."""
    return Path(str(resources.files("batchserve.cost") / "data" / "pricing.json"))


@dataclass(frozen=True, slots=True)
class Source:
    """Where a price comes from: the public page, the date it reflects, and whether it is only
    an estimate (not a published list price)."""

    url: str
    as_of: str
    note: str = ""
    estimate: bool = False


@dataclass(frozen=True, slots=True)
class VmPrice:
    name: str
    vcpu: int
    memory_gib: float
    gpu: str | None
    usd_per_hour: float
    source: Source


@dataclass(frozen=True, slots=True)
class AksPrices:
    control_plane_usd_per_hour: Mapping[str, float]
    source: Source


@dataclass(frozen=True, slots=True)
class AzureMlPrices:
    surcharge_usd_per_hour: float
    source: Source


@dataclass(frozen=True, slots=True)
class ConsumptionPrices:
    """Container Apps Consumption plan meters and the monthly free grant."""

    active_usd_per_vcpu_second: float
    active_usd_per_gib_second: float
    idle_usd_per_vcpu_second: float
    idle_usd_per_gib_second: float
    usd_per_million_requests: float
    free_vcpu_seconds: float
    free_gib_seconds: float
    free_requests: float
    source: Source


@dataclass(frozen=True, slots=True)
class GpuProfilePrice:
    """A Container Apps serverless GPU profile, billed per second while a replica runs."""

    name: str
    gpu: str
    vcpu: int
    memory_gib: float
    usd_per_second: float
    source: Source


@dataclass(frozen=True, slots=True)
class LoadBalancerPrices:
    """Azure Load Balancer Standard: an hourly charge for the first five rules and a charge per
    GB processed in either direction (AKS puts one in front of its ingress controller)."""

    usd_per_hour: float
    usd_per_gb_processed: float
    source: Source


@dataclass(frozen=True, slots=True)
class BandwidthPrices:
    """Data out of Azure to the internet: the first `free_gb_per_month` are free, the rest is
    billed per GB (the first price tier; larger volumes are cheaper)."""

    free_gb_per_month: float
    usd_per_gb: float
    source: Source


@dataclass(frozen=True, slots=True)
class RedisPrice:
    """One Azure Managed Redis SKU, billed per hour while the cache exists."""

    name: str
    memory_gib: float
    usd_per_hour: float
    source: Source


@dataclass(frozen=True, slots=True)
class Platform:
    """One deployment shape to price: where replicas run and how many share a node.

    A node is the unit that is billed and that fails: a VM (Azure ML instance, AKS node) or,
    on Container Apps, the replica itself (replicas_per_node is then 1).
    """

    name: str
    service: Service
    device: DeviceKind
    description: str = ""
    min_replicas: int = 0
    replicas_per_node: int = 1
    vm: str | None = None
    control_plane: str = "standard"
    system_vm: str | None = None
    system_nodes: int = 0
    vcpu: float = 0.0
    memory_gib: float = 0.0
    gpu_profile: str | None = None
    # The shipped autoscaler's per-replica target for requests in flight (KEDA trigger
    # threshold, Container Apps concurrentRequests); None: no such rule.
    in_flight_target: float | None = None
    max_replicas: int | None = None
    # A public Azure Load Balancer Standard in front of the platform's ingress, billed apart.
    load_balancer: bool = False
    redis: str | None = None

    def __post_init__(self) -> None:
        if self.service not in SERVICES:
            raise ValueError(f"service must be one of {', '.join(SERVICES)}")
        if self.device not in ("cpu", "gpu"):
            raise ValueError("device must be 'cpu' or 'gpu'")
        if self.min_replicas < 0 or self.system_nodes < 0 or self.replicas_per_node < 1:
            raise ValueError("replica and node counts must be >= 0 (replicas_per_node >= 1)")
        if self.in_flight_target is not None and not self.in_flight_target > 0:
            raise ValueError("in_flight_target must be > 0")
        if self.max_replicas is not None and self.max_replicas < max(1, self.min_replicas):
            raise ValueError("max_replicas must be >= min_replicas and >= 1")
        if self.service in ("azure_ml", "aks") and not self.vm:
            raise ValueError(f"a {self.service} platform needs 'vm'")
        if self.service == "container_apps":
            if self.replicas_per_node != 1:
                raise ValueError("container_apps replicas are their own nodes: replicas_per_node 1")
            if self.gpu_profile is None and (self.vcpu <= 0 or self.memory_gib <= 0):
                raise ValueError("a container_apps CPU platform needs 'vcpu' and 'memory_gib'")


@dataclass(frozen=True, slots=True)
class Pricing:
    currency: str
    region: str
    as_of: str
    note: str
    vms: Mapping[str, VmPrice]
    aks: AksPrices
    azure_ml: AzureMlPrices
    container_apps: ConsumptionPrices
    serverless_gpu: Mapping[str, GpuProfilePrice]
    load_balancer: LoadBalancerPrices
    bandwidth: BandwidthPrices
    redis: Mapping[str, RedisPrice]
    platforms: tuple[Platform, ...]
    origin: str = ""
    overrides: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        names = [p.name for p in self.platforms]
        if len(set(names)) != len(names):
            raise ValueError("platform names must be unique")
        for platform in self.platforms:
            self._check_refs(platform)

    def _check_refs(self, platform: Platform) -> None:
        where = f"platform {platform.name!r}"
        for vm in (platform.vm, platform.system_vm if platform.system_nodes else None):
            if vm is not None and vm not in self.vms:
                raise ValueError(f"{where}: VM {vm!r} has no price")
        if platform.system_nodes and platform.system_vm is None:
            raise ValueError(f"{where}: system_nodes needs system_vm")
        if platform.service == "aks" and platform.control_plane not in (
            self.aks.control_plane_usd_per_hour
        ):
            raise ValueError(f"{where}: unknown AKS tier {platform.control_plane!r}")
        if platform.gpu_profile is not None and platform.gpu_profile not in self.serverless_gpu:
            raise ValueError(f"{where}: GPU profile {platform.gpu_profile!r} has no price")
        if platform.redis is not None and platform.redis not in self.redis:
            raise ValueError(f"{where}: Redis SKU {platform.redis!r} has no price")

    def platform(self, name: str) -> Platform:
        for platform in self.platforms:
            if platform.name == name:
                return platform
        known = ", ".join(p.name for p in self.platforms)
        raise CostError(f"unknown platform {name!r} (known: {known})")

    def sources(self) -> Iterator[tuple[str, Source]]:
        """Every priced item with its source, for the printed assumptions."""
        for name, vm in self.vms.items():
            yield f"VM {name}", vm.source
        yield "AKS control plane", self.aks.source
        yield "Azure ML", self.azure_ml.source
        yield "Container Apps consumption", self.container_apps.source
        for name, gpu in self.serverless_gpu.items():
            yield f"Container Apps GPU {name}", gpu.source
        yield "Load Balancer Standard", self.load_balancer.source
        yield "internet egress", self.bandwidth.source
        for name, redis in self.redis.items():
            yield f"Managed Redis {name}", redis.source


# ---------------------------------------------------------------------------------------------
# loading


def load_pricing(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Pricing:
    """Read a pricing file (default: the shipped table) and apply `PATH=VALUE` overrides, where
    PATH is dotted (`prices.vms.Standard_F8s_v2.usd_per_hour`, `platforms.aks-cpu.min_replicas`)
    and must name a value that exists."""
    file = Path(path) if path is not None else default_pricing_path()
    try:
        raw = json.loads(file.read_text())
    except OSError as err:
        raise CostError(f"cannot read pricing file {file}: {err.strerror or err}") from None
    except json.JSONDecodeError as err:
        raise CostError(f"{file}: not valid JSON: {err}") from None
    raw = copy.deepcopy(raw)
    for override in overrides:
        _apply_override(raw, override)
    try:
        origin = str(file) if path is not None else "the shipped table (deploy/azure/pricing.json)"
        return parse_pricing(raw, origin=origin, overrides=tuple(overrides))
    except (ValueError, TypeError) as err:
        raise CostError(f"{file}: {err}") from None


def parse_pricing(raw: Any, origin: str = "", overrides: tuple[str, ...] = ()) -> Pricing:
    top = _Fields(raw, "top level")
    top.required("schema", int)
    prices = _Fields(top.required("prices", dict), "prices")
    vms = _Fields(prices.required("vms", dict), "prices.vms")
    gpus = _Fields(prices.required("serverless_gpu", dict), "prices.serverless_gpu")
    redis = _Fields(prices.required("redis", dict), "prices.redis")
    pricing = Pricing(
        currency=top.required("currency", str),
        region=top.required("region", str),
        as_of=_as_of(top.required("as_of", str), "as_of"),
        note=top.optional("note", str, ""),
        vms={name: _vm(name, vms.required(name, dict)) for name in vms.names()},
        aks=_aks(prices.required("aks", dict)),
        azure_ml=_azure_ml(prices.required("azure_ml", dict)),
        container_apps=_consumption(prices.required("container_apps", dict)),
        serverless_gpu={name: _gpu(name, gpus.required(name, dict)) for name in gpus.names()},
        load_balancer=_load_balancer(prices.required("load_balancer", dict)),
        bandwidth=_bandwidth(prices.required("bandwidth", dict)),
        redis={name: _redis(name, redis.required(name, dict)) for name in redis.names()},
        platforms=tuple(
            _platform(i, entry) for i, entry in enumerate(top.required("platforms", list))
        ),
        origin=origin,
        overrides=overrides,
    )
    for fields in (top, prices, vms, gpus, redis):
        fields.done()
    return pricing


class _Fields:
    """Typed access to one JSON object; `done()` rejects keys nobody asked for."""

    def __init__(self, raw: Any, where: str) -> None:
        if not isinstance(raw, dict):
            raise ValueError(f"{where}: expected an object")
        self.raw: dict[str, Any] = raw
        self.where = where
        self.seen: set[str] = set()

    def names(self) -> list[str]:
        return list(self.raw)

    def required(self, key: str, kind: type[Any]) -> Any:
        if key not in self.raw:
            raise ValueError(f"{self.where}: missing {key!r}")
        return self.optional(key, kind, None)

    def optional(self, key: str, kind: type[Any], default: Any) -> Any:
        self.seen.add(key)
        value = self.raw.get(key, default)
        if value is None or value is default:
            return value
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise ValueError(f"{self.where}.{key}: expected {kind.__name__}, got {value!r}")
        return value

    def price(self, key: str) -> float:
        value = cast(float, self.required(key, float))
        if value < 0:
            raise ValueError(f"{self.where}.{key}: a price cannot be negative ({value})")
        return value

    def source(self) -> Source:
        url = self.required("source", str)
        if not url.startswith("https://"):
            raise ValueError(f"{self.where}.source: expected an https:// URL, got {url!r}")
        return Source(
            url=url,
            as_of=_as_of(self.required("as_of", str), f"{self.where}.as_of"),
            note=self.optional("note", str, ""),
            estimate=self.optional("estimate", bool, False),
        )

    def done(self) -> None:
        unknown = sorted(set(self.raw) - self.seen)
        if unknown:
            raise ValueError(f"{self.where}: unknown key(s) {', '.join(map(repr, unknown))}")


def _as_of(text: str, where: str) -> str:
    if not _AS_OF.match(text):
        raise ValueError(f"{where}: expected a date YYYY-MM or YYYY-MM-DD, got {text!r}")
    return text


def _vm(name: str, raw: Any) -> VmPrice:
    f = _Fields(raw, f"prices.vms.{name}")
    vm = VmPrice(
        name=name,
        vcpu=f.required("vcpu", int),
        memory_gib=f.required("memory_gib", float),
        gpu=f.optional("gpu", str, None),
        usd_per_hour=f.price("usd_per_hour"),
        source=f.source(),
    )
    f.done()
    return vm


def _aks(raw: Any) -> AksPrices:
    f = _Fields(raw, "prices.aks")
    tiers = _Fields(f.required("control_plane_usd_per_hour", dict), f.where + ".control_plane")
    aks = AksPrices({tier: tiers.price(tier) for tier in tiers.names()}, f.source())
    f.done()
    return aks


def _azure_ml(raw: Any) -> AzureMlPrices:
    f = _Fields(raw, "prices.azure_ml")
    aml = AzureMlPrices(f.price("surcharge_usd_per_hour"), f.source())
    f.done()
    return aml


def _consumption(raw: Any) -> ConsumptionPrices:
    f = _Fields(raw, "prices.container_apps")
    names = [n for n in ConsumptionPrices.__dataclass_fields__ if n != "source"]
    values = {name: f.price(name) for name in names}
    prices = ConsumptionPrices(**values, source=f.source())
    f.done()
    return prices


def _gpu(name: str, raw: Any) -> GpuProfilePrice:
    f = _Fields(raw, f"prices.serverless_gpu.{name}")
    gpu = GpuProfilePrice(
        name=name,
        gpu=f.required("gpu", str),
        vcpu=f.required("vcpu", int),
        memory_gib=f.required("memory_gib", float),
        usd_per_second=f.price("usd_per_second"),
        source=f.source(),
    )
    f.done()
    return gpu


def _load_balancer(raw: Any) -> LoadBalancerPrices:
    f = _Fields(raw, "prices.load_balancer")
    lb = LoadBalancerPrices(f.price("usd_per_hour"), f.price("usd_per_gb_processed"), f.source())
    f.done()
    return lb


def _bandwidth(raw: Any) -> BandwidthPrices:
    f = _Fields(raw, "prices.bandwidth")
    bandwidth = BandwidthPrices(f.price("free_gb_per_month"), f.price("usd_per_gb"), f.source())
    f.done()
    return bandwidth


def _redis(name: str, raw: Any) -> RedisPrice:
    f = _Fields(raw, f"prices.redis.{name}")
    redis = RedisPrice(name, f.price("memory_gib"), f.price("usd_per_hour"), f.source())
    f.done()
    return redis


_PLATFORM_TYPES: dict[str, type[Any]] = {
    "name": str,
    "service": str,
    "device": str,
    "description": str,
    "min_replicas": int,
    "replicas_per_node": int,
    "vm": str,
    "control_plane": str,
    "system_vm": str,
    "system_nodes": int,
    "vcpu": float,
    "memory_gib": float,
    "gpu_profile": str,
    "in_flight_target": float,
    "max_replicas": int,
    "load_balancer": bool,
    "redis": str,
}


def _platform(index: int, raw: Any) -> Platform:
    name = raw.get("name", index) if isinstance(raw, dict) else index
    f = _Fields(raw, f"platforms[{name}]")
    values = {
        key: f.optional(key, kind, None)
        for key, kind in _PLATFORM_TYPES.items()
        if key in f.raw or key in ("name", "service", "device")
    }
    for key in ("name", "service", "device"):
        if values[key] is None:
            raise ValueError(f"{f.where}: missing {key!r}")
    f.done()
    try:
        return Platform(**values)
    except ValueError as err:
        raise ValueError(f"{f.where}: {err}") from None


def _apply_override(raw: Any, override: str) -> None:
    path, sep, text = override.partition("=")
    if not sep or not path:
        raise CostError(f"price override {override!r}: expected PATH=VALUE")
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = text  # a bare word such as a VM name or a tier
    parts = path.split(".")
    node = raw
    for part in parts[:-1]:
        node = _child(node, part, path)
    last = parts[-1]
    if not isinstance(node, dict) or last not in node:
        raise CostError(f"price override {override!r}: {path} does not exist")
    node[last] = value


def _child(node: Any, part: str, path: str) -> Any:
    if isinstance(node, dict) and part in node:
        return node[part]
    if isinstance(node, list):
        for item in node:
            if isinstance(item, dict) and item.get("name") == part:
                return item
    raise CostError(f"price override: {path} does not exist")
