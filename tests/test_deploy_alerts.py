"""The recording and alert rules as Kubernetes and Azure load them: the PrometheusRule of
components/monitoring and the Azure Monitor rule groups carry exactly the groups of
deploy/prometheus/recording.yml and alerts.yml, have the fields of their APIs, pass promtool's
checks and unit tests, and name the scrape job, autoscaler and Deployment the overlays render."""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from test_deploy_k8s import K8S, OVERLAYS, PROMETHEUS_RULE, find, overlay
from test_observability import promtool

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
RULES = DEPLOY / "prometheus"
SHIPPED_RULE = K8S / "components" / "monitoring" / "prometheusrule.yaml"
AZURE_TEMPLATE = DEPLOY / "azure" / "prometheus-rule-groups.json"
MATCHER = re.compile(r'\b(job|horizontalpodautoscaler|deployment)="([^"]*)"')
UNITS = {"w": 604800, "d": 86400, "h": 3600, "m": 60, "s": 1}
ISO_UNITS = {"H": 3600, "M": 60, "S": 1}

Group = dict[str, Any]

# Microsoft.AlertsManagement/prometheusRuleGroups, API version 2023-03-01 (the published REST
# specification): the properties of a rule group and of its rules, with their types.
_DURATION_ISO = r"^PT(\d+H)?(\d+M)?(\d+S)?$"
_ARM_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
AZURE_RULE_GROUP = {
    "type": "object",
    "additionalProperties": False,
    "required": ["type", "apiVersion", "name", "location", "properties"],
    "properties": {
        "type": {"const": "Microsoft.AlertsManagement/prometheusRuleGroups"},
        "apiVersion": {"const": "2023-03-01"},
        "name": {"type": "string", "pattern": "^[^:@/#{}%&+*<>?]+$"},
        "location": {"type": "string"},
        "tags": _ARM_STRING_MAP,
        "properties": {
            "type": "object",
            "additionalProperties": False,
            "required": ["scopes", "rules"],
            "properties": {
                "description": {"type": "string"},
                "enabled": {"type": "boolean"},
                "clusterName": {"type": "string"},
                # The API takes one scope today: the Azure Monitor workspace.
                "scopes": {"type": "array", "minItems": 1, "maxItems": 1,
                           "items": {"type": "string"}},
                # "Should be between 1 and 15 minutes".
                "interval": {"enum": [f"PT{m}M" for m in range(1, 16)]},
                "rules": {"type": "array", "minItems": 1, "items": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["expression"],
                    "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
                    "properties": {
                        "record": {"type": "string"},
                        "alert": {"type": "string"},
                        "enabled": {"type": "boolean"},
                        "expression": {"type": "string"},
                        "labels": _ARM_STRING_MAP,
                        "severity": {"type": "integer", "minimum": 0, "maximum": 4},
                        "for": {"type": "string", "pattern": _DURATION_ISO},
                        "annotations": _ARM_STRING_MAP,
                        # An ARM expression (the template's variable) or the array itself.
                        "actions": {"type": ["string", "array"]},
                        "resolveConfiguration": {
                            "type": "object", "additionalProperties": False,
                            "properties": {"autoResolved": {"type": "boolean"},
                                           "timeToResolve": {"type": "string"}},
                        },
                    },
                }},
            },
        },
    },
}  # fmt: skip


def source_groups() -> list[Group]:
    """The rule files' groups, recording rules first, read here and not by the script."""
    groups: list[Group] = []
    for name in ("recording.yml", "alerts.yml"):
        groups += yaml.safe_load((RULES / name).read_text())["groups"]
    return groups


def shipped_rule() -> dict[str, Any]:
    rule: dict[str, Any] = yaml.safe_load(SHIPPED_RULE.read_text())
    return rule


def azure_template() -> dict[str, Any]:
    template: dict[str, Any] = json.loads(AZURE_TEMPLATE.read_text())
    return template


def seconds(duration: str) -> int:
    """A Prometheus duration ("30s", "1h30m") in seconds."""
    parts = re.findall(r"(\d+)([wdhms])", duration)
    assert "".join(n + u for n, u in parts) == duration, duration
    return sum(int(n) * UNITS[u] for n, u in parts)


def iso_seconds(duration: str) -> int:
    """An ISO 8601 duration of hours, minutes and seconds ("PT1H30M") in seconds."""
    assert re.fullmatch(_DURATION_ISO, duration), duration
    return sum(int(n) * ISO_UNITS[u] for n, u in re.findall(r"(\d+)([HMS])", duration))


def azure_as_prometheus(template: dict[str, Any]) -> list[Group]:
    """The Azure rule groups written back as Prometheus rule groups, without their intervals
    (Azure's shortest is a minute): expression to expr, ISO durations to seconds."""
    groups = []
    for resource in template["resources"]:
        rules = []
        for azure in resource["properties"]["rules"]:
            kind = "alert" if "alert" in azure else "record"
            rule: dict[str, Any] = {kind: azure[kind], "expr": azure["expression"]}
            if "for" in azure:
                rule["for"] = f"{iso_seconds(azure['for'])}s"
            for key in ("labels", "annotations"):
                if key in azure:
                    rule[key] = azure[key]
            rules.append(rule)
        groups.append({"name": resource["name"], "rules": rules})
    return groups


def comparable(groups: list[Group]) -> list[Group]:
    """Groups without intervals, every `for` in seconds: what both copies must agree on."""
    out = []
    for group in groups:
        rules = [
            {**r, "for": f"{seconds(r['for'])}s"} if "for" in r else dict(r) for r in group["rules"]
        ]
        out.append({"name": group["name"], "rules": rules})
    return out


def write_groups(folder: Path, groups: list[Group]) -> Path:
    path = folder / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    return path


def copy_rules() -> ModuleType:
    """deploy/prometheus/copy_rules.py, the script that writes both copies."""
    spec = importlib.util.spec_from_file_location("copy_rules", RULES / "copy_rules.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- the copies say what the rule files say ---------------------------------------------------


def test_the_prometheus_rule_carries_the_rule_files_groups_unchanged() -> None:
    groups = source_groups()
    assert [g["name"] for g in groups] == [
        "batchserve.recording", "batchserve.alerts", "batchserve.kubernetes",
    ]  # fmt: skip
    assert shipped_rule()["spec"]["groups"] == groups


@pytest.mark.parametrize("name", OVERLAYS)
def test_every_overlay_ships_the_rules(name: str) -> None:
    rule = find(overlay(name), "PrometheusRule")
    assert rule["spec"]["groups"] == source_groups()


def test_the_azure_rule_groups_carry_the_same_rules() -> None:
    template = azure_template()
    assert azure_as_prometheus(template) == comparable(source_groups())
    for resource, group in zip(template["resources"], source_groups(), strict=True):
        wanted = max(seconds(group.get("interval", "0s")), 60)
        assert iso_seconds(resource["properties"]["interval"]) == wanted, group["name"]
        for rule in resource["properties"]["rules"]:
            if "alert" in rule:
                # Pages are more severe than warnings on Azure's 0 (critical) to 4 scale.
                assert rule["severity"] == {"page": 1, "warning": 2}[rule["labels"]["severity"]]
                assert rule["actions"] == "[variables('actions')]", rule["alert"]


def test_the_azure_comparison_rejects_a_changed_rule() -> None:
    template = azure_template()
    alerts = template["resources"][1]["properties"]["rules"]
    changed = copy.deepcopy(template)
    changed["resources"][1]["properties"]["rules"][0]["for"] = "PT6M"
    assert alerts[0]["for"] == "PT5M"
    assert azure_as_prometheus(changed) != comparable(source_groups())
    changed = copy.deepcopy(template)
    changed["resources"][1]["properties"]["rules"][0]["expression"] += " > 1"
    assert azure_as_prometheus(changed) != comparable(source_groups())


def test_the_copies_are_what_the_script_writes(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    script = copy_rules()
    assert script.main(["--check"]) == 0, "run: python deploy/prometheus/copy_rules.py"
    # The check itself can fail: a copy that differs from what the script writes.
    written = script.copies()
    assert written[SHIPPED_RULE] == SHIPPED_RULE.read_text()
    assert written[AZURE_TEMPLATE] == AZURE_TEMPLATE.read_text()
    monkeypatch.setattr(script, "PROMETHEUS_RULE", SHIPPED_RULE.with_suffix(".missing"))
    assert script.main(["--check"]) == 1
    assert "out of date" in capsys.readouterr().err


# -- the APIs that load them --------------------------------------------------------------------


def test_the_prometheus_rule_has_the_fields_of_its_crd() -> None:
    jsonschema = pytest.importorskip("jsonschema", reason="pip install '.[deploy]'")
    errors = list(jsonschema.Draft202012Validator(PROMETHEUS_RULE).iter_errors(shipped_rule()))
    assert not errors, [e.message for e in errors]


@pytest.mark.parametrize(
    ("field", "value"), [("expresion", "up == 0"), ("for", "5 minutes"), ("record", "x:y")]
)
def test_the_crd_check_rejects_a_broken_rule(field: str, value: str) -> None:
    jsonschema = pytest.importorskip("jsonschema", reason="pip install '.[deploy]'")
    rule = shipped_rule()
    alert = rule["spec"]["groups"][1]["rules"][0]
    alert[field] = value  # a misspelt field, a duration Prometheus cannot read, alert + record
    assert list(jsonschema.Draft202012Validator(PROMETHEUS_RULE).iter_errors(rule))


def test_the_azure_rule_groups_have_the_fields_of_the_api() -> None:
    jsonschema = pytest.importorskip("jsonschema", reason="pip install '.[deploy]'")
    template = azure_template()
    assert template["$schema"].endswith("/deploymentTemplate.json#")
    for resource in template["resources"]:
        errors = list(jsonschema.Draft202012Validator(AZURE_RULE_GROUP).iter_errors(resource))
        assert not errors, f"{resource['name']}: {[e.message for e in errors]}"
    # Every ARM expression names a parameter or variable the template declares.
    text = AZURE_TEMPLATE.read_text()
    used = set(re.findall(r"parameters\('(\w+)'\)", text))
    assert used == set(template["parameters"])
    assert set(re.findall(r"variables\('(\w+)'\)", text)) == set(template["variables"])


@pytest.mark.parametrize(
    ("field", "value"), [("expresion", "up == 0"), ("for", "5m"), ("severity", 5)]
)
def test_the_azure_check_rejects_a_broken_rule(field: str, value: object) -> None:
    jsonschema = pytest.importorskip("jsonschema", reason="pip install '.[deploy]'")
    resource = azure_template()["resources"][1]
    resource["properties"]["rules"][0][field] = value
    assert list(jsonschema.Draft202012Validator(AZURE_RULE_GROUP).iter_errors(resource))


def copies() -> dict[str, list[Group]]:
    return {
        "prometheusrule": shipped_rule()["spec"]["groups"],
        "azure": azure_as_prometheus(azure_template()),
    }


@pytest.mark.parametrize("which", ["prometheusrule", "azure"])
def test_promtool_checks_the_shipped_groups(which: str, tmp_path: Path) -> None:
    binary = promtool()
    path = write_groups(tmp_path, copies()[which])
    done = subprocess.run(
        [binary, "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "17 rules found" in done.stdout


@pytest.mark.parametrize("which", ["prometheusrule", "azure"])
def test_the_alert_unit_tests_pass_on_the_shipped_groups(which: str, tmp_path: Path) -> None:
    """deploy/prometheus/alerts_test.yml run on the groups as shipped, not the rule files."""
    binary = promtool()
    path = write_groups(tmp_path, copies()[which])
    unit_tests = yaml.safe_load((RULES / "alerts_test.yml").read_text())
    unit_tests["rule_files"] = [path.name]
    (tmp_path / "alerts_test.yml").write_text(yaml.safe_dump(unit_tests, sort_keys=False))
    done = subprocess.run(
        [binary, "test", "rules", "alerts_test.yml"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_is_unit_tested_firing_and_not_firing() -> None:
    alerts = {r["alert"] for g in source_groups() for r in g["rules"] if "alert" in r}
    unit_tests = yaml.safe_load((RULES / "alerts_test.yml").read_text())["tests"]
    cases = [case for test in unit_tests for case in test["alert_rule_test"]]
    firing = {c["alertname"] for c in cases if c["exp_alerts"]}
    silent = {c["alertname"] for c in cases if not c["exp_alerts"]}
    assert alerts >= {"BatchserveTargetDown", "BatchserveTargetsAbsent",
                      "BatchserveAutoscalerAtMax", "BatchserveReplicasUnavailable"}  # fmt: skip
    assert not alerts - firing, f"never seen firing: {sorted(alerts - firing)}"
    assert not alerts - silent, f"never seen holding back: {sorted(alerts - silent)}"


# -- the rules name what is deployed ----------------------------------------------------------


def matchers(label: str) -> set[str]:
    """The values the rules match `label` against."""
    exprs = [r["expr"] for g in source_groups() for r in g["rules"]]
    return {value for e in exprs for key, value in MATCHER.findall(e) if key == label}


@pytest.mark.parametrize("name", OVERLAYS)
def test_the_rules_select_the_rendered_job_autoscaler_and_deployment(name: str) -> None:
    objects = overlay(name)
    # The Prometheus Operator names a ServiceMonitor target's job after its Service.
    assert "jobLabel" not in find(objects, "ServiceMonitor")["spec"]
    assert matchers("job") == {find(objects, "Service")["metadata"]["name"]}
    assert matchers("deployment") == {find(objects, "Deployment")["metadata"]["name"]}
    autoscalers = set()
    for o in objects:
        if o["kind"] == "ScaledObject":
            config = o["spec"].get("advanced", {}).get("horizontalPodAutoscalerConfig", {})
            # KEDA names the HPA it creates keda-hpa-<ScaledObject> unless told otherwise.
            autoscalers.add(config.get("name", "keda-hpa-" + o["metadata"]["name"]))
        elif o["kind"] == "HorizontalPodAutoscaler":
            autoscalers.add(o["metadata"]["name"])
    assert autoscalers
    assert matchers("horizontalpodautoscaler") == autoscalers


def test_the_plain_prometheus_job_is_the_one_the_rules_select() -> None:
    config = yaml.safe_load((RULES / "prometheus.yml").read_text())
    assert {job["job_name"] for job in config["scrape_configs"]} == matchers("job")
    assert set(config["rule_files"]) == {"recording.yml", "alerts.yml"}
