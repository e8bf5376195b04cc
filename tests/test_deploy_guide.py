"""docs/deploy.md's AKS walk-through against what it deploys: the commands in an order that can
run, a network policy engine on the cluster, the policy's ports against the Redis URL and the
ingress, the guide's own overlay rendered and validated, components/ingress, the Redis tier over
TLS with a password on a real redis-server, and deploy/smoke.sh against a real server, in
plaintext and through TLS."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import os
import re
import shlex
import shutil
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self
from urllib.parse import quote, urlsplit

import aiohttp
import pytest
import redis
from redis.asyncio.connection import SSLConnection, parse_url
from test_deploy_k8s import (
    DEPLOY,
    KUBERNETES_VERSIONS,
    Manifest,
    find,
    overlay,
    overlay_with,
    render,
    serve_actions,
    server_container,
    server_env,
    validate_core_objects,
)

from batchserve import CacheConfig

from helpers import StartServerProcess, block_until, free_port, run_cli, wait_until

ROOT = DEPLOY.parent
GUIDE = ROOT / "docs" / "deploy.md"
SMOKE = DEPLOY / "smoke.sh"
WALKTHROUGH = "## AKS with a GPU node pool"
# AKS's network policy engines (`az aks create --network-policy`); "none" enforces nothing.
ENGINES = {"cilium", "azure", "calico"}
INGRESS_CLASS = "webapprouting.kubernetes.azure.com"
GRPC_BACKEND = "nginx.ingress.kubernetes.io/backend-protocol"
# What the walk-through's overlay is rendered with: the values its variables stand for.
GUIDE_ENV = {
    "ACR_NAME": "contosoacr",
    "HTTP_HOST": "batchserve.contoso.com",
    "GRPC_HOST": "grpc.batchserve.contoso.com",
    "RESOURCE_GROUP": "batchserve",
    "AKS_NAME": "batchserve",
}
API_KEY = "smoke-test-key"


# -- reading the guide --------------------------------------------------------------------------


def walkthrough(guide: str) -> str:
    """The AKS section of the guide, up to the next second-level heading."""
    start = guide.index(WALKTHROUGH + "\n")
    end = guide.find("\n## ", start + len(WALKTHROUGH))
    return guide[start : end if end >= 0 else len(guide)]


def shell_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```sh\n(.*?)^```$", markdown, re.S | re.M)


def commands(guide: str) -> list[str]:
    """The walk-through's shell lines in order: continuations joined, comments and blank lines
    left out (heredoc bodies stay, as lines of their own)."""
    script = "\n".join(shell_blocks(walkthrough(guide)))
    joined = re.sub(r"\\\n\s*", " ", script)
    lines = (line.strip() for line in joined.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def the_command(guide: str, prefix: str) -> list[str]:
    """The one command starting with `prefix`, split as the shell would (comments dropped)."""
    found = [line for line in commands(guide) if line.startswith(prefix)]
    assert len(found) == 1, f"expected one `{prefix}` in the walk-through, found {len(found)}"
    return shlex.split(found[0], comments=True)


def options(tokens: list[str]) -> dict[str, list[str]]:
    """`--flag value...` as {flag: values}; a flag without a value maps to []."""
    found: dict[str, list[str]] = {}
    current = None
    for token in tokens:
        if token.startswith("--"):
            current, _, value = token.partition("=")
            found[current] = [value] if value else []
        elif current is not None:
            found[current].append(token)
    return found


def secret_created(guide: str, name: str) -> tuple[str, str]:
    """The walk-through's `kubectl create secret generic NAME --from-file=KEY=...`: (name, key)."""
    lines = [line for line in commands(guide) if f"create secret generic {name} " in line]
    assert len(lines) == 1, f"the walk-through creates the Secret {name} {len(lines)} times"
    tokens = shlex.split(lines[0].partition("|")[2] or lines[0])
    source = next(t for t in tokens if t.startswith(("--from-file=", "--from-literal=")))
    return name, source.partition("=")[2].partition("=")[0]


def guide() -> str:
    return GUIDE.read_text()


# -- order and the cluster's network policy engine -----------------------------------------------

# (first, then): a line containing `then` may only come after one containing `first`.
ORDER = [
    ("az group create", "az acr create"),
    ("az acr create", "az acr build"),
    ("az acr create", "az aks create"),  # --attach-acr
    ("az aks create", "az aks nodepool add"),
    ("az aks get-credentials", "kubectl "),
    ("az aks get-credentials", "helm "),
    ("--enable-keda", "kubectl apply -k"),  # the ScaledObject's CRD
    ("az aks approuting enable", "kubectl apply -k"),  # the IngressClass
    ("kube-prometheus-stack", "kubectl apply -k"),  # the ServiceMonitor's CRD
    ("az redisenterprise create", "REDIS_URL="),
    ("namespace.yaml", "create secret"),
    ("secret generic batchserve-redis", "kubectl apply -k"),  # the pods read both Secrets
    ("secret generic batchserve-api-key", "kubectl apply -k"),
    ("kubectl apply -k", "deploy/smoke.sh"),
    ("create secret tls", "deploy/smoke.sh"),
    ("az aks approuting zone add", "deploy/smoke.sh"),
]


def check_order(guide: str) -> None:
    lines = commands(guide)

    def first(text: str) -> int:
        where = [i for i, line in enumerate(lines) if text in line]
        assert where, f"the walk-through has no `{text}`"
        return where[0]

    for before, after in ORDER:
        assert first(before) < first(after), f"`{after}` runs before `{before}`"
    # Every variable is set before a command reads it.
    defined = {"PWD", "HOME"}
    for line in lines:
        used = set(re.findall(r"\$\{?([A-Z_][A-Z0-9_]*)", line))
        assert used <= defined, f"{sorted(used - defined)} read before being set: {line}"
        defined |= set(re.findall(r"(?:^|export |&& |; )([A-Z_][A-Z0-9_]*)=", line))


def check_network_policy_engine(guide: str) -> str:
    create = options(the_command(guide, "az aks create"))
    engine = (create.get("--network-policy") or ["none"])[0]
    assert engine in ENGINES, f"az aks create --network-policy {engine}: NetworkPolicy not enforced"
    if engine == "cilium":  # Azure CNI powered by Cilium: the Cilium data plane, Azure CNI
        assert create.get("--network-dataplane") == ["cilium"]
        assert create.get("--network-plugin") == ["azure"]
        # Cilium runs on Linux nodes only.
        for line in commands(guide):
            if line.startswith("az aks nodepool add"):
                assert options(shlex.split(line)).get("--os-type", ["Linux"]) == ["Linux"]
    return engine


def test_the_walkthrough_runs_each_command_after_what_it_needs() -> None:
    check_order(guide())


def test_the_order_check_rejects_commands_out_of_order() -> None:
    text = guide()
    smoke = next(line for line in text.splitlines() if line.startswith("deploy/smoke.sh"))
    moved = text.replace(smoke + "\n", "")
    moved = moved.replace("az group create", smoke + "\naz group create", 1)
    with pytest.raises(AssertionError):
        check_order(moved)
    used_early = text.replace("az group create", 'echo "$REDIS_KEY"\naz group create', 1)
    with pytest.raises(AssertionError, match="REDIS_KEY"):
        check_order(used_early)


def test_the_cluster_enforces_network_policy_with_cilium() -> None:
    assert check_network_policy_engine(guide()) == "cilium"
    # The guide says which engine and why, beside the command.
    section = walkthrough(guide())
    assert "**The network policy engine.**" in section
    assert "--network-policy cilium" in section


def test_the_engine_check_rejects_a_cluster_without_one() -> None:
    text = guide()
    assert "--network-policy cilium" in text
    with pytest.raises(AssertionError, match="not enforced"):
        check_network_policy_engine(text.replace(" --network-policy cilium", ""))
    with pytest.raises(AssertionError):
        check_network_policy_engine(text.replace("--network-dataplane cilium", ""))


# -- the guide's overlay: rendered, validated, and its policy against its traffic ----------------


def write_guide_overlay(folder: Path, text: str) -> Path:
    """Run the walk-through's `mkdir -p build/aks && cat > ... <<EOF` in `folder` (beside a
    link to deploy/, as in a checkout) with GUIDE_ENV; the overlay's folder."""
    block = next(b for b in shell_blocks(walkthrough(text)) if "build/aks/kustomization.yaml" in b)
    script = block[: block.index("\nEOF\n") + len("\nEOF\n")]
    (folder / "deploy").symlink_to(DEPLOY)
    env = {"PATH": os.environ["PATH"], **GUIDE_ENV}
    subprocess.run(["bash", "-euc", script], cwd=folder, env=env, check=True, timeout=30)
    return folder / "build" / "aks"


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> list[Manifest]:
    """What the walk-through's `kubectl apply -k build/aks` applies."""
    return render(write_guide_overlay(tmp_path_factory.mktemp("guide"), guide()))


def redis_url_from_the_guide(key: str, host: str) -> str:
    """The walk-through's REDIS_URL line, run by bash with this access key and host."""
    line = next(line for line in commands(guide()) if line.startswith("REDIS_URL="))
    env = {"PATH": os.environ["PATH"], "REDIS_KEY": key, "REDIS_HOST": host}
    done = subprocess.run(
        ["bash", "-euc", f'{line}\nprintf %s "$REDIS_URL"'],
        env=env, capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    return done.stdout


def check_policy(objects: list[Manifest], redis_port: int) -> None:
    """The server's NetworkPolicy admits what the Ingresses send it and lets out exactly DNS and
    the Redis the pods are given, in rules Cilium can enforce."""
    policy = find(objects, "NetworkPolicy")
    spec = policy["spec"]
    selector = find(objects, "Deployment")["spec"]["selector"]["matchLabels"]
    assert spec["podSelector"]["matchLabels"] == selector
    assert set(spec["policyTypes"]) == {"Ingress", "Egress"}
    admitted = {p["port"] for rule in spec["ingress"] for p in rule["ports"]}
    backends = {
        path["backend"]["service"]["port"]["name"]
        for o in objects if o["kind"] == "Ingress"
        for rule in o["spec"]["rules"] for path in rule["http"]["paths"]
    }  # fmt: skip
    assert backends, "no Ingress backends"
    assert backends <= admitted, f"the ingress sends to {backends}, admitted {admitted}"
    dns = [r for r in spec["egress"] if {p["port"] for p in r["ports"]} == {53}]
    assert len(dns) == 1
    assert {p["protocol"] for p in dns[0]["ports"]} == {"UDP", "TCP"}
    others = {p["port"] for r in spec["egress"] if r not in dns for p in r["ports"]}
    assert others == {redis_port}, f"egress allows {others}, the pods' Redis is on {redis_port}"
    # Cilium cannot match pod or node addresses by ipBlock; label selectors only.
    assert "ipBlock" not in str(spec)


def test_the_guide_overlay_renders_what_the_walkthrough_promises(
    deployed: list[Manifest],
) -> None:
    kinds = {o["kind"] for o in deployed}
    assert {"Deployment", "Service", "NetworkPolicy", "Ingress", "ScaledObject"} <= kinds
    image = server_container(deployed)["image"]
    assert image == f"{GUIDE_ENV['ACR_NAME']}.azurecr.io/batchserve:0.1.0-cuda"
    hosts = {o["metadata"]["name"]: o["spec"]["rules"][0]["host"]
             for o in deployed if o["kind"] == "Ingress"}  # fmt: skip
    assert hosts == {"batchserve-http": GUIDE_ENV["HTTP_HOST"],
                     "batchserve-grpc": GUIDE_ENV["GRPC_HOST"]}  # fmt: skip
    for o in deployed:
        if o["kind"] == "Ingress":
            assert o["spec"]["tls"][0]["hosts"] == [o["spec"]["rules"][0]["host"]]


@pytest.mark.slow
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_the_guide_overlay_validates_against_the_kubernetes_schemas(
    version: str, deployed: list[Manifest], tmp_path: Path
) -> None:
    cpu = overlay_with(tmp_path, "cpu", "ingress")
    renderings = [("the guide's overlay", deployed), ("cpu + ingress", cpu)]
    assert validate_core_objects(renderings, version) > 10


def test_the_network_policy_fits_the_redis_url_and_the_ingress(deployed: list[Manifest]) -> None:
    url = urlsplit(redis_url_from_the_guide("k", "cache.westeurope.redis.azure.net"))
    assert url.scheme == "rediss"
    assert url.port == 10000
    check_policy(deployed, url.port)
    # The cpu overlay's dev Redis keeps its own port.
    dev = urlsplit(str(server_env(overlay("cpu"))["BATCHSERVE_REDIS_URL"]))
    assert dev.port is not None
    egress = {p["port"] for r in find(overlay("cpu"), "NetworkPolicy")["spec"]["egress"]
              for p in r["ports"]}  # fmt: skip
    assert egress == {53, dev.port}


def test_the_policy_check_rejects_a_port_the_pods_do_not_use(deployed: list[Manifest]) -> None:
    with pytest.raises(AssertionError, match="egress allows"):
        check_policy(deployed, 6380)  # Azure Cache for Redis's TLS port
    widened = [dict(o) for o in deployed]
    policy = find(widened, "NetworkPolicy")
    policy["spec"]["egress"].append({"ports": [{"port": 443, "protocol": "TCP"}]})
    with pytest.raises(AssertionError, match="egress allows"):
        check_policy(widened, 10000)
    policy["spec"]["egress"].pop()
    policy["spec"]["ingress"][0]["ports"] = [{"port": "http", "protocol": "TCP"}]
    with pytest.raises(AssertionError, match="the ingress sends"):
        check_policy(widened, 10000)


# -- Redis: Azure Managed Redis in the guide, the URL's meaning to the server --------------------


def test_managed_redis_is_created_for_a_tls_client_without_cluster_support() -> None:
    create = options(the_command(guide(), "az redisenterprise create"))
    assert create["--port"] == ["10000"]
    assert create["--client-protocol"] == ["Encrypted"]
    assert create["--minimum-tls-version"] == ["1.2"]
    # One endpoint: batchserve's client is redis.asyncio.Redis, not a Redis Cluster client.
    assert create["--clustering-policy"] == ["EnterpriseCluster"]
    assert create["--access-keys-authentication"] == ["Enabled"]  # the URL carries the key
    assert "az redis create" not in guide()  # Azure Cache for Redis: retiring


def test_the_guide_redis_url_keeps_any_access_key_intact() -> None:
    # Access keys are base64-like: "/", "+" and "=" must survive the URL.
    key = "aB3/x+Yz9=="
    url = redis_url_from_the_guide(key, "batchserve-cache.westeurope.redis.azure.net")
    parsed = parse_url(url)
    assert parsed["connection_class"] is SSLConnection
    assert parsed["password"] == key
    assert parsed["host"] == "batchserve-cache.westeurope.redis.azure.net"
    assert parsed["port"] == 10000
    # Unencoded, the same key would not be read back: the "/" ends the URL's host part.
    with pytest.raises(ValueError, match=r"[Pp]ort"):
        parse_url(f"rediss://:{key}@h:10000/0")


def test_the_secrets_the_guide_creates_are_the_ones_the_manifests_read(
    deployed: list[Manifest],
) -> None:
    env = {e["name"]: e for e in server_container(deployed)["env"]}
    for variable, secret in (("BATCHSERVE_REDIS_URL", "batchserve-redis"),
                             ("BATCHSERVE_API_KEY", "batchserve-api-key")):  # fmt: skip
        ref = env[variable]["valueFrom"]["secretKeyRef"]
        assert (ref["name"], ref["key"]) == secret_created(guide(), secret), variable
        assert variable in serve_actions()
    tls = {t["secretName"] for o in deployed if o["kind"] == "Ingress" for t in o["spec"]["tls"]}
    created = {shlex.split(line)[shlex.split(line).index("tls") + 1]
               for line in commands(guide()) if "create secret tls" in line}  # fmt: skip
    assert tls == created
    assert "Secret" not in {o["kind"] for o in deployed}, "secrets are never committed"


# -- components/ingress --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def with_ingress(tmp_path_factory: pytest.TempPathFactory) -> list[Manifest]:
    return overlay_with(tmp_path_factory.mktemp("ingress"), "aks-gpu", "ingress")


def ingresses(objects: list[Manifest]) -> dict[str, Manifest]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == "Ingress"}


def check_ingress(objects: list[Manifest]) -> None:
    service = find(objects, "Service")
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    routes = ingresses(objects)
    assert set(routes) == {"batchserve-http", "batchserve-grpc"}
    for name, ingress in routes.items():
        spec = ingress["spec"]
        assert spec["ingressClassName"] == INGRESS_CLASS, name
        tls_hosts = {h for t in spec["tls"] for h in t["hosts"]}
        assert all(t["secretName"] for t in spec["tls"]), name
        for rule in spec["rules"]:
            assert rule["host"] in tls_hosts, f"{name}: {rule['host']} without TLS"
            for path in rule["http"]["paths"]:
                backend = path["backend"]["service"]
                assert backend["name"] == service["metadata"]["name"], name
                assert backend["port"]["name"] in ports, f"{name}: no Service port {backend}"
    http, grpc = routes["batchserve-http"], routes["batchserve-grpc"]
    assert {p["backend"]["service"]["port"]["name"] for p in paths(http)} == {"http"}
    assert {p["backend"]["service"]["port"]["name"] for p in paths(grpc)} == {"grpc"}
    assert ports["grpc"]["appProtocol"] == "grpc"
    # NGINX speaks h2c to the pods only with this; without it gRPC calls fail at the proxy.
    assert grpc["metadata"]["annotations"].get(GRPC_BACKEND) == "GRPC"
    assert GRPC_BACKEND not in http["metadata"].get("annotations", {})
    assert any(p["path"].startswith("/inference.GRPCInferenceService") for p in paths(grpc))
    # Only the protocol's routes go out: /metrics stays inside the cluster.
    assert all(p["path"] == "/v2" or p["path"].startswith("/v2/") for p in paths(http))


def paths(ingress: Manifest) -> list[Manifest]:
    return [p for rule in ingress["spec"]["rules"] for p in rule["http"]["paths"]]


def test_the_ingress_sends_http_and_grpc_to_the_service_ports_over_tls(
    with_ingress: list[Manifest],
) -> None:
    check_ingress(with_ingress)


@pytest.mark.parametrize(
    "breakage",
    ["no grpc backend protocol", "a port the Service lacks", "no TLS for gRPC", "metrics out"],
)
def test_the_ingress_check_rejects_a_broken_copy(
    with_ingress: list[Manifest], breakage: str
) -> None:
    objects = [dict(o) for o in with_ingress]
    grpc, http = ingresses(objects)["batchserve-grpc"], ingresses(objects)["batchserve-http"]
    if breakage == "no grpc backend protocol":
        del grpc["metadata"]["annotations"][GRPC_BACKEND]
    elif breakage == "a port the Service lacks":
        paths(grpc)[0]["backend"]["service"]["port"] = {"name": "grpcs"}
    elif breakage == "no TLS for gRPC":
        grpc["spec"]["tls"][0]["hosts"] = ["other.example.com"]
    else:
        paths(http)[0]["path"] = "/"
    with pytest.raises(AssertionError):
        check_ingress(objects)


def test_the_ingress_limits_follow_the_server_settings(with_ingress: list[Manifest]) -> None:
    env = server_env(with_ingress)
    body_mb = int(str(env["BATCHSERVE_MAX_BODY_MB"]))
    request_s = int(str(env["BATCHSERVE_REQUEST_TIMEOUT_MS"])) / 1000
    for name, ingress in ingresses(with_ingress).items():
        notes = ingress["metadata"]["annotations"]
        # The server, not NGINX, answers an oversized body or a slow request.
        assert notes["nginx.ingress.kubernetes.io/proxy-body-size"] == f"{body_mb}m", name
        assert int(notes["nginx.ingress.kubernetes.io/proxy-read-timeout"]) > request_s, name


def test_the_api_key_comes_from_a_secret(with_ingress: list[Manifest]) -> None:
    env = {e["name"]: e for e in server_container(with_ingress)["env"]}
    assert env["BATCHSERVE_API_KEY"] == {
        "name": "BATCHSERVE_API_KEY",
        "valueFrom": {"secretKeyRef": {"name": "batchserve-api-key", "key": "api-key"}},
    }
    assert "BATCHSERVE_API_KEY" in serve_actions()
    # Both Secret references survive together (Redis from azure-redis, the key from ingress).
    assert "BATCHSERVE_REDIS_URL" in env
    assert "Secret" not in {o["kind"] for o in with_ingress}


# -- TLS material for the real-process tests -----------------------------------------------------


@dataclass(frozen=True)
class Certificates:
    ca: Path
    cert: Path
    key: Path


def make_certificates(folder: Path) -> Certificates:
    """A CA and a server certificate it signed for 127.0.0.1 and localhost (what strict
    verification asks of both: key usages, key identifiers)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def name(text: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])

    def usage(*, sign: bool) -> x509.KeyUsage:
        return x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=sign, crl_sign=sign,
            encipher_only=False, decipher_only=False,
        )  # fmt: skip

    ca_key = ec.generate_private_key(ec.SECP256R1())
    key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder().subject_name(name("batchserve test CA"))
        .issuer_name(name("batchserve test CA")).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(usage(sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    cert = (
        x509.CertificateBuilder().subject_name(name("127.0.0.1")).issuer_name(ca.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
        ), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(usage(sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    found = Certificates(folder / "ca.pem", folder / "server.pem", folder / "server.key")
    found.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    found.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    found.key.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ))  # fmt: skip
    return found


@pytest.fixture
def certificates(tmp_path: Path) -> Certificates:
    return make_certificates(tmp_path)


# -- Redis over TLS with a password, as Azure Managed Redis serves it ----------------------------

# Characters an access key may hold and a URL must encode.
REDIS_PASSWORD = "s3cret/with+base64="


class TlsRedis:
    """A real `redis-server` serving TLS only (no plaintext port), with a password, on
    127.0.0.1 and a free port; stopped by PID."""

    def __init__(self, binary: str, directory: Path, certificates: Certificates) -> None:
        self.port = free_port()
        self.log = directory / "redis.log"
        self.certificates = certificates
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                [binary, "--port", "0", "--tls-port", str(self.port), "--bind", "127.0.0.1",
                 "--tls-cert-file", str(certificates.cert), "--tls-key-file", str(certificates.key),
                 "--tls-ca-cert-file", str(certificates.ca), "--tls-auth-clients", "no",
                 "--requirepass", REDIS_PASSWORD, "--save", "", "--appendonly", "no",
                 "--dir", str(directory)],
                stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip

    def url(self, *, password: str = REDIS_PASSWORD, ca: bool = True) -> str:
        url = f"rediss://:{quote(password, safe='')}@127.0.0.1:{self.port}/0"
        return url + (f"?ssl_ca_certs={quote(str(self.certificates.ca))}" if ca else "")

    def accepts(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(self.log.read_text(errors="replace"))
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", self.port)) == 0

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


@pytest.fixture
def tls_redis(tmp_path: Path, certificates: Certificates) -> Iterator[TlsRedis]:
    binary = shutil.which("redis-server")
    required = os.environ.get("BATCHSERVE_REQUIRE_REDIS")
    if binary is None:
        if required:
            pytest.fail("redis-server is required here (BATCHSERVE_REQUIRE_REDIS is set)")
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    server = TlsRedis(binary, tmp_path, certificates)
    try:
        block_until(server.accepts, f"redis-server with TLS on port {server.port}")
    except RuntimeError as err:  # e.g. a build without TLS support
        server.stop()
        if required:
            pytest.fail(f"redis-server could not serve TLS: {err}")
        pytest.skip(f"this redis-server cannot serve TLS: {err}")
    yield server
    server.stop()


def infer_body() -> dict[str, Any]:
    return {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32",
                        "data": [0.25] * 64}]}  # fmt: skip


async def infer(http: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with http.post(f"{url}/v2/models/mlp/infer", json=infer_body()) as response:
        assert response.status == 200, await response.text()
        answer: dict[str, Any] = await response.json()
        return answer


async def model_stats(http: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with http.get(f"{url}/v2/models/mlp/stats") as response:
        stats: dict[str, Any] = (await response.json())["model_stats"][0]
        return stats


@pytest.mark.slow
async def test_the_server_caches_in_redis_over_tls_with_the_password_from_the_url(
    tls_redis: TlsRedis, serve_process: StartServerProcess, mlp_path: Path
) -> None:
    # As the Deployment passes it: BATCHSERVE_REDIS_URL from the environment; no local tier,
    # so a second identical request can only be answered from Redis.
    server = serve_process(
        str(mlp_path), "--name", "mlp", "--cache-size-mb", "0", "--redis-timeout-ms", "5000",
        env={"BATCHSERVE_REDIS_URL": tls_redis.url()},
    )  # fmt: skip
    async with aiohttp.ClientSession() as http:
        computed = await infer(http, server.url)

        async def written() -> bool:
            stats = await model_stats(http, server.url)
            return int(stats["cache"]["redis"]["writes"]) == 1

        # The write to Redis runs off the request's path: wait for it.
        await wait_until(written, "the server's write to Redis over TLS")
        cached = await infer(http, server.url)
        stats = await model_stats(http, server.url)
    assert cached["outputs"] == computed["outputs"]
    assert stats["cache"]["redis"]["hits"] == 1
    assert stats["cache"]["redis"]["errors"] == 0
    assert stats["request_count"] == 1  # the model ran for the first request only
    # The entry is on this Redis, reached the same way: TLS, the CA, the password.
    client = redis.Redis.from_url(tls_redis.url())
    try:
        assert len(client.keys("batchserve:*")) == 1
    finally:
        client.close()


@pytest.mark.slow
@pytest.mark.parametrize("wrong", ["an untrusted certificate", "a wrong password", "plaintext"])
async def test_redis_without_the_right_ca_password_or_tls_serves_nothing(
    tls_redis: TlsRedis, serve_process: StartServerProcess, mlp_path: Path, wrong: str
) -> None:
    url = {
        "an untrusted certificate": tls_redis.url(ca=False),  # verified against the system CAs
        "a wrong password": tls_redis.url(password="not-the-key"),
        "plaintext": tls_redis.url(ca=False).replace("rediss://", "redis://", 1),
    }[wrong]
    server = serve_process(
        str(mlp_path), "--name", "mlp", "--cache-size-mb", "0", "--redis-timeout-ms", "5000",
        env={"BATCHSERVE_REDIS_URL": url},
    )  # fmt: skip
    async with aiohttp.ClientSession() as http:
        for _ in range(2):  # still answered, by the model, and Redis counts errors
            await infer(http, server.url)
        stats = await model_stats(http, server.url)
    redis_stats = stats["cache"]["redis"]
    assert redis_stats["hits"] == 0
    assert redis_stats["writes"] == 0
    assert redis_stats["errors"] >= 1
    assert stats["request_count"] == 2


def test_tls_options_on_a_url_without_tls_are_refused_at_start(mlp_path: Path) -> None:
    # Otherwise every Redis call would fail later (redis-py passes ssl_* to a plain connection).
    url = f"redis://:{quote(REDIS_PASSWORD, safe='')}@127.0.0.1:6379/0?ssl_ca_certs=/ca.pem"
    done = run_cli("serve", str(mlp_path), "--grpc-port", "off", "--redis-url", url)
    assert done.returncode != 0
    assert "ssl_ca_certs needs rediss://" in done.stderr
    assert REDIS_PASSWORD not in done.stderr
    assert quote(REDIS_PASSWORD, safe="") not in done.stderr
    with pytest.raises(ValueError, match="must start with"):
        CacheConfig(redis_url="http://cache:6379/0")
    CacheConfig(redis_url=url.replace("redis://", "rediss://"))  # the same options over TLS


# -- deploy/smoke.sh against a real server ------------------------------------------------------


async def smoke(*args: str, key: str = API_KEY) -> tuple[int, str, str]:
    if shutil.which("curl") is None:
        if os.environ.get("BATCHSERVE_REQUIRE_DEPLOY"):
            pytest.fail("curl is required here (BATCHSERVE_REQUIRE_DEPLOY is set)")
        pytest.skip("curl is not installed (apt-get install curl)")
    env = {**os.environ, "PYTHON": sys.executable, "BATCHSERVE_API_KEY": key}
    process = await asyncio.create_subprocess_exec(
        "bash", str(SMOKE), *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), timeout=90)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


@pytest.fixture
def keyed_server(serve_process: StartServerProcess, mlp_path: Path) -> Any:
    """A real server with HTTP and gRPC, the API key from the environment as the pods have it."""
    return serve_process(
        str(mlp_path), "--name", "mlp", env={"BATCHSERVE_API_KEY": API_KEY}, grpc=True
    )


@pytest.mark.slow
async def test_the_smoke_script_answers_over_http_and_grpc(keyed_server: Any) -> None:
    code, out, err = await smoke(
        "--model", "mlp", "--plaintext", keyed_server.url, f"127.0.0.1:{keyed_server.grpc_port}"
    )
    assert code == 0, err
    assert out.splitlines() == ["http ok: probabilities [1, 10]", "grpc ok: probabilities [1, 10]"]


@pytest.mark.slow
async def test_the_smoke_script_fails_on_a_wrong_key_or_a_dead_grpc_port(
    keyed_server: Any,
) -> None:
    grpc = f"127.0.0.1:{keyed_server.grpc_port}"
    code, out, err = await smoke("--model", "mlp", "--plaintext", keyed_server.url, grpc,
                                 key="wrong")  # fmt: skip
    assert code != 0
    assert "401" in err
    assert "ok" not in out
    code, out, err = await smoke(
        "--model", "mlp", "--plaintext", keyed_server.url, f"127.0.0.1:{free_port()}"
    )
    assert code != 0
    assert "http ok" in out
    assert "grpc ok" not in out


class TlsTerminator:
    """TLS in front of a plaintext port, as the ingress's NGINX is: it ends TLS, offering only
    the ALPN protocols given (HTTP/1.1 for REST, h2 for gRPC), and relays the bytes."""

    def __init__(self, backend_port: int, certificates: Certificates, alpn: list[str]) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(certificates.cert, certificates.key)
        self.context.set_alpn_protocols(alpn)
        self.backend_port = backend_port
        self.port = 0
        self._relays: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0, ssl=self.context)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()
        for task in self._relays:
            task.cancel()
        await asyncio.gather(*self._relays, return_exceptions=True)

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.get_running_loop().create_task(self._relay(reader, writer))
        self._relays.add(task)
        task.add_done_callback(self._relays.discard)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.backend_port)
        try:
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        finally:
            for w in (writer, up_writer):
                w.close()

    @staticmethod
    async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
        sink.close()  # the other direction then ends too


@pytest.mark.slow
async def test_the_smoke_script_speaks_tls_to_https_and_grpcs(
    keyed_server: Any, certificates: Certificates
) -> None:
    async with (
        TlsTerminator(keyed_server.port, certificates, ["http/1.1"]) as https,
        TlsTerminator(keyed_server.grpc_port, certificates, ["h2"]) as grpcs,
    ):
        where = (f"https://127.0.0.1:{https.port}", f"127.0.0.1:{grpcs.port}")
        code, out, err = await smoke("--model", "mlp", "--cacert", str(certificates.ca), *where)
        assert code == 0, err
        assert [line.split(":")[0] for line in out.splitlines()] == ["http ok", "grpc ok"]
        # Without the CA, both refuse the self-signed chain: TLS is really verified.
        code, out, _ = await smoke("--model", "mlp", *where)
        assert code != 0
        assert "ok" not in out


def test_the_walkthrough_smoke_command_targets_the_ingress_hosts_and_model(
    deployed: list[Manifest],
) -> None:
    tokens = the_command(guide(), "deploy/smoke.sh")
    expanded = [re.sub(r"\$(\w+)", lambda m: GUIDE_ENV[m.group(1)], t) for t in tokens]
    found = options(expanded)
    model, http_url, grpc_address = found["--model"]  # the option, then the two positionals
    assert model == server_env(deployed)["BATCHSERVE_NAME"]
    hosts = {name: o["spec"]["rules"][0]["host"] for name, o in ingresses(deployed).items()}
    assert urlsplit(http_url).scheme == "https"
    assert urlsplit(http_url).hostname == hosts["batchserve-http"]
    assert grpc_address == f"{hosts['batchserve-grpc']}:443"
    assert "--plaintext" not in found
