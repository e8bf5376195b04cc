"""The cost model prices what is deployed: each platform of the shipped pricing table against the
deployment files it stands for, read at test time (Container Apps and Azure ML YAML, the
rendered Kubernetes overlays, the commands of docs/deploy.md)."""

from __future__ import annotations

import copy
import json
import re
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_deploy_k8s import find, overlay, thresholds

from batchserve.cost.pricing import Platform, Pricing, default_pricing_path, parse_pricing

ROOT = Path(__file__).resolve().parent.parent
AZURE = ROOT / "deploy" / "azure"
GUIDE = ROOT / "docs" / "deploy.md"
IN_FLIGHT = "batchserve_in_flight_requests"

# Which shipped definition each priced platform stands for.
CONTAINER_APPS = {"aca-cpu": "containerapp-cpu.yaml", "aca-gpu-t4": "containerapp-gpu.yaml",
                  "aca-gpu-a100": "containerapp-gpu.yaml"}  # fmt: skip
AZURE_ML = {"aml-cpu": "aml-deployment-cpu.yml", "aml-gpu-t4": "aml-deployment.yml",
            "aml-gpu-a100": "aml-deployment.yml"}  # fmt: skip
# aml-gpu-a100 is aml-deployment.yml with another instance_type (the guide names the size).
SAME_FILE_OTHER_SIZE = {"aml-gpu-a100"}
AKS_OVERLAYS = {"aks-cpu": ("cpu", "cpu-hpa"), "aks-gpu-t4": ("aks-gpu",),
                "aks-gpu-a100": ("aks-gpu",), "aks-gpu-h100": ("aks-gpu",)}  # fmt: skip


def shipped() -> dict[str, Any]:
    raw: dict[str, Any] = json.loads(default_pricing_path().read_text())
    return raw


def guide_commands(text: str) -> list[list[str]]:
    """Every command of the guide's sh blocks, continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n", " ", block)
        for line in joined.splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                try:
                    commands.append(shlex.split(line))
                except ValueError:
                    continue  # a heredoc or quoting this reader does not follow
    return commands


def option(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def az(commands: list[list[str]], *words: str) -> list[list[str]]:
    return [c for c in commands if c[: len(words) + 1] == ["az", *words]]


# ---------------------------------------------------------------------------------------------
# the checks, as functions of (pricing table, deployment texts), so a broken copy can fail them


def container_apps_problems(platform: Platform, app: dict[str, Any]) -> list[str]:
    template = app["properties"]["template"]
    scale = template["scale"]
    (rule,) = [r for r in scale["rules"] if "http" in r]
    concurrency = float(rule["http"]["metadata"]["concurrentRequests"])
    found = {
        "min_replicas": scale["minReplicas"],
        "max_replicas": scale["maxReplicas"],
        "in_flight_target": concurrency,
    }
    if platform.gpu_profile is None:
        (container,) = template["containers"]
        found["vcpu"] = float(container["resources"]["cpu"])
        found["memory_gib"] = float(container["resources"]["memory"].removesuffix("Gi"))
    return _differences(platform, found)


def azure_ml_problems(platform: Platform, deployment: dict[str, Any], size: bool) -> list[str]:
    found: dict[str, Any] = {"min_replicas": deployment["instance_count"]}
    if size:
        found["vm"] = deployment["instance_type"]
    return _differences(platform, found)


def aks_problems(platform: Platform, objects: list[dict[str, Any]]) -> list[str]:
    found: dict[str, Any] = {"in_flight_target": thresholds(objects)[IN_FLIGHT]}
    for o in objects:
        if o["kind"] == "ScaledObject":
            found |= {
                "min_replicas": o["spec"]["minReplicaCount"],
                "max_replicas": o["spec"]["maxReplicaCount"],
            }
        elif o["kind"] == "HorizontalPodAutoscaler":
            found |= {
                "min_replicas": o["spec"]["minReplicas"],
                "max_replicas": o["spec"]["maxReplicas"],
            }
    if platform.device == "gpu":
        resources = _server(objects)["resources"]["requests"]
        found["replicas_per_node"] = 1 // int(resources["nvidia.com/gpu"])  # one GPU a node
    # Azure Managed Redis comes in as a Secret (components/azure-redis); redis-dev runs in the
    # cluster and costs nothing apart.
    env = _server(objects).get("env", [])
    managed = any(e["name"] == "BATCHSERVE_REDIS_URL" and "valueFrom" in e for e in env)
    problems = _differences(platform, found)
    if managed != (platform.redis is not None):
        problems.append(f"{platform.name}: Redis priced {platform.redis}, managed: {managed}")
    return problems


def guide_problems(pricing: Pricing, text: str) -> list[str]:
    commands = guide_commands(text)
    problems: list[str] = []
    (create,) = az(commands, "aks", "create")
    system = (option(create, "--node-vm-size"), int(option(create, "--node-count")))
    gpu_pool = [c for c in az(commands, "aks", "nodepool", "add") if option(c, "-n") == "gpu"]
    gpu_vm = option(gpu_pool[0], "--node-vm-size") if gpu_pool else None
    redis_skus = {option(c, "--sku") for c in az(commands, "redisenterprise", "create")}
    ingress = bool(az(commands, "aks", "approuting", "enable"))
    added = az(commands, "containerapp", "env", "workload-profile", "add")
    profiles = {option(c, "--workload-profile-type") for c in added}
    for p in pricing.platforms:
        if p.service == "aks":
            if (p.system_vm, p.system_nodes) != system:
                problems.append(f"{p.name}: system pool {p.system_vm} x {p.system_nodes}, "
                                f"the guide creates {system[0]} x {system[1]}")  # fmt: skip
            if p.device == "gpu" and (p.vm is None or p.vm not in text):
                problems.append(f"{p.name}: the guide never names {p.vm}")
            if p.redis is not None and p.redis not in redis_skus:
                problems.append(f"{p.name}: Redis {p.redis}, the guide creates {redis_skus}")
            if p.load_balancer != ingress:
                problems.append(f"{p.name}: load balancer {p.load_balancer}, app routing {ingress}")
        if p.gpu_profile is not None and p.gpu_profile not in text:
            problems.append(f"{p.name}: the guide never names the GPU profile {p.gpu_profile}")
    if gpu_vm is not None and gpu_vm not in {p.vm for p in pricing.platforms if p.device == "gpu"}:
        problems.append(f"the guide's GPU pool {gpu_vm} is not priced")
    if not any(p.endswith(g) for p in profiles for g in _gpu_profiles(pricing)):
        problems.append(f"the guide's GPU workload profiles {profiles} are not priced")
    return problems


def azure_monitor_problems(pricing: Pricing, text: str) -> list[str]:
    """The guide's Azure ML autoscale rules are the simulation's AzureMonitorRules."""
    from batchserve.cost.simulate import AzureMonitorRules

    commands = guide_commands(text)
    problems = []
    (profile,) = az(commands, "monitor", "autoscale", "create")
    bounds = (int(option(profile, "--min-count")), int(option(profile, "--max-count")))
    for p in pricing.platforms:
        if p.service == "azure_ml" and (p.min_replicas, p.max_replicas) != bounds:
            problems.append(f"{p.name}: {p.min_replicas} to {p.max_replicas}, guide {bounds}")
    rules = AzureMonitorRules()
    expected = {
        "out": (">", rules.scale_out_above, rules.scale_out_window_s, rules.step),
        "in": ("<", rules.scale_in_below, rules.scale_in_window_s, rules.step),
    }
    for command in az(commands, "monitor", "autoscale", "rule", "create"):
        condition = re.fullmatch(
            r"\w+ ([<>]) (\d+(?:\.\d+)?) avg (\d+)m", option(command, "--condition")
        )
        assert condition, command
        direction, step = command[command.index("--scale") + 1 : command.index("--scale") + 3]
        cooldown = 60 * float(option(command, "--cooldown")) if "--cooldown" in command else 300
        found = (condition[1], float(condition[2]), 60 * float(condition[3]), int(step))
        if found != expected.pop(direction, None) or cooldown != rules.cooldown_s:
            problems.append(f"autoscale rule {command}: model {AzureMonitorRules()}")
    problems.extend(f"no scale-{d} rule in the guide" for d in expected)
    return problems


def _gpu_profiles(pricing: Pricing) -> set[str]:
    return {p.gpu_profile for p in pricing.platforms if p.gpu_profile is not None}


def _server(objects: list[dict[str, Any]]) -> dict[str, Any]:
    spec = find(objects, "Deployment")["spec"]["template"]["spec"]
    container: dict[str, Any] = next(c for c in spec["containers"] if c["name"] == "batchserve")
    return container


def _differences(platform: Platform, found: dict[str, Any]) -> list[str]:
    return [
        f"{platform.name}.{key}: model {getattr(platform, key)!r}, deployed {value!r}"
        for key, value in found.items()
        if getattr(platform, key) != value
    ]


# ---------------------------------------------------------------------------------------------
# the shipped model against the shipped definitions


def load_yaml(name: str) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((AZURE / name).read_text())
    return data


@pytest.fixture(scope="module")
def pricing() -> Pricing:
    return parse_pricing(shipped())


@pytest.mark.parametrize("name", sorted(CONTAINER_APPS))
def test_container_apps_platforms_match_their_yaml(pricing: Pricing, name: str) -> None:
    app = load_yaml(CONTAINER_APPS[name])
    assert container_apps_problems(pricing.platform(name), app) == []


@pytest.mark.parametrize("name", sorted(AZURE_ML))
def test_azure_ml_platforms_match_their_deployment(pricing: Pricing, name: str) -> None:
    deployment = load_yaml(AZURE_ML[name])
    problems = azure_ml_problems(
        pricing.platform(name), deployment, name not in SAME_FILE_OTHER_SIZE
    )
    assert problems == []


@pytest.mark.parametrize(("name", "folder"), [(n, o) for n, os in AKS_OVERLAYS.items() for o in os])
def test_aks_platforms_match_their_overlay(pricing: Pricing, name: str, folder: str) -> None:
    assert aks_problems(pricing.platform(name), overlay(folder)) == []


def test_the_model_matches_the_guide(pricing: Pricing) -> None:
    assert guide_problems(pricing, GUIDE.read_text()) == []


def test_azure_ml_autoscaling_matches_the_guide(pricing: Pricing) -> None:
    assert azure_monitor_problems(pricing, GUIDE.read_text()) == []


def test_every_platform_is_compared(pricing: Pricing) -> None:
    compared = set(CONTAINER_APPS) | set(AZURE_ML) | set(AKS_OVERLAYS)
    assert {p.name for p in pricing.platforms} == compared


# ---------------------------------------------------------------------------------------------
# the checks fail on a model (or a deployment) that differs


def broken(change: Callable[[dict[str, Any]], None]) -> Pricing:
    raw = copy.deepcopy(shipped())
    change(raw)
    return parse_pricing(raw)


def platform_entry(raw: dict[str, Any], name: str) -> dict[str, Any]:
    entry: dict[str, Any] = next(p for p in raw["platforms"] if p["name"] == name)
    return entry


def test_the_shape_checks_reject_a_model_that_differs() -> None:
    def scale_to_zero(raw: dict[str, Any]) -> None:
        platform_entry(raw, "aca-cpu")["min_replicas"] = 0

    def three_f4s(raw: dict[str, Any]) -> None:
        raw["prices"]["vms"]["Standard_F4s_v2"] = raw["prices"]["vms"]["Standard_D4s_v5"]
        platform_entry(raw, "aml-cpu").update(vm="Standard_F4s_v2", min_replicas=3)

    def two_system_nodes(raw: dict[str, Any]) -> None:
        platform_entry(raw, "aks-gpu-t4")["system_nodes"] = 2

    def old_threshold(raw: dict[str, Any]) -> None:
        platform_entry(raw, "aks-gpu-t4")["in_flight_target"] = 1000

    app = load_yaml(CONTAINER_APPS["aca-cpu"])
    assert container_apps_problems(broken(scale_to_zero).platform("aca-cpu"), app)
    deployment = load_yaml(AZURE_ML["aml-cpu"])
    problems = azure_ml_problems(broken(three_f4s).platform("aml-cpu"), deployment, True)
    assert len(problems) == 2
    assert guide_problems(broken(two_system_nodes), GUIDE.read_text())
    assert aks_problems(broken(old_threshold).platform("aks-gpu-t4"), overlay("aks-gpu"))


def test_the_guide_check_rejects_another_size_or_sku(pricing: Pricing) -> None:
    text = GUIDE.read_text()
    assert "--node-count 3" in text
    assert guide_problems(pricing, text.replace("--node-count 3", "--node-count 5"))
    assert guide_problems(pricing, text.replace("--sku Balanced_B0", "--sku Balanced_B1"))
    assert guide_problems(pricing, text.replace("az aks approuting enable", "true"))
    assert azure_monitor_problems(pricing, text.replace("> 70 avg 5m", "> 80 avg 5m"))
    assert azure_monitor_problems(pricing, text.replace("--max-count 6", "--max-count 9"))


def keda_problems(objects: list[dict[str, Any]]) -> list[str]:
    """The simulation's KedaHpaRules against a rendered ScaledObject's polling and behaviour."""
    from batchserve.cost.simulate import KedaHpaRules

    rules = KedaHpaRules()
    scaled = find(objects, "ScaledObject")["spec"]
    behavior = scaled["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    up, down = behavior["scaleUp"], behavior["scaleDown"]
    policies = {(p["type"], p["value"], p["periodSeconds"]) for p in up["policies"]}
    (trigger,) = [t for t in scaled["triggers"] if IN_FLIGHT in t["metadata"]["query"]]
    found = {
        "polling_interval_s": scaled["pollingInterval"],
        "scale_up_stabilization_s": up["stabilizationWindowSeconds"],
        "scale_down_stabilization_s": down["stabilizationWindowSeconds"],
        # avg_over_time(...[1m]): the window the in-flight gauge is averaged over
        "metric_window_s": 60 if "[1m]" in trigger["metadata"]["query"] else None,
    }  # fmt: skip
    problems = [f"{k}: model {getattr(rules, k)}, shipped {v}" for k, v in found.items()
                if getattr(rules, k) != v]  # fmt: skip
    expected_up = {
        ("Percent", rules.scale_up_percent, rules.scale_up_period_s),
        ("Pods", rules.scale_up_pods, rules.scale_up_period_s),
    }
    if (up["selectPolicy"], policies) != ("Max", expected_up):
        problems.append(f"scale-up policies {up}")
    (limit,) = down["policies"]
    expected_down = ("Percent", rules.scale_down_percent, rules.scale_down_period_s)
    if (limit["type"], limit["value"], limit["periodSeconds"]) != expected_down:
        problems.append(f"scale-down policies {down}")
    return problems


@pytest.mark.parametrize("folder", ["cpu", "aks-gpu"])
def test_the_simulated_keda_rules_are_the_shipped_ones(folder: str) -> None:
    assert keda_problems(overlay(folder)) == []


def test_the_keda_check_rejects_other_behaviour() -> None:
    objects = overlay("cpu")
    scaled = find(objects, "ScaledObject")["spec"]
    scaled["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]["policies"][0][
        "value"
    ] = 100
    scaled["pollingInterval"] = 30
    assert len(keda_problems(objects)) == 2
