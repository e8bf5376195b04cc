"""`/metrics`: Prometheus exposition read from the parts' own statistics."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import aiohttp
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from batchserve import CacheConfig, Engine

from helpers import StartServer, wait_until

EXPECTED = {
    "batchserve_requests": "counter",
    "batchserve_request_duration_seconds": "histogram",
    "batchserve_request_bytes": "counter",
    "batchserve_response_bytes": "counter",
    "batchserve_in_flight_requests": "gauge",
    "batchserve_queue_wait_seconds": "histogram",
    "batchserve_inference_duration_seconds": "histogram",
    "batchserve_batch_rows": "histogram",
    "batchserve_queue_rows": "gauge",
    "batchserve_inference_runs": "counter",
    "batchserve_inference_rows": "counter",
    "batchserve_rejected_requests": "counter",
    "batchserve_cancelled_requests": "counter",
    "batchserve_failed_requests": "counter",
    "batchserve_model_load_seconds": "gauge",
    "batchserve_model_ready": "gauge",
    "batchserve_model_live": "gauge",
    "batchserve_model_version_state": "gauge",
    "batchserve_model_load_failures": "counter",
    "batchserve_event_loop_lag_seconds": "gauge",
    "batchserve_lag_shed_requests": "counter",
    "batchserve_sessions": "gauge",
    "batchserve_session_replacements": "counter",
    "batchserve_cache_lookups": "counter",
    "batchserve_cache_coalesced_requests": "counter",
    "batchserve_cache_bytes": "gauge",
    "process_cpu_seconds": "counter",
    "process_resident_memory_bytes": "gauge",
}


async def scrape(http: aiohttp.ClientSession, url: str) -> dict[str, object]:
    async with http.get(f"{url}/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = await response.text()
    return {family.name: family for family in text_string_to_metric_families(text)}


def value(family: object, name: str, **labels: str) -> float:
    for sample in family.samples:  # type: ignore[attr-defined]
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
            return float(sample.value)
    raise AssertionError(f"no sample {name} {labels}")


async def test_metrics_follow_the_traffic(
    start_server: StartServer, mlp_path: Path, http: aiohttp.ClientSession
) -> None:
    server = await start_server(Engine(mlp_path, name="mlp", cache=CacheConfig(size_mb=4)))
    url = f"{server.url}/v2/models/mlp/infer"
    rng = np.random.default_rng(0)
    for i in range(10):
        x = rng.standard_normal((2, 64)) if i < 5 else np.ones((2, 64))
        body = {"inputs": [{"name": "input", "shape": [2, 64], "datatype": "FP32",
                            "data": x.ravel().tolist()}]}  # fmt: skip
        async with http.post(url, json=body) as r:
            assert r.status == 200
    async with http.post(url, data=b"{broken") as r:
        assert r.status == 400
    async with http.post(f"{server.url}/v2/models/no-such-model-123/infer", json={}) as r:
        assert r.status == 404
    families = await scrape(http, server.url)
    for name, kind in EXPECTED.items():
        assert name in families, name
        assert families[name].type == kind, name  # type: ignore[attr-defined]
    requests = families["batchserve_requests"]
    assert value(requests, "batchserve_requests_total", model="mlp", status_class="2xx") == 10
    assert value(requests, "batchserve_requests_total", model="mlp", status_class="4xx") == 1
    # Unknown model names never become label values: one shared bucket.
    assert value(requests, "batchserve_requests_total", model="_unknown") == 1
    latency = families["batchserve_request_duration_seconds"]
    assert value(latency, "batchserve_request_duration_seconds_count", model="mlp") == 11
    assert (
        value(latency, "batchserve_request_duration_seconds_bucket", model="mlp", le="+Inf") == 11
    )
    rows = families["batchserve_inference_rows"]
    assert value(rows, "batchserve_inference_rows_total", model="mlp") == 12  # 5 + 1 distinct
    cache = families["batchserve_cache_lookups"]
    assert value(cache, "batchserve_cache_lookups_total", tier="local", result="hit") == 4
    assert value(families["batchserve_model_ready"], "batchserve_model_ready", model="mlp") == 1
    ours = [f for name, f in families.items() if name.startswith("batchserve_")]
    labels = {k for f in ours for s in f.samples for k in s.labels}  # type: ignore[attr-defined]
    assert labels <= {
        "model", "version", "protocol", "status_class", "tier", "result", "le", "state"
    }  # fmt: skip


async def test_access_log_lines_and_request_ids(
    start_server: StartServer, mlp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="batchserve.access")
    server = await start_server(
        Engine(mlp_path, name="mlp", cache=CacheConfig(size_mb=4)), access_log=True
    )
    body = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [1.0] * 64}]}
    trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    url = f"{server.url}/v2/models/mlp/infer"
    async with aiohttp.ClientSession() as http:
        headers = {"X-Request-ID": "abc-123", "traceparent": trace}
        async with http.post(url, json=body, headers=headers) as r:
            assert r.headers["X-Request-ID"] == "abc-123"
        async with http.post(url, json=body) as r:  # a cache hit, with a generated id
            generated = r.headers["X-Request-ID"]
    assert generated
    # the log is flushed off the request path: poll for both lines
    await wait_until(
        lambda: sum(r.name == "batchserve.access" for r in caplog.records) >= 2, "two log lines"
    )
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "batchserve.access"]
    assert [line["request_id"] for line in lines] == ["abc-123", generated]
    first, second = lines
    assert first["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert first["status"] == 200
    assert first["model"] == "mlp"
    assert first["cache"] == "miss"
    assert first["batch_rows"] == 1
    assert second["cache"] == "hit"
    assert second["batch_rows"] == 0
    assert second["trace_id"] is None
    assert first["latency_ms"] > 0
