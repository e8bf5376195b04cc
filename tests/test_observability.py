"""The dashboard and the rules use only metrics the server really exports; promtool agrees."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from batchserve import CacheConfig, Engine

from helpers import RedisProcess, StartServer

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
METRIC = re.compile(r"\b((?:batchserve|process)_[a-z0-9_]+)\b")
SUFFIXES = ("_bucket", "_count", "_sum", "_total", "_created")


def expressions() -> list[str]:
    dashboard = json.loads((DEPLOY / "grafana" / "batchserve-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    exprs += [v["query"] for v in dashboard["templating"]["list"] if "query" in v]
    for name in ("alerts.yml", "recording.yml"):
        text = (DEPLOY / "prometheus" / name).read_text()
        exprs += re.findall(r"expr:\s*(\|[\s\S]*?(?=\n\s+- |\n\s+for:|\Z)|.+)", text)
    return exprs


def family(name: str) -> str:
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return name.removesuffix(suffix)
    return name


def test_each_dashboard_panel_names_its_queries_apart() -> None:
    # Grafana keeps one query per refId: a repeated one silently hides a series.
    dashboard = json.loads((DEPLOY / "grafana" / "batchserve-dashboard.json").read_text())
    for panel in dashboard["panels"]:
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), f"{panel['title']}: refIds {refs}"


def test_the_model_variable_lists_models_that_never_loaded() -> None:
    # A version that fails to load has no batchserve_model_ready series, only a state.
    dashboard = json.loads((DEPLOY / "grafana" / "batchserve-dashboard.json").read_text())
    (model,) = [v for v in dashboard["templating"]["list"] if v["name"] == "model"]
    assert model["query"] == "label_values(batchserve_model_version_state, model)"


def test_the_rules_and_dashboard_use_metrics_at_all() -> None:
    used = {family(m) for expr in expressions() for m in METRIC.findall(expr)}
    assert len(used) >= 10  # the extraction itself works


async def test_every_metric_in_the_dashboard_and_rules_is_exported(
    start_server: StartServer, mlp_path: Path, redis_server: RedisProcess
) -> None:
    cache = CacheConfig(size_mb=4, redis_url=redis_server.url)
    server = await start_server(Engine(mlp_path, name="mlp", cache=cache))
    body = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [1.0] * 64}]}
    async with aiohttp.ClientSession() as http:
        for _ in range(3):
            async with http.post(f"{server.url}/v2/models/mlp/infer", json=body) as r:
                assert r.status == 200
        async with http.get(f"{server.url}/metrics") as r:
            exported = {f.name for f in text_string_to_metric_families(await r.text())}
    used = {family(m) for expr in expressions() for m in METRIC.findall(expr)}
    recorded = {m for m in used if m.startswith("batchserve:")}
    missing = sorted(used - exported - recorded)
    assert not missing, f"used by the dashboard or rules but not exported: {missing}"


def promtool() -> str:
    binary = shutil.which("promtool")
    if binary is None:
        if os.environ.get("BATCHSERVE_REQUIRE_PROMTOOL"):
            pytest.fail("promtool is required here (BATCHSERVE_REQUIRE_PROMTOOL is set)")
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    return binary


def test_promtool_checks_the_rules() -> None:
    binary = promtool()
    rules = DEPLOY / "prometheus"
    done = subprocess.run(
        [binary, "check", "rules", "recording.yml", "alerts.yml"],
        cwd=rules, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


def test_promtool_unit_tests_the_alerts() -> None:
    binary = promtool()
    done = subprocess.run(
        [binary, "test", "rules", "alerts_test.yml"],
        cwd=DEPLOY / "prometheus", capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
