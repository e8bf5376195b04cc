"""The infrastructure as code (deploy/infra/main.bicep), offline: it parses, every resource's
properties are fields of the Azure API's own models for its type, every property it reads from a
deployed resource exists, and it builds the cluster that docs/deploy.md, the kustomize overlays
and the cost model (deploy/azure/pricing.json) describe."""

from __future__ import annotations

import enum
import functools
import importlib
import json
import os
import re
import shlex
import types
import typing
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from test_deploy_k8s import K8S, KUBERNETES_VERSIONS, Manifest, overlay

ROOT = Path(__file__).resolve().parent.parent
BICEP = ROOT / "deploy" / "infra" / "main.bicep"
GUIDE = ROOT / "docs" / "deploy.md"
PRICING = ROOT / "deploy" / "azure" / "pricing.json"
GPU_OVERLAYS = ("aks-gpu", "aks-gpu-shared")
GPU_POOL = "gpu"
# Labels AKS itself puts on every node of a pool (the pool's name) and of an N-series pool.
AKS_POOL_LABELS = ("agentpool", "kubernetes.azure.com/agentpool")
AKS_GPU_LABELS = {"kubernetes.azure.com/accelerator": "nvidia"}
# The label by which the NVIDIA device plugin picks its configuration on a node.
DEVICE_PLUGIN_CONFIG = "nvidia.com/device-plugin.config"
# Each resource type, the API version it is deployed at, and the model of that API version in
# the Azure SDK for Python (generated from the same REST API specifications as Bicep's types).
MODELS = {
    "Microsoft.ContainerService/managedClusters": (
        "2026-08-01",
        "azure.mgmt.containerservice.models",
        "ManagedCluster",
    ),
    "Microsoft.ContainerService/managedClusters/agentPools": (
        "2026-08-01",
        "azure.mgmt.containerservice.models",
        "AgentPool",
    ),
    "Microsoft.ContainerRegistry/registries": (
        "2025-11-01",
        "azure.mgmt.containerregistry.models",
        "Registry",
    ),
    "Microsoft.Authorization/roleAssignments": (
        "2022-04-01",
        "azure.mgmt.authorization.v2022_04_01.models",
        "RoleAssignmentCreateParameters",
    ),
    "Microsoft.Cache/redisEnterprise": (
        "2025-07-01",
        "azure.mgmt.redisenterprise.models",
        "Cluster",
    ),
    "Microsoft.Cache/redisEnterprise/databases": (
        "2025-07-01",
        "azure.mgmt.redisenterprise.models",
        "Database",
    ),
    "Microsoft.Monitor/accounts": (
        "2023-04-03",
        "azure.mgmt.monitor.models",
        "AzureMonitorWorkspaceResource",
    ),
    "Microsoft.Insights/dataCollectionEndpoints": (
        "2023-03-11",
        "azure.mgmt.monitor.models",
        "DataCollectionEndpointResource",
    ),
    "Microsoft.Insights/dataCollectionRules": (
        "2023-03-11",
        "azure.mgmt.monitor.models",
        "DataCollectionRuleResource",
    ),
    "Microsoft.Insights/dataCollectionRuleAssociations": (
        "2023-03-11",
        "azure.mgmt.monitor.models",
        "DataCollectionRuleAssociationProxyOnlyResource",
    ),
    "Microsoft.Dashboard/grafana": ("2025-08-01", "azure.mgmt.dashboard.models", "ManagedGrafana"),
}
# Bicep's own keys in a resource body, which no API model carries.
BICEP_KEYS = {"name", "parent", "scope", "dependsOn"}
ACR_PULL_ROLE = "7f951dda-4ed3-4680-a7ca-43fe172d538d"
PRIMITIVES: dict[Any, tuple[type, ...]] = {
    float: (int, float),
    int: (int,),
    str: (str,),
    bool: (bool,),
}
ENUM_PEERS = {"KnownDataFlowStreams": "DataSourceStreams"}
MSREST_TYPES: dict[str, Any] = {
    "str": str,
    "int": int,
    "bool": bool,
    "float": float,
    "iso-8601": str,
    "object": Any,
}

Document = dict[str, Any]


def required(module: str) -> Any:
    """Import an optional `deploy` extra, or skip (fail where the extra is required)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # their import-time deprecations are not ours
            return importlib.import_module(module)
    except ImportError:
        if os.environ.get("BATCHSERVE_REQUIRE_DEPLOY"):
            pytest.fail(f"{module} is required here (BATCHSERVE_REQUIRE_DEPLOY is set)")
        pytest.skip(f"{module} is not installed (pip install '.[deploy]')")


def parse(text: str) -> Document:
    """The Bicep file as pycep-parser's tree (what checkov reads Bicep with)."""
    pycep = required("pycep")
    tree = pycep.BicepParser().parse(text=text)
    assert isinstance(tree, dict)
    return tree


@functools.cache
def _shipped() -> str:
    return json.dumps(parse(BICEP.read_text()))


def shipped() -> Document:
    """The parsed main.bicep, a fresh copy each time (tests cannot share state)."""
    return json.loads(_shipped())  # type: ignore[no-any-return]


def broken(tmp_path: Path, old: str, new: str) -> Document:
    """main.bicep with one deliberate mistake, parsed."""
    text = BICEP.read_text()
    assert old in text, f"main.bicep no longer contains {old!r}: update this test"
    path = tmp_path / "main.bicep"
    path.write_text(text.replace(old, new, 1))
    return parse(path.read_text())


# -- Reading the tree ----------------------------------------------------------------------------


def is_expression(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and len(value) == 1
        and next(iter(value)) in ("operator", "function")
    )


def resources(doc: Document) -> dict[str, Document]:
    """Symbolic name -> {"type", "api_version", "config"}, conditions unwrapped."""
    found = {}
    for name, resource in doc["resources"].items():
        config = resource["config"]
        if "condition" in config and "config" in config:  # resource ... = if (...) { ... }
            config = config["config"]
        found[name] = {**resource, "config": config}
    return found


def of_type(doc: Document, kind: str) -> list[Document]:
    return [r["config"] for r in resources(doc).values() if r["type"] == kind]


def one(doc: Document, kind: str) -> Document:
    found = of_type(doc, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def value(doc: Document, item: Any) -> Any:
    """A literal, with a parameter replaced by its default and a variable by its value."""
    if isinstance(item, str) and item in doc.get("parameters", {}):
        return value(doc, doc["parameters"][item].get("default"))
    if isinstance(item, str) and item in doc.get("variables", {}):
        return value(doc, doc["variables"][item]["value"])
    return item


def branches(doc: Document, item: Any) -> list[Any]:
    """Every value an expression may take: both sides of `c ? a : b`, or the literal."""
    if is_expression(item) and item.get("operator", {}).get("type") == "conditional":
        operands = item["operator"]["operands"]
        return [*branches(doc, operands["true_value"]), *branches(doc, operands["false_value"])]
    return [value(doc, item)]


def allowed(doc: Document, parameter: str) -> list[Any]:
    for decorator in doc["parameters"][parameter]["decorators"]:
        if decorator["type"] == "allowed":
            return list(decorator["argument"])
    return []


def unquote(key: str) -> str:
    """Bicep quotes keys that are not identifiers ('nvidia.com/x'); the tree keeps the quotes."""
    return key[1:-1] if len(key) > 1 and key[0] == key[-1] == "'" else key


def labels(doc: Document, pool: Document) -> list[dict[str, str]]:
    """The pool's node labels (its properties'), once per value their expression may take."""
    return [
        {unquote(k): v for k, v in (option or {}).items()}
        for option in branches(doc, pool.get("nodeLabels", {}))
    ]


def system_pool(doc: Document) -> Document:
    pools = one(doc, "Microsoft.ContainerService/managedClusters")["properties"][
        "agentPoolProfiles"
    ]
    system = [p for p in pools if p.get("mode") == "System"]
    assert len(system) == 1, "expected one system pool"
    return system[0]  # type: ignore[no-any-return]


def gpu_pool(doc: Document) -> Document:
    pools = [
        p
        for p in of_type(doc, "Microsoft.ContainerService/managedClusters/agentPools")
        if p["name"] == GPU_POOL
    ]
    assert len(pools) == 1, f"expected one agent pool named {GPU_POOL}"
    return pools[0]


def walk(item: Any) -> Iterator[Any]:
    yield item
    children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
    for child in children:
        yield from walk(child)


# -- The API models ------------------------------------------------------------------------------

# REST name -> (annotation, writable); a flattened group ("properties.x" in an msrest model) is
# itself such a mapping.
Fields = dict[str, tuple[Any, bool]]


def _models_of(model: type) -> types.ModuleType:
    return importlib.import_module(model.__module__.rsplit(".", 1)[0])


def _rest_fields(model: type) -> Fields:
    """Fields of a model generated from TypeSpec (azure.mgmt.*.models._models)."""
    hints = typing.get_type_hints(model, localns={"_models": _models_of(model)})
    fields: Fields = {}
    for cls in reversed(model.__mro__):
        for attribute, field in vars(cls).items():
            if type(field).__name__ == "_RestField":
                writable = field._visibility is None or "create" in field._visibility
                fields[field._rest_name_input or attribute] = (hints[attribute], writable)
    return fields


def _msrest_type(model: type, name: str) -> Any:
    if name in MSREST_TYPES:
        return MSREST_TYPES[name]
    if name.startswith("[") and name.endswith("]"):
        return list[_msrest_type(model, name[1:-1])]  # type: ignore[misc]
    if name.startswith("{") and name.endswith("}"):
        return dict[str, _msrest_type(model, name[1:-1])]  # type: ignore[misc]
    return getattr(_models_of(model), name)


def _msrest_fields(model: Any) -> Fields:
    """Fields of an AutoRest (msrest) model, flattened "properties.x" keys nested again."""
    hints = typing.get_type_hints(model.__init__, localns={"_models": _models_of(model)})
    fields: Fields = {}
    for attribute, spec in model._attribute_map.items():
        writable = not model._validation.get(attribute, {}).get("readonly", False)
        annotation = hints.get(attribute, _msrest_type(model, spec["type"]))
        *groups, last = re.split(r"(?<!\\)\.", spec["key"])
        level = fields
        for group in groups:
            level = level.setdefault(group, ({}, True))[0]
        level[last.replace("\\.", ".")] = (annotation, writable)
    return fields


def fields(model: Any) -> Fields:
    if isinstance(model, dict):
        return model
    return _msrest_fields(model) if hasattr(model, "_attribute_map") else _rest_fields(model)


def _options(annotation: Any) -> tuple[Any, list[type[enum.Enum]]]:
    """Optional[X] -> X; Union[str, SomeEnum] -> (str, [SomeEnum])."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    enums = [a for a in args if isinstance(a, type) and issubclass(a, enum.Enum)]
    return (str if enums else args[0]), enums


def peers(enums: list[type[enum.Enum]]) -> list[type[enum.Enum]]:
    """Enums whose values an enum also takes: a data flow carries the streams its rule's data
    sources declare, while the SDK's enum for it lists only the monitoring agent's own."""
    found = []
    for e in enums:
        if e.__name__ in ENUM_PEERS:
            module = importlib.import_module(e.__module__)
            found += [
                v
                for k, v in vars(module).items()
                if k.endswith(ENUM_PEERS[e.__name__]) and isinstance(v, type)
            ]
    return found


def schema_problems(doc: Document, item: Any, annotation: Any, where: str) -> list[str]:
    if is_expression(item):
        options = branches(doc, item)
        if len(options) == 1:
            return []  # computed at deployment: its properties are checked by accessor_problems
        return [p for o in options for p in schema_problems(doc, o, annotation, where)]
    if isinstance(item, str) and item in doc.get("parameters", {}) and allowed(doc, item):
        options = allowed(doc, item)
        return [p for o in options for p in schema_problems(doc, o, annotation, where)]
    item = value(doc, item)
    if (
        annotation is Any
        or is_expression(item)
        or (isinstance(item, str) and item in resources(doc))
    ):
        return []
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        annotation, enums = _options(annotation)
        if enums:  # an extensible enum: any string goes to the API, but ours must be known
            known = {str(m.value).lower() for e in [*enums, *peers(enums)] for m in e}
            ok = isinstance(item, str) and item.lower() in known
            return [] if ok else [f"{where}: {item!r} is not one of {sorted(known)}"]
        return schema_problems(doc, item, annotation, where)
    args = typing.get_args(annotation)
    if origin is list:
        if not isinstance(item, list):
            return [f"{where}: expected a list"]
        return [
            p for n, v in enumerate(item) for p in schema_problems(doc, v, args[0], f"{where}[{n}]")
        ]
    if origin is dict:
        if not isinstance(item, dict):
            return [f"{where}: expected a mapping"]
        return [
            p for k, v in item.items() for p in schema_problems(doc, v, args[1], f"{where}.{k}")
        ]
    if not isinstance(annotation, dict) and annotation in PRIMITIVES:
        # true is no number, and an integer is a fine float.
        ok = isinstance(item, PRIMITIVES[annotation]) and (
            annotation is bool or not isinstance(item, bool)
        )
        return [] if ok else [f"{where}: {item!r} is not {annotation.__name__}"]
    return model_problems(doc, item, annotation, where)


def model_problems(doc: Document, item: Any, model: Any, where: str) -> list[str]:
    name = getattr(model, "__name__", "properties")
    if not isinstance(item, dict):
        return [f"{where}: expected an object ({name})"]
    known = fields(model)
    problems = []
    for key, child in item.items():
        key = unquote(key)
        if key not in known:
            problems.append(f"{where}.{key}: not a field of {name}")
        elif not known[key][1]:
            problems.append(f"{where}.{key}: read-only")
        else:
            problems += schema_problems(doc, child, known[key][0], f"{where}.{key}")
    return problems


def model(kind: str) -> Any:
    _, module, name = MODELS[kind]
    return getattr(required(module), name)


def resource_problems(doc: Document) -> list[str]:
    """Every property of every resource, checked against its API model."""
    problems = []
    for symbol, resource in resources(doc).items():
        kind = resource["type"]
        if kind not in MODELS:
            problems.append(f"{symbol}: no API model listed for {kind}")
            continue
        if resource["api_version"] != MODELS[kind][0]:
            problems.append(
                f"{symbol}: API version {resource['api_version']} is not the one checked"
            )
        body = {k: v for k, v in resource["config"].items() if k not in BICEP_KEYS}
        problems += model_problems(doc, body, model(kind), symbol)
    return problems


def _accessor_path(item: Any) -> list[Any]:
    """a.b.c as ["a", "b", "c"] (pycep nests property accessors to the right)."""
    if is_expression(item) and item.get("operator", {}).get("type") == "property_accessor":
        operands = item["operator"]["operands"]
        return [*_accessor_path(operands["operand_1"]), *_accessor_path(operands["operand_2"])]
    return [item]


def accessor_problems(doc: Document) -> list[str]:
    """Every `resource.property...` the file reads (outputs, role assignments) exists."""
    symbols = resources(doc)
    problems = []
    for item in walk([doc["resources"], doc.get("outputs", {})]):
        path = _accessor_path(item)
        if len(path) < 2 or not isinstance(path[0], str) or path[0] not in symbols:
            continue
        annotation: Any = model(symbols[path[0]]["type"])
        for step in path[1:]:
            annotation = _step(annotation, step)
            if annotation is None:
                problems.append(f"{'.'.join(map(str, path))}: no {step!r} there")
                break
    return problems


def _step(annotation: Any, step: str) -> Any:
    """The type of `x.step` for an `x` of this type; None where there is no such property."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return _step(_options(annotation)[0], step)
    if origin is dict:
        return typing.get_args(annotation)[1]
    if annotation is Any:
        return Any
    if isinstance(annotation, dict) or (
        isinstance(annotation, type) and annotation not in PRIMITIVES
    ):
        known = fields(annotation)
        return known[step][0] if step in known else None
    return None


# -- The guide's az commands ---------------------------------------------------------------------


def guide_commands(prefix: str) -> list[dict[str, list[str]]]:
    """The options of each `az ...` command in the AKS section of docs/deploy.md that starts
    with `prefix`: {"--zones": ["1", "2", "3"], ...}."""
    text = GUIDE.read_text()
    start = text.index("## AKS with a GPU node pool")
    end = text.find("\n## ", start + 1)
    section = text[start : end if end > 0 else len(text)]
    blocks = re.findall(r"```sh\n(.*?)```", section, flags=re.S)
    lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
    found = []
    for line in lines:
        if not line.lstrip().startswith(f"{prefix} "):
            continue  # other lines need not be shlex-clean (heredocs, nested quotes)
        words = shlex.split(line, comments=True)
        if words[: len(prefix.split())] != prefix.split():
            continue
        options: dict[str, list[str]] = {}
        current = None
        for word in words:
            if word.startswith("-"):
                current = options.setdefault(word, [])
            elif current is not None:
                current.append(word)
        found.append(options)
    return found


def literal(values: list[str]) -> bool:
    """A value the guide spells out, not one it takes from a shell variable."""
    return bool(values) and not any("$" in v for v in values)


def cluster_flags(doc: Document) -> dict[str, Any]:
    """What each `az aks create`/`update` option of the guide sets, as this file sets it."""
    aks = one(doc, "Microsoft.ContainerService/managedClusters")
    props, system = aks["properties"], system_pool(doc)
    network = props.get("networkProfile", {})

    def enabled(*path: str) -> bool:
        item: Any = props
        for key in path:
            item = item.get(key, {}) if isinstance(item, dict) else {}
        return value(doc, item) is True

    return {
        "--tier": [str(aks["sku"]["tier"]).lower()],
        "--enable-managed-identity": aks.get("identity", {}).get("type") == "SystemAssigned",
        "--network-plugin": [network.get("networkPlugin")],
        "--network-plugin-mode": [network.get("networkPluginMode")],
        "--network-dataplane": [network.get("networkDataplane")],
        "--network-policy": [network.get("networkPolicy")],
        "--node-count": [str(value(doc, system["count"]))],
        "--node-vm-size": [value(doc, system["vmSize"])],
        "--zones": value(doc, system.get("availabilityZones", [])),
        "--kubernetes-version": [value(doc, props.get("kubernetesVersion"))],
        "--enable-keda": enabled("workloadAutoScalerProfile", "keda", "enabled"),
        "--enable-app-routing": enabled("ingressProfile", "webAppRouting", "enabled"),
        "--enable-oidc-issuer": enabled("oidcIssuerProfile", "enabled"),
        "--enable-workload-identity": enabled("securityProfile", "workloadIdentity", "enabled"),
        "--enable-azure-monitor-metrics": enabled("azureMonitorProfile", "metrics", "enabled"),
    }


def gpu_pool_flags(doc: Document) -> dict[str, Any]:
    """What each `az aks nodepool add` option of the guide sets, as this file sets it."""
    pool = gpu_pool(doc)["properties"]
    return {
        "-n": [GPU_POOL],
        "--node-count": [str(value(doc, pool.get("count")))],
        "--node-vm-size": [value(doc, pool["vmSize"])],
        "--node-taints": [",".join(value(doc, pool.get("nodeTaints", [])))],
        "--min-count": [str(value(doc, pool.get("minCount")))],
        "--max-count": [str(value(doc, pool.get("maxCount")))],
        "--zones": value(doc, pool.get("availabilityZones", [])),
        "--enable-cluster-autoscaler": value(doc, pool.get("enableAutoScaling")) is True,
    }


def kubelet_pulls(doc: Document) -> bool:
    """An AcrPull role assignment on the registry for the cluster's kubelet identity."""
    registry = [s for s, r in resources(doc).items() if r["type"].endswith("/registries")]
    for grant in of_type(doc, "Microsoft.Authorization/roleAssignments"):
        role = grant["properties"]["roleDefinitionId"]
        names = role.get("function", {}).get("parameters", {}) if is_expression(role) else {}
        principal = _accessor_path(grant["properties"]["principalId"])
        if (
            grant.get("scope") in registry
            and value(doc, names.get("resource_name_1")) == ACR_PULL_ROLE
            and principal[-2:] == ["kubeletidentity", "objectId"]
        ):
            return True
    return False


def redis_flags(doc: Document) -> dict[str, Any]:
    """What each `az redisenterprise create` option of the guide sets, as this file sets it."""
    cluster = one(doc, "Microsoft.Cache/redisEnterprise")
    database = one(doc, "Microsoft.Cache/redisEnterprise/databases")["properties"]
    settings = {
        "--sku": value(doc, cluster["sku"]["name"]),
        "--minimum-tls-version": cluster["properties"].get("minimumTlsVersion"),
        "--public-network-access": cluster["properties"].get("publicNetworkAccess"),
        "--client-protocol": database.get("clientProtocol"),
        "--port": database.get("port"),
        "--clustering-policy": database.get("clusteringPolicy"),
        "--eviction-policy": database.get("evictionPolicy"),
        "--access-keys-authentication": database.get("accessKeysAuthentication"),
    }
    return {k: [str(value(doc, v))] for k, v in settings.items() if v is not None}


def guide_problems(doc: Document) -> list[str]:
    """Each option the guide's az commands give the cluster, its pools and its registry has the
    same value here (options the guide takes from shell variables excepted)."""
    problems = []
    checks = [
        ("az aks create", cluster_flags(doc)),
        ("az aks update", cluster_flags(doc)),
        ("az aks nodepool add", gpu_pool_flags(doc)),
        ("az redisenterprise create", redis_flags(doc)),
    ]
    for command, ours in checks:
        for options in guide_commands(command):
            if command == "az aks nodepool add" and options.get("-n") != [GPU_POOL]:
                continue
            for flag, theirs in options.items():
                mine = ours.get(flag)
                if isinstance(mine, bool):  # a switch: the guide's on means ours must be on
                    if not mine:
                        problems.append(f"{command} {flag}: not enabled in main.bicep")
                elif mine is not None and literal(theirs) and theirs != mine:
                    problems.append(f"{command} {flag}: the guide says {theirs}, main.bicep {mine}")
    if any("--attach-acr" in o for o in guide_commands("az aks create")) and not kubelet_pulls(doc):
        problems.append("az aks create --attach-acr: the kubelet may not pull from the registry")
    if (
        guide_commands("az aks approuting enable")
        and not cluster_flags(doc)["--enable-app-routing"]
    ):
        problems.append("az aks approuting enable: the application routing add-on is off")
    for options in guide_commands("az acr create"):
        sku = one(doc, "Microsoft.ContainerRegistry/registries")["sku"]["name"]
        if literal(options.get("--sku", [])) and options["--sku"] != [sku]:
            problems.append(
                f"az acr create --sku: the guide says {options['--sku']}, main.bicep {sku}"
            )
    return problems


# -- The manifests -------------------------------------------------------------------------------


def pod_spec(manifests: list[Manifest]) -> Manifest:
    deployments = [m for m in manifests if m["kind"] == "Deployment"]
    assert len(deployments) == 1
    return deployments[0]["spec"]["template"]["spec"]  # type: ignore[no-any-return]


def required_labels(spec: Manifest) -> dict[str, set[str]]:
    """Node labels the pod cannot schedule without: nodeSelector and the required affinity's
    `In` expressions (one term: several terms would be alternatives)."""
    needed = {k: {v} for k, v in spec.get("nodeSelector", {}).items()}
    affinity = spec.get("affinity", {}).get("nodeAffinity", {})
    terms = affinity.get("requiredDuringSchedulingIgnoredDuringExecution", {}).get(
        "nodeSelectorTerms", []
    )
    assert len(terms) <= 1, "several node selector terms: teach this test which one applies"
    for term in terms:
        for expression in term.get("matchExpressions", []):
            assert expression["operator"] == "In", expression
            needed[expression["key"]] = set(expression["values"])
    return needed


def tolerated(taint: str, tolerations: list[Manifest]) -> bool:
    """`key=value:effect` against the pod's tolerations, by Kubernetes' matching rules."""
    key_value, _, effect = taint.partition(":")
    key, _, taint_value = key_value.partition("=")
    for t in tolerations:
        if t.get("effect") not in (None, "", effect) or t.get("key") not in (None, "", key):
            continue
        if t.get("operator", "Equal") == "Exists" or t.get("value", "") == taint_value:
            return True
    return False


def time_slicing_labels() -> dict[str, dict[str, str]]:
    """Per configuration of cluster/gpu-sharing, the node label GPU Feature Discovery sets."""
    config = yaml.safe_load((K8S / "cluster" / "gpu-sharing" / "time-slicing.yaml").read_text())
    labels = {}
    for name, text in config["data"].items():
        (gpu,) = yaml.safe_load(text)["sharing"]["timeSlicing"]["resources"]
        labels[name] = {"nvidia.com/gpu.replicas": str(gpu["replicas"])}
    return labels


def placement_problems(doc: Document, manifests: list[Manifest], name: str) -> list[str]:
    """The overlay's pods tolerate every taint of the GPU pool and find every node label they
    require on it, for some setting of the pool's parameters."""
    spec = pod_spec(manifests)
    pool = gpu_pool(doc)["properties"]
    problems = [
        f"{name}: no toleration for the GPU pool's taint {taint}"
        for taint in value(doc, pool.get("nodeTaints", []))
        if not tolerated(taint, spec.get("tolerations", []))
    ]
    needed = required_labels(spec)
    sliced = time_slicing_labels()
    for option in labels(doc, pool):
        node = {**{k: GPU_POOL for k in AKS_POOL_LABELS}, **AKS_GPU_LABELS, **option}
        node.update(sliced.get(option.get(DEVICE_PLUGIN_CONFIG, ""), {}))
        if all(node.get(k) in v for k, v in needed.items()):
            return problems
    return [*problems, f"{name}: no setting of the GPU pool gives the node labels {needed}"]


def egress_ports(manifests: list[Manifest]) -> set[int]:
    policies = [m for m in manifests if m["kind"] == "NetworkPolicy"]
    return {
        int(p["port"])
        for policy in policies
        for rule in policy["spec"].get("egress", [])
        for p in rule.get("ports", [])
        if str(p.get("port", "")).isdigit()
    }


def redis_problems(doc: Document) -> list[str]:
    """Managed Redis listens, with TLS only, on the port that components/azure-redis opens in the
    egress NetworkPolicy (the ports aks-gpu allows beyond the CPU overlay's)."""
    database = one(doc, "Microsoft.Cache/redisEnterprise/databases")["properties"]
    port = value(doc, database.get("port"))
    opened = egress_ports(overlay("aks-gpu")) - egress_ports(overlay("cpu"))
    problems = []
    if port not in opened:
        problems.append(
            f"Redis listens on {port}; the aks-gpu egress policy opens {sorted(opened)}"
        )
    if value(doc, database.get("clientProtocol")) != "Encrypted":
        problems.append("Redis accepts clients without TLS (clientProtocol is not Encrypted)")
    return problems


# -- The cost model ------------------------------------------------------------------------------


def cost_problems(doc: Document, pricing: Document) -> list[str]:
    """The GPU sizes, system pool and control-plane tier priced for AKS are the ones deployed."""
    aks = [p for p in pricing["platforms"] if p["service"] == "aks"]
    gpu_sizes = {p["vm"] for p in aks if p["device"] == "gpu"}
    system = system_pool(doc)
    tier = one(doc, "Microsoft.ContainerService/managedClusters")["sku"]["tier"]
    redis = value(doc, one(doc, "Microsoft.Cache/redisEnterprise")["sku"]["name"])
    problems = [
        f"{p['name']}: priced with Redis {p['redis']}, deployed {redis}"
        for p in aks
        if p["device"] == "gpu" and "redis" in p and p["redis"] != redis
    ]
    if set(allowed(doc, "gpuVmSize")) != gpu_sizes:
        problems.append(
            f"GPU sizes {allowed(doc, 'gpuVmSize')}, priced for AKS: {sorted(gpu_sizes)}"
        )
    if value(doc, "gpuVmSize") not in gpu_sizes:
        problems.append(f"the default GPU size {value(doc, 'gpuVmSize')} is not priced")
    for platform in aks:
        ours = (value(doc, system["vmSize"]), value(doc, system["count"]), str(tier).lower())
        theirs = (platform["system_vm"], platform["system_nodes"], platform["control_plane"])
        if ours != theirs:
            problems.append(
                f"{platform['name']}: priced with system pool and tier {theirs}, deployed {ours}"
            )
    return problems


# -- Tests ---------------------------------------------------------------------------------------


def test_the_bicep_file_parses() -> None:
    doc = shipped()
    assert doc["globals"]["scope"]["value"] == "resourceGroup"
    assert {"location", "namePrefix", "gpuVmSize", "gpuMinCount", "gpuMaxCount", "zones"} <= set(
        doc["parameters"]
    )


def test_a_syntax_error_fails_the_parse() -> None:
    text = BICEP.read_text()
    assert "    networkDataplane: 'cilium'\n" in text
    with pytest.raises(Exception, match=r"(?i)unexpected|expected|token"):
        parse(text.replace("    networkDataplane: 'cilium'\n", "    networkDataplane 'cilium'\n"))


def test_every_resource_matches_its_api_model() -> None:
    doc = shipped()
    assert {r["type"] for r in resources(doc).values()} == set(MODELS)
    assert resource_problems(doc) == []


def test_the_models_are_those_of_the_deployed_api_versions() -> None:
    """The SDK's client sends the API version MODELS names, so its models describe that version
    (packages that carry several versions send each from the operations it belongs to)."""
    for kind, (version, module, _) in MODELS.items():
        package = Path(required(module).__file__).parent.parent
        sources = " ".join(f.read_text() for f in (package / "operations").glob("*.py"))
        assert f'"api-version", "{version}"' in sources, f"{kind}: {module} does not send {version}"


def test_the_api_model_check_can_fail(tmp_path: Path) -> None:
    doc = broken(tmp_path, "    nodeTaints: [", "    nodeTaint: [")
    assert any("gpuPool.properties.nodeTaint: not a field" in p for p in resource_problems(doc))
    doc = broken(tmp_path, "networkPolicy: 'cilium'", "networkPolicy: 'cillium'")
    assert any("networkPolicy: 'cillium' is not one of" in p for p in resource_problems(doc))
    doc = broken(tmp_path, "    port: 10000", "    port: '10000'")
    assert any("properties.port: '10000' is not int" in p for p in resource_problems(doc))
    doc = broken(tmp_path, "  'Standard_NC40ads_H100_v5'\n", "  true\n")
    assert any("vmSize: True is not str" in p for p in resource_problems(doc))
    doc = broken(tmp_path, "    minimumTlsVersion: '1.2'", "    hostName: 'x'")
    assert any("redis.properties.hostName: read-only" in p for p in resource_problems(doc))


def test_every_property_read_from_a_resource_exists() -> None:
    doc = shipped()
    paths = [_accessor_path(i) for i in walk([doc["resources"], doc["outputs"]])]
    assert ["aks", "properties", "identityProfile", "kubeletidentity", "objectId"] in paths
    assert accessor_problems(doc) == []


def test_the_property_check_can_fail(tmp_path: Path) -> None:
    doc = broken(tmp_path, "metrics.prometheusQueryEndpoint", "metrics.prometheusQueryUrl")
    assert any("no 'prometheusQueryUrl' there" in p for p in accessor_problems(doc))


def test_the_cluster_is_the_one_the_guide_builds() -> None:
    assert guide_commands("az aks create"), "docs/deploy.md has no az aks create"
    assert any(o.get("-n") == [GPU_POOL] for o in guide_commands("az aks nodepool add"))
    assert guide_problems(shipped()) == []


def test_the_guide_check_can_fail(tmp_path: Path) -> None:
    doc = broken(tmp_path, "    maxCount: gpuMaxCount", "    maxCount: 9")
    assert any("--max-count" in p for p in guide_problems(doc))
    doc = broken(tmp_path, "    count: systemNodeCount", "    count: 2")
    assert any("--node-count" in p for p in guide_problems(doc))
    doc = broken(
        tmp_path, "clusteringPolicy: 'EnterpriseCluster'", "clusteringPolicy: 'OSSCluster'"
    )
    assert any("--clustering-policy" in p for p in guide_problems(doc))
    doc = broken(
        tmp_path,
        "webAppRouting: {\n        enabled: true",
        "webAppRouting: {\n        enabled: false",
    )
    assert any("approuting" in p for p in guide_problems(doc))


def network_problems(doc: Document) -> list[str]:
    """Without an engine the manifests' NetworkPolicy does nothing; Cilium's needs its dataplane."""
    cluster = one(doc, "Microsoft.ContainerService/managedClusters")["properties"]
    network = cluster.get("networkProfile", {})
    policy = value(doc, network.get("networkPolicy"))
    if policy not in ("azure", "cilium", "calico"):
        return [f"no network policy engine (networkPolicy: {policy})"]
    if policy == "cilium" and value(doc, network.get("networkDataplane")) != "cilium":
        return ["networkPolicy cilium without the cilium dataplane"]
    return []


def test_network_policy_is_enforced(tmp_path: Path) -> None:
    assert network_problems(shipped()) == []
    doc = broken(tmp_path, "      networkPolicy: 'cilium'\n", "")
    assert network_problems(doc) == ["no network policy engine (networkPolicy: None)"]
    doc = broken(tmp_path, "networkDataplane: 'cilium'", "networkDataplane: 'azure'")
    assert network_problems(doc) == ["networkPolicy cilium without the cilium dataplane"]


def test_the_add_ons_the_manifests_need_are_on() -> None:
    doc = shipped()
    flags = cluster_flags(doc)
    for flag in ("--enable-keda", "--enable-app-routing", "--enable-azure-monitor-metrics"):
        assert flags[flag], flag
    assert [
        value(doc, r["scope"])
        for r in of_type(doc, "Microsoft.Insights/dataCollectionRuleAssociations")
    ] == ["aks", "aks"]


@pytest.mark.parametrize("name", GPU_OVERLAYS)
def test_gpu_overlays_schedule_on_the_gpu_pool(name: str) -> None:
    assert placement_problems(shipped(), overlay(name), name) == []


def test_the_placement_check_can_fail(tmp_path: Path) -> None:
    doc = broken(tmp_path, "'sku=gpu:NoSchedule'", "'sku=gpu:NoExecute'")
    assert any("no toleration" in p for p in placement_problems(doc, overlay("aks-gpu"), "aks-gpu"))
    doc = broken(tmp_path, "'time-sliced-2'", "'time-sliced-4'")
    problems = placement_problems(doc, overlay("aks-gpu-shared"), "aks-gpu-shared")
    assert any("no setting of the GPU pool gives the node labels" in p for p in problems)


def test_redis_port_is_the_one_the_network_policy_opens() -> None:
    assert redis_problems(shipped()) == []


def test_the_redis_check_can_fail(tmp_path: Path) -> None:
    doc = broken(tmp_path, "    port: 10000", "    port: 6380")
    assert any("Redis listens on 6380" in p for p in redis_problems(doc))
    doc = broken(tmp_path, "clientProtocol: 'Encrypted'", "clientProtocol: 'Plaintext'")
    assert any("without TLS" in p for p in redis_problems(doc))


def test_sizes_and_counts_are_the_ones_the_cost_model_prices() -> None:
    assert cost_problems(shipped(), json.loads(PRICING.read_text())) == []


def test_the_cost_check_can_fail(tmp_path: Path) -> None:
    pricing = json.loads(PRICING.read_text())
    doc = broken(tmp_path, "  'Standard_NC24ads_A100_v4'\n", "  'Standard_NC6s_v3'\n")
    assert any("GPU sizes" in p for p in cost_problems(doc, pricing))
    doc = broken(
        tmp_path, "param redisSku string = 'Balanced_B0'", "param redisSku string = 'Balanced_B1'"
    )
    assert any("priced with Redis Balanced_B0" in p for p in cost_problems(doc, pricing))
    doc = broken(
        tmp_path,
        "param systemVmSize string = 'Standard_D4s_v5'",
        "param systemVmSize string = 'Standard_D2s_v5'",
    )
    assert any("priced with system pool" in p for p in cost_problems(doc, pricing))


def version_problems(doc: Document) -> list[str]:
    """The manifests' preStop hook uses the sleep action, on by default from Kubernetes 1.30,
    the oldest version they are validated for; both pools run the control plane's version."""
    version = str(value(doc, "kubernetesVersion"))
    oldest = KUBERNETES_VERSIONS[0]
    problems = []
    if tuple(map(int, version.split("."))) < tuple(map(int, oldest.split("."))):
        problems.append(f"Kubernetes {version} is older than {oldest}")
    for pool in (system_pool(doc), gpu_pool(doc)["properties"]):
        if pool.get("orchestratorVersion") != "kubernetesVersion":
            problems.append(f"pool {pool.get('name', GPU_POOL)}: not the cluster's version")
    return problems


def test_kubernetes_version_has_the_prestop_sleep(tmp_path: Path) -> None:
    assert version_problems(shipped()) == []
    doc = broken(
        tmp_path,
        "param kubernetesVersion string = '1.34'",
        "param kubernetesVersion string = '1.29'",
    )
    assert version_problems(doc) == ["Kubernetes 1.29 is older than 1.30"]


def prometheus_problems(doc: Document, addresses: list[str]) -> list[str]:
    """The Prometheus each KEDA trigger queries exists: in-cluster, in a namespace the guide
    installs it into; in an Azure Monitor workspace, created here, with workload identity for
    the Entra ID token its query endpoint needs."""
    problems = []
    for address in addresses:
        host = urlsplit(address).hostname or ""
        if host.endswith(".prometheus.monitor.azure.com"):
            if not of_type(doc, "Microsoft.Monitor/accounts"):
                problems.append(f"{address}: main.bicep creates no Azure Monitor workspace")
            if not cluster_flags(doc)["--enable-workload-identity"]:
                problems.append(f"{address}: main.bicep enables no workload identity")
            continue
        namespace = host.split(".")[1] if host.count(".") >= 2 else ""
        installs = [
            o
            for o in guide_commands("helm upgrade") + guide_commands("helm install")
            if namespace in (o.get("-n") or o.get("--namespace") or [])
        ]
        if not installs:
            problems.append(f"{address}: the guide installs nothing in namespace {namespace!r}")
    return problems


def keda_addresses() -> list[str]:
    return [
        trigger["metadata"]["serverAddress"]
        for name in GPU_OVERLAYS
        for scaled in overlay(name)
        if scaled["kind"] == "ScaledObject"
        for trigger in scaled["spec"]["triggers"]
        if trigger["type"] == "prometheus"
    ]


def test_keda_reaches_the_prometheus_it_queries() -> None:
    assert keda_addresses()
    assert prometheus_problems(shipped(), keda_addresses()) == []


def test_the_prometheus_check_can_fail(tmp_path: Path) -> None:
    elsewhere = ["http://prometheus-operated.observability.svc:9090"]
    assert prometheus_problems(shipped(), elsewhere) != []
    doc = broken(
        tmp_path,
        "      workloadIdentity: {\n        enabled: true",
        "      workloadIdentity: {\n        enabled: false",
    )
    azure = ["https://example-abcd.westeurope.prometheus.monitor.azure.com"]
    assert prometheus_problems(doc, azure) == [
        f"{azure[0]}: main.bicep enables no workload identity"
    ]
