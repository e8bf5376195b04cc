"""The Azure definitions, offline: Container Apps YAML against the Container Apps API models
(azure-mgmt-appcontainers), Azure ML YAML through the Azure ML SDK's own loader (what `az ml`
uses), and both against the server they deploy: ports, probe and scoring routes on a real
server, BATCHSERVE_* variables through the real command line, timeouts and concurrency against
the batching settings."""

from __future__ import annotations

import enum
import os
import re
import types
import typing
import warnings
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
import yaml

from batchserve import Engine

from helpers import DOCKERFILES, StartServer, final_stage, only, parse_with_env, serve_variables

ROOT = Path(__file__).resolve().parent.parent
AZURE = ROOT / "deploy" / "azure"
CONTAINER_APPS = {
    "cpu": AZURE / "containerapp-cpu.yaml",
    "gpu": AZURE / "containerapp-gpu.yaml",
    "grpc": AZURE / "containerapp-grpc.yaml",  # the CPU app with its ingress on gRPC
}
AML_ENDPOINT = AZURE / "aml-endpoint.yml"
AML_DEPLOYMENTS = {"cpu": AZURE / "aml-deployment-cpu.yml", "gpu": AZURE / "aml-deployment.yml"}
AML_SCHEMA = "https://azuremlschemas.azureedge.net/latest/{}.schema.json"
PLACEHOLDER = re.compile(r"\$\{([A-Z_]+)\}")
# Stand-ins for the ${...} names docs/deploy.md exports, shaped like the real ones.
EXAMPLE_VALUES = {
    "AZURE_SUBSCRIPTION_ID": "00000000-0000-0000-0000-000000000000",
    "RESOURCE_GROUP": "batchserve",
    "CONTAINERAPPS_ENV": "batchserve",
    "ACR_NAME": "batchserveacr",
    "IDENTITY_ID": "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/"
    "batchserve/providers/Microsoft.ManagedIdentity/userAssignedIdentities/batchserve",
}
# Serverless GPU workload profiles and what one replica may take (cores, GiB).
GPU_PROFILES = {"Consumption-GPU-NC8as-T4": (8.0, 56), "Consumption-GPU-NC24-A100": (24.0, 220)}
# The limits the Container Apps API documents for each probe field (ContainerAppProbe).
PROBE_LIMITS = {
    "initialDelaySeconds": (1, 60),
    "periodSeconds": (1, 240),
    "timeoutSeconds": (1, 240),
    "failureThreshold": (1, 10),
    "successThreshold": (1, 10),
}
AML_MAX_REQUEST_TIMEOUT_MS = 180_000
PRIMITIVES: dict[Any, tuple[type, ...]] = {
    float: (int, float),
    int: (int,),
    str: (str,),
    bool: (bool,),
}

Document = dict[str, Any]


def load(path: Path) -> Document:
    """The YAML with every ${NAME} replaced by an example value, as envsubst would."""
    text = PLACEHOLDER.sub(lambda m: EXAMPLE_VALUES[m.group(1)], path.read_text())
    document = yaml.safe_load(text)
    assert isinstance(document, dict)
    return document


def required(module: str) -> Any:
    """Import an optional `deploy` extra, or skip (fail where the extra is required)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # their import-time deprecations are not ours
            return __import__(module, fromlist=["_"])
    except ImportError:
        if os.environ.get("BATCHSERVE_REQUIRE_DEPLOY"):
            pytest.fail(f"{module} is required here (BATCHSERVE_REQUIRE_DEPLOY is set)")
        pytest.skip(f"{module} is not installed (pip install '.[deploy]')")


def container(app: Document) -> Document:
    containers = app["properties"]["template"]["containers"]
    assert len(containers) == 1
    return containers[0]  # type: ignore[no-any-return]


def app_env(app: Document) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container(app)["env"]}


def image_ports() -> list[int]:
    """The ports the image exposes: HTTP's, then gRPC's."""
    return [int(p) for p in only(final_stage(DOCKERFILES["cpu"]), "EXPOSE").arguments.split()]


def image_port() -> int:
    return image_ports()[0]


def image_model_path() -> str:
    return only(final_stage(DOCKERFILES["cpu"]), "CMD").exec_form()[0]


def served_name(env: dict[str, str]) -> str:
    """The model's name in URLs: BATCHSERVE_NAME, else the model file's stem."""
    return env.get("BATCHSERVE_NAME") or Path(image_model_path()).stem


def check_variables(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    ours = {k: v for k, v in env.items() if k.startswith("BATCHSERVE_")}
    unknown = sorted(set(ours) - set(serve_variables()))
    assert not unknown, f"variables batchserve serve does not read: {unknown}"
    parse_with_env(monkeypatch, ours)  # exits on a value the server would refuse


def test_every_placeholder_is_one_the_guide_exports() -> None:
    guide = (ROOT / "docs" / "deploy.md").read_text()
    for path in [*CONTAINER_APPS.values(), *AML_DEPLOYMENTS.values()]:
        for name in set(PLACEHOLDER.findall(path.read_text())):
            assert name in EXAMPLE_VALUES, f"{path.name}: ${{{name}}}"
            assert f"export {name}=" in guide, f"docs/deploy.md never sets {name}"


# -- Container Apps: the API's own models -------------------------------------------------------


def _fields(model: type) -> dict[str, tuple[str, Any, bool]]:
    """REST name -> (attribute, annotation, writable on create) of a generated API model."""
    models = required("azure.mgmt.appcontainers.models")
    hints = typing.get_type_hints(model, localns={"_models": models})
    fields = {}
    for cls in reversed(model.__mro__):
        for attribute, value in vars(cls).items():
            if type(value).__name__ == "_RestField":
                writable = value._visibility is None or "create" in value._visibility
                name = value._rest_name_input or attribute
                fields[name] = (attribute, hints[attribute], writable)
    return fields


def _schema_problems(value: Any, annotation: Any, where: str) -> list[str]:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        enums = [a for a in options if isinstance(a, type) and issubclass(a, enum.Enum)]
        if enums:  # an extensible enum: any string goes to the API, but ours must be known
            known = {str(m.value).lower() for e in enums for m in e}
            ok = isinstance(value, str) and value.lower() in known
            return [] if ok else [f"{where}: {value!r} is not one of {sorted(known)}"]
        return _schema_problems(value, options[0], where)
    if origin is list:
        if not isinstance(value, list):
            return [f"{where}: expected a list"]
        return [
            p for n, v in enumerate(value) for p in _schema_problems(v, args[0], f"{where}[{n}]")
        ]
    if origin is dict:
        if not isinstance(value, dict):
            return [f"{where}: expected a mapping"]
        return [p for k, v in value.items() for p in _schema_problems(v, args[1], f"{where}.{k}")]
    if annotation in PRIMITIVES:
        # YAML's true is no number, and an integer is a fine float.
        ok = isinstance(value, PRIMITIVES[annotation]) and (
            annotation is bool or not isinstance(value, bool)
        )
        return [] if ok else [f"{where}: {value!r} is not {annotation.__name__}"]
    return _model_problems(value, annotation, where)


def _model_problems(value: Any, model: type, where: str) -> list[str]:
    if not isinstance(value, dict):
        return [f"{where}: expected an object ({model.__name__})"]
    fields = _fields(model)
    problems = []
    for key, item in value.items():
        if key not in fields:
            problems.append(f"{where}.{key}: not a field of {model.__name__}")
        elif not fields[key][2]:
            problems.append(f"{where}.{key}: read-only")
        else:
            problems += _schema_problems(item, fields[key][1], f"{where}.{key}")
    return problems


def container_app_problems(document: Document) -> list[str]:
    models = required("azure.mgmt.appcontainers.models")
    return _model_problems(document, models.ContainerApp, "")


@pytest.mark.parametrize("kind", CONTAINER_APPS)
def test_container_app_matches_the_api_models(kind: str) -> None:
    assert container_app_problems(load(CONTAINER_APPS[kind])) == []


def test_the_api_model_check_can_fail() -> None:
    document = load(CONTAINER_APPS["cpu"])
    container(document)["probes"][0]["periodSecond"] = 10  # a typo
    container(document)["probes"][1]["type"] = "Ready"  # not a probe type
    container(document)["resources"]["cpu"] = "2"  # a string where the API wants a number
    document["properties"]["provisioningState"] = "Succeeded"  # read-only
    problems = container_app_problems(document)
    assert any("periodSecond: not a field of ContainerAppProbe" in p for p in problems)
    assert any("probes[1].type: 'Ready' is not one of" in p for p in problems)
    assert any("resources.cpu: '2' is not float" in p for p in problems)
    assert any("provisioningState: read-only" in p for p in problems)


# -- Container Apps against the server ----------------------------------------------------------


@pytest.mark.parametrize("kind", CONTAINER_APPS)
def test_container_app_serves_the_image_port_and_model(kind: str) -> None:
    app = load(CONTAINER_APPS[kind])
    ingress = app["properties"]["configuration"]["ingress"]
    http_port, grpc_port = image_ports()
    if kind == "grpc":
        # gRPC is HTTP/2 to the container; the REST port speaks HTTP/1.1 only.
        assert (ingress["targetPort"], ingress["transport"]) == (grpc_port, "http2")
        assert int(app_env(app)["BATCHSERVE_GRPC_PORT"]) == grpc_port
    else:
        assert (ingress["targetPort"], ingress["transport"]) == (http_port, "http")
    main = container(app)
    assert main["args"] == [image_model_path()]
    assert {m["mountPath"] for m in main["volumeMounts"]} == {str(Path(image_model_path()).parent)}
    assert main["image"].endswith("-cuda") == (kind == "gpu")
    assert (app_env(app)["BATCHSERVE_DEVICE"] == "cuda") == (kind == "gpu")


@pytest.mark.parametrize("kind", CONTAINER_APPS)
def test_container_app_variables_are_server_flags(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    check_variables(app_env(load(CONTAINER_APPS[kind])), monkeypatch)


@pytest.mark.parametrize("kind", CONTAINER_APPS)
def test_container_app_probes(kind: str) -> None:
    app = load(CONTAINER_APPS[kind])
    probes = {p["type"]: p for p in container(app)["probes"]}
    assert len(probes) == len(container(app)["probes"]) == 3
    assert probes["Liveness"]["httpGet"]["path"] == "/v2/health/live"
    assert probes["Readiness"]["httpGet"]["path"] == "/v2/health/ready"
    assert probes["Startup"]["httpGet"]["path"] == "/v2/health/ready"
    for probe in probes.values():
        assert probe["httpGet"]["port"] == image_port()
        for field, (low, high) in PROBE_LIMITS.items():
            if field in probe:
                assert low <= probe[field] <= high, f"{probe['type']}.{field}"
    startup = probes["Startup"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 100, "room for model load"


@pytest.mark.parametrize("kind", CONTAINER_APPS)
def test_container_app_drain_fits_the_grace_period(kind: str) -> None:
    app = load(CONTAINER_APPS[kind])
    env = app_env(app)
    grace = app["properties"]["template"]["terminationGracePeriodSeconds"]
    drain = float(env["BATCHSERVE_SHUTDOWN_GRACE_S"])
    assert grace >= drain + 10, "time after the drain for the queued rows and the exit"
    # Every request is bounded, so the drain can finish in time.
    assert float(env["BATCHSERVE_REQUEST_TIMEOUT_MS"]) / 1000 < drain


@pytest.mark.parametrize("kind", CONTAINER_APPS)
def test_container_app_scales_on_concurrency_from_the_batching_settings(kind: str) -> None:
    app = load(CONTAINER_APPS[kind])
    env = app_env(app)
    scale = app["properties"]["template"]["scale"]
    assert 1 <= scale["minReplicas"] <= scale["maxReplicas"]
    (rule,) = scale["rules"]
    concurrent = int(rule["http"]["metadata"]["concurrentRequests"])
    batch = int(env["BATCHSERVE_MAX_BATCH_SIZE"])
    if kind == "gpu":
        # Every session busy with a full batch.
        assert concurrent == int(env["BATCHSERVE_INSTANCES"]) * batch
    else:
        # Below one batch: the CPU queue never holds a whole batch at the target.
        assert 1 <= concurrent < batch


def test_gpu_container_app_runs_on_a_declared_serverless_gpu_profile() -> None:
    app = load(CONTAINER_APPS["gpu"])
    profile = app["properties"]["workloadProfileName"]
    text = CONTAINER_APPS["gpu"].read_text() + (ROOT / "docs" / "deploy.md").read_text()
    declared = re.findall(
        rf"--workload-profile-name {re.escape(profile)}\s+(?:\\\s+)?(?:#\s*)?"
        r"--workload-profile-type (\S+)",
        text,
    )
    assert declared, f"no `az containerapp env workload-profile add` declares {profile}"
    assert set(declared) <= set(GPU_PROFILES)
    cores, memory_gib = min(GPU_PROFILES[d] for d in declared)
    resources = container(app)["resources"]
    assert resources["cpu"] <= cores
    assert int(resources["memory"].removesuffix("Gi")) <= memory_gib
    assert load(CONTAINER_APPS["cpu"])["properties"]["workloadProfileName"] == "Consumption"


async def test_container_app_probe_paths_answer_200_on_a_real_server(
    start_server: StartServer, mlp_path: Path
) -> None:
    paths = {
        p["httpGet"]["path"]
        for path in CONTAINER_APPS.values()
        for p in container(load(path))["probes"]
    }
    # The probes carry no credentials, even where an API key is set.
    server = await start_server(Engine(mlp_path, name="model"), api_key="secret")
    async with aiohttp.ClientSession() as http:
        for path in sorted(paths):
            async with http.get(server.url + path) as response:
                assert response.status == 200, path
        async with http.get(server.url + "/v2/health/started") as response:
            assert response.status == 404  # the check can tell a wrong path


# -- Azure ML ----------------------------------------------------------------------------------


def aml_load(kind: str) -> Any:
    """The deployment as the Azure ML SDK (and so `az ml`) reads it; unknown fields fail."""
    ml = required("azure.ai.ml")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ml.load_online_deployment(source=AML_DEPLOYMENTS[kind])


@pytest.mark.slow
def test_aml_endpoint() -> None:
    ml = required("azure.ai.ml")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        endpoint = ml.load_online_endpoint(source=AML_ENDPOINT)
    document = load(AML_ENDPOINT)
    assert document["$schema"] == AML_SCHEMA.format("managedOnlineEndpoint")
    assert endpoint.auth_mode == "key"
    for path in AML_DEPLOYMENTS.values():
        assert load(path)["endpoint_name"] == endpoint.name


@pytest.mark.parametrize("kind", AML_DEPLOYMENTS)
def test_aml_deployment_loads_and_keeps_every_field(kind: str) -> None:
    deployment = aml_load(kind)
    document = load(AML_DEPLOYMENTS[kind])
    assert document["$schema"] == AML_SCHEMA.format("managedOnlineDeployment")
    assert type(deployment).__name__ == "ManagedOnlineDeployment"
    # The SDK drops unknown nested fields silently: what it read back must be all we wrote.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dumped = deployment._to_dict()
    for section in ("request_settings", "liveness_probe", "readiness_probe", "scale_settings"):
        assert dumped[section] == document[section], section
    inference = document["environment"]["inference_config"]
    assert dumped["environment"]["inference_config"] == inference
    assert dumped["environment_variables"] == document["environment_variables"]


def test_the_aml_check_can_fail(tmp_path: Path) -> None:
    ml = required("azure.ai.ml")
    from marshmallow import ValidationError  # what the SDK's schema loader raises

    text = AML_DEPLOYMENTS["gpu"].read_text()
    broken = tmp_path / "deployment.yml"
    broken.write_text(text.replace("instance_count:", "instance_cuont:"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValidationError, match="instance_cuont"):
            ml.load_online_deployment(source=broken)


@pytest.mark.parametrize("kind", AML_DEPLOYMENTS)
def test_aml_deployment_routes_and_model_mount(kind: str) -> None:
    document = load(AML_DEPLOYMENTS[kind])
    routes = document["environment"]["inference_config"]
    assert {r["port"] for r in routes.values()} == {image_port()}
    assert routes["liveness_route"]["path"] == "/v2/health/live"
    assert routes["readiness_route"]["path"] == "/v2/health/ready"
    name = served_name(document["environment_variables"])
    assert routes["scoring_route"]["path"] == f"/v2/models/{name}/infer"
    # Azure ML mounts the registered model where the image's command reads it.
    assert document["model_mount_path"] == str(Path(image_model_path()).parent)
    image = document["environment"]["image"]
    device = document["environment_variables"]["BATCHSERVE_DEVICE"]
    assert image.endswith("-cuda") == (kind == "gpu") == (device == "cuda")
    assert document["instance_type"].startswith("Standard_NC") == (kind == "gpu")


@pytest.mark.parametrize("kind", AML_DEPLOYMENTS)
def test_aml_variables_are_server_flags(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    check_variables(load(AML_DEPLOYMENTS[kind])["environment_variables"], monkeypatch)


@pytest.mark.parametrize("kind", AML_DEPLOYMENTS)
def test_aml_request_settings_let_the_server_batch(kind: str) -> None:
    document = load(AML_DEPLOYMENTS[kind])
    env = document["environment_variables"]
    settings = document["request_settings"]
    batch = int(env["BATCHSERVE_MAX_BATCH_SIZE"])
    concurrent = settings["max_concurrent_requests_per_instance"]
    # Fewer requests at a time than one batch and batches could never fill.
    assert concurrent >= batch
    assert concurrent <= int(env["BATCHSERVE_INSTANCES"]) * batch, "more only queues inside"
    # Azure ML's timeout covers its queue wait and the server's own deadline, so the server
    # answers 504 with its reason before Azure ML gives up on the connection.
    server_timeout = float(env["BATCHSERVE_REQUEST_TIMEOUT_MS"])
    assert server_timeout > 0
    assert settings["request_timeout_ms"] >= server_timeout + settings["max_queue_wait_ms"]
    assert settings["request_timeout_ms"] <= AML_MAX_REQUEST_TIMEOUT_MS
    assert server_timeout / 1000 < float(env["BATCHSERVE_SHUTDOWN_GRACE_S"])


async def test_aml_routes_work_on_a_real_server(start_server: StartServer, mlp_path: Path) -> None:
    document = load(AML_DEPLOYMENTS["cpu"])
    routes = document["environment"]["inference_config"]
    name = served_name(document["environment_variables"])
    server = await start_server(Engine(mlp_path, name=name))
    body = {
        "inputs": [
            {"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0.5] * 64},
        ]
    }
    async with aiohttp.ClientSession() as http:
        for route in ("liveness_route", "readiness_route"):
            async with http.get(server.url + routes[route]["path"]) as response:
                assert response.status == 200, route
        async with http.post(server.url + routes["scoring_route"]["path"], json=body) as response:
            assert response.status == 200
            answer = await response.json()
    assert answer["model_name"] == name
    assert np.asarray(answer["outputs"][0]["data"]).shape == (10,)
