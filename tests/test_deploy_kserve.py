"""The KServe serving runtime and InferenceService examples: they build as KServe's own models
(deploy/kserve/validate.py, which fails on fields the models lack), select batchserve only when
asked, follow KServe's port and storage conventions, and a real `batchserve serve` with the
runtime's arguments answers V2 requests on the layout KServe's storage initializer leaves."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
import yaml
from test_deploy_k8s import K8S, find, kubectl, render

from helpers import StartServerProcess, serve_command

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
KSERVE = DEPLOY / "kserve"
RUNTIME = KSERVE / "servingruntime.yaml"
SERVICES = (KSERVE / "inferenceservice.yaml", KSERVE / "inferenceservice-grpc.yaml")
# KServe's storage initializer downloads the storageUri here (constants.DefaultModelLocalMountPath).
MOUNT = PurePosixPath("/mnt/models")
# With no port declared, KServe (constants.InferenceServiceDefaultHttpPort) and Knative send
# HTTP to 8080; a port whose name holds "h2c" or "grpc" is spoken to as HTTP/2.
KSERVE_HTTP_PORT = 8080
# Kubernetes' default terminationGracePeriodSeconds, which a ServingRuntime cannot change.
DEFAULT_GRACE_S = 30

Manifest = dict[str, Any]


def load(path: Path) -> Manifest:
    manifest: Manifest = yaml.safe_load(path.read_text())
    return manifest


def container() -> Manifest:
    containers: list[Manifest] = load(RUNTIME)["spec"]["containers"]
    (only,) = containers
    assert only["name"] == "kserve-container"  # the name KServe merges the predictor into
    return only


def model_spec(path: Path) -> Manifest:
    spec: Manifest = load(path)["spec"]["predictor"]["model"]
    return spec


def validate(*paths: Path) -> subprocess.CompletedProcess[str]:
    """deploy/kserve/validate.py in a process of its own: kserve's protobuf messages clash
    with tritonclient's, which this process holds."""
    if importlib.util.find_spec("kserve") is None:  # looked up, not imported
        if os.environ.get("BATCHSERVE_REQUIRE_DEPLOY"):
            pytest.fail("kserve is required here (BATCHSERVE_REQUIRE_DEPLOY is set)")
        pytest.skip("kserve is not installed (pip install '.[deploy]')")
    return subprocess.run(
        [sys.executable, str(KSERVE / "validate.py"), *map(str, paths)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


# -- KServe's models ---------------------------------------------------------------------------


def test_the_manifests_build_as_kserve_models() -> None:
    done = validate(RUNTIME, *SERVICES)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count(": valid") == 3, done.stdout
    assert "ServingRuntime/batchserve" in done.stdout
    assert "kserve" not in sys.modules, "kserve must stay out of this process"


BROKEN = {
    "misspelt field": (RUNTIME, "autoSelect: false", "autoSelekt: false", "autoSelekt"),
    "string for a bool": (RUNTIME, "autoSelect: false", 'autoSelect: "no"', "bool expected"),
    "misspelt core field": (RUNTIME, "readinessProbe:", "readinesProbe:", "readinesProbe"),
    "string for an int": (RUNTIME, "periodSeconds: 10", 'periodSeconds: "10"', "int expected"),
    "missing container name": (RUNTIME, "- name: kserve-container", "- image: x", "name"),
    "misspelt storageUri": (SERVICES[0], "storageUri:", "storageURI:", "storageURI"),
}


def test_the_model_check_rejects_broken_manifests(tmp_path: Path) -> None:
    broken = []
    for case, (path, old, new, _) in BROKEN.items():
        text = path.read_text()
        assert old in text, case
        copy = tmp_path / f"{case.replace(' ', '-')}.yaml"
        copy.write_text(text.replace(old, new, 1))
        broken.append(copy)
    done = validate(*broken)
    assert done.returncode == 1
    lines = done.stderr.splitlines()
    for case, (_, _, _, named) in BROKEN.items():
        line = next(x for x in lines if x.startswith(str(tmp_path / case.replace(" ", "-"))))
        assert named in line, (case, line)
    assert ": valid" not in done.stdout


# -- how KServe picks and reaches it -----------------------------------------------------------


def test_kserve_picks_the_runtime_only_when_asked() -> None:
    spec = load(RUNTIME)["spec"]
    # Never chosen in place of Triton for an InferenceService that names no runtime.
    assert spec["supportedModelFormats"] == [{"name": "onnx", "version": "1", "autoSelect": False}]
    assert spec["protocolVersions"] == ["v2", "grpc-v2"]
    for path in SERVICES:
        model = model_spec(path)
        assert model["runtime"] == load(RUNTIME)["metadata"]["name"]
        assert model["modelFormat"] == {"name": "onnx", "version": "1"}
        assert model["protocolVersion"] in spec["protocolVersions"]


def runtime_args(monkeypatch: pytest.MonkeyPatch) -> Any:
    """The runtime's arguments through the real `batchserve serve` parser, no BATCHSERVE_*."""
    for name in list(os.environ):
        if name.startswith("BATCHSERVE_"):
            monkeypatch.delenv(name)
    return serve_command().parse_args(container()["args"])


def test_http_and_grpc_listen_where_kserve_sends_them(monkeypatch: pytest.MonkeyPatch) -> None:
    args = runtime_args(monkeypatch)
    assert args.host == "0.0.0.0"
    # No declared port: KServe and Knative route HTTP to 8080, where the server listens.
    assert "ports" not in container()
    assert args.port == KSERVE_HTTP_PORT
    assert load(RUNTIME)["spec"]["annotations"]["prometheus.kserve.io/port"] == str(args.port)
    http, grpc = (model_spec(p) for p in SERVICES)
    assert "ports" not in http
    assert http["protocolVersion"] == "v2"
    assert grpc["protocolVersion"] == "grpc-v2"
    (port,) = grpc["ports"]
    assert port["name"] == "h2c"
    assert port["containerPort"] == int(args.grpc_port)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container()[probe]["httpGet"]["port"] == args.port


def test_the_probes_and_drain_are_the_deployments(monkeypatch: pytest.MonkeyPatch) -> None:
    deployment = find(render(K8S / "base"), "Deployment")
    (server,) = deployment["spec"]["template"]["spec"]["containers"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        ours, theirs = dict(container()[probe]), dict(server[probe])
        assert ours.pop("httpGet")["path"] == theirs.pop("httpGet")["path"], probe
        assert ours == theirs, probe
    args = runtime_args(monkeypatch)
    # Every request ends within the drain, and the drain 5 s before the kubelet's SIGKILL,
    # leaving the queued rows and the sessions' close time to finish.
    assert 0 < args.request_timeout_ms / 1000 < args.shutdown_grace_s <= DEFAULT_GRACE_S - 5
    limit = int(container()["resources"]["limits"]["cpu"])
    assert 0 < args.instances * args.intra_op_threads <= limit


def test_the_model_is_where_the_storage_initializer_puts_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = PurePosixPath(runtime_args(monkeypatch).model)
    assert model.parent == MOUNT
    assert runtime_args(monkeypatch).name == "{{.Name}}"  # KServe: the InferenceService's name
    for path in SERVICES:
        # A file's URI: the storage initializer keeps the file's name under /mnt/models.
        uri = PurePosixPath(urlsplit(model_spec(path)["storageUri"]).path)
        assert MOUNT / uri.name == model, path


def test_the_runtime_meets_the_restricted_pod_security_standard() -> None:
    context = container()["securityContext"]
    assert context["runAsNonRoot"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["readOnlyRootFilesystem"] is True
    assert context["capabilities"]["drop"] == ["ALL"]
    assert context["seccompProfile"]["type"] == "RuntimeDefault"
    mounts = {m["mountPath"]: m["name"] for m in container()["volumeMounts"]}
    volumes = {v["name"]: v for v in load(RUNTIME)["spec"]["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]], "a read-only root needs a writable /tmp"


def test_an_overlay_can_point_the_runtime_at_another_registry(tmp_path: Path) -> None:
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [os.path.relpath(KSERVE, tmp_path)],
        "images": [{"name": "ghcr.io/batchserve/batchserve",
                    "newName": "example.azurecr.io/batchserve", "newTag": "0.1.0-cuda"}],
    }  # fmt: skip
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    done = subprocess.run(
        [kubectl(), "kustomize", str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    (runtime,) = list(yaml.safe_load_all(done.stdout))
    assert runtime["kind"] == "ServingRuntime"
    (rendered,) = runtime["spec"]["containers"]
    assert rendered["image"] == "example.azurecr.io/batchserve:0.1.0-cuda"
    assert container()["image"].startswith("ghcr.io/batchserve/batchserve:")


# -- a real server on KServe's layout ------------------------------------------------------------


@pytest.mark.slow
async def test_batchserve_serves_the_kserve_layout(
    serve_process: StartServerProcess,
    http: aiohttp.ClientSession,
    mlp_path: Path,
    tmp_path: Path,
) -> None:
    # What the storage initializer leaves for storageUri .../model.onnx: /mnt/models/model.onnx.
    mount = tmp_path / "mnt" / "models"
    mount.mkdir(parents=True)
    uri = PurePosixPath(urlsplit(model_spec(SERVICES[0])["storageUri"]).path)
    shutil.copyfile(mlp_path, mount / uri.name)
    name = load(SERVICES[0])["metadata"]["name"]
    # The runtime's arguments as KServe fills them in; the test's own host and free ports
    # come after them (the later flag wins), as an InferenceService's args would.
    args = [a.replace(str(MOUNT), str(mount)).replace("{{.Name}}", name)
            for a in container()["args"]]  # fmt: skip
    server = serve_process(*args, grpc=True)

    x = np.linspace(-1, 1, 64, dtype=np.float32).reshape(1, 64)
    expected = ort.InferenceSession(str(mlp_path)).run(["probabilities"], {"input": x})[0]
    body = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32",
                        "data": x.ravel().tolist()}]}  # fmt: skip
    async with http.post(f"{server.url}/v2/models/{name}/infer", json=body) as response:
        assert response.status == 200, await response.text()
        (output,) = (await response.json())["outputs"]
    assert output["name"] == "probabilities"
    got = np.asarray(output["data"], dtype=np.float32).reshape(output["shape"])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)

    client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    try:
        tensor = grpcclient.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        answer = client.infer(name, [tensor])
    finally:
        client.close()
    np.testing.assert_allclose(answer.as_numpy("probabilities"), expected, rtol=1e-5, atol=1e-6)
