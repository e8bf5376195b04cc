"""Prometheus metrics, read from the parts' own statistics at scrape time.

Nothing here runs per request: the engine, the batcher, the cache and the infer endpoint keep
plain counters and cheap histograms on the event loop's thread, and this collector turns
snapshots of them into metric families when Prometheus scrapes `/metrics`. Each process serves
its own `/metrics` (one process per port), so no multiprocess mode is needed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from batchserve.cache import CacheStatistics
from batchserve.engine import Engine
from batchserve.histogram import HistogramSnapshot

CIRCUIT_STATES = {"closed": 0, "open": 1, "half_open": 2}


class RequestCounts(Protocol):
    """One model's requests as the front end counted them (read-only snapshot)."""

    @property
    def statuses(self) -> Mapping[int, int]: ...

    @property
    def latency(self) -> HistogramSnapshot: ...

    @property
    def request_bytes(self) -> int: ...

    @property
    def response_bytes(self) -> int: ...


class ServedModels(Protocol):
    """What the collector reads of the model repository."""

    def __iter__(self) -> Iterator[Engine]: ...

    def index(self) -> list[dict[str, str]]: ...

    @property
    def load_failures(self) -> Mapping[str, int]: ...


def _histogram(family: HistogramMetricFamily, labels: list[str], snap: HistogramSnapshot) -> None:
    family.add_metric(labels, snap.cumulative(), snap.total)


def _status_classes(statuses: Mapping[int, int]) -> list[tuple[str, int]]:
    classes: dict[str, int] = {}
    for status, count in statuses.items():
        key = f"{status // 100}xx"
        classes[key] = classes.get(key, 0) + count
    return sorted(classes.items())


class BatchserveCollector(Collector):
    """`requests`: each front end's per-model counts by its protocol ("http", "grpc"), a
    snapshot function each, so that counting costs a front end nothing per request beyond its
    own counters."""

    def __init__(
        self,
        repository: ServedModels,
        requests: Mapping[str, Callable[[], Mapping[str, RequestCounts]]],
        in_flight: Callable[[], int],
        loop_lag: Callable[[], tuple[float, int]] = lambda: (0.0, 0),
    ) -> None:
        self._repository = repository
        self._requests = requests
        self._in_flight = in_flight
        self._loop_lag = loop_lag  # (seconds late now, requests shed for it)

    def collect(self) -> Iterator[Metric]:
        yield from self._http()
        yield from self._engines()

    def _http(self) -> Iterator[Metric]:
        total = CounterMetricFamily(
            "batchserve_requests",
            "Inference requests by model, protocol and HTTP status class (a gRPC call counts "
            "under the status HTTP gives the same outcome).",
            labels=["model", "protocol", "status_class"],
        )  # fmt: skip
        latency = HistogramMetricFamily(
            "batchserve_request_duration_seconds",
            "Time from a request's arrival to its answer, per model and protocol.",
            labels=["model", "protocol"],
        )  # fmt: skip
        received = CounterMetricFamily(
            "batchserve_request_bytes", "Inference request body (message) bytes.",
            labels=["model", "protocol"],
        )  # fmt: skip
        sent = CounterMetricFamily(
            "batchserve_response_bytes", "Inference response body (message) bytes.",
            labels=["model", "protocol"],
        )  # fmt: skip
        for protocol, snapshot in self._requests.items():
            for model, stats in snapshot().items():
                for status_class, count in _status_classes(stats.statuses):
                    total.add_metric([model, protocol, status_class], count)
                _histogram(latency, [model, protocol], stats.latency)
                received.add_metric([model, protocol], stats.request_bytes)
                sent.add_metric([model, protocol], stats.response_bytes)
        in_flight = GaugeMetricFamily(
            "batchserve_in_flight_requests", "Inference requests being handled now."
        )
        in_flight.add_metric([], self._in_flight())
        lag_s, lag_shed = self._loop_lag()
        lag = GaugeMetricFamily(
            "batchserve_event_loop_lag_seconds", "How late the event loop ran its last 5 ms timer."
        )
        lag.add_metric([], lag_s)
        shed = CounterMetricFamily(
            "batchserve_lag_shed_requests",
            "Requests refused (429) before reading them because the event loop ran late.",
        )
        shed.add_metric([], lag_shed)
        yield from (total, latency, received, sent, in_flight, lag, shed)

    def _engines(self) -> Iterator[Metric]:
        families = _engine_families()
        for engine in self._repository:
            _add_engine(families, engine)
        yield from families.values()
        yield from self._repository_state()

    def _repository_state(self) -> Iterator[Metric]:
        states = GaugeMetricFamily(
            "batchserve_model_version_state",
            "1 for each model version's current state (READY, LOADING, UNAVAILABLE, UNLOADING); "
            "version 'config' is a problem with the model's config.",
            labels=["model", "version", "state"],
        )
        for row in self._repository.index():
            states.add_metric([row["name"], row["version"] or "config", row["state"]], 1.0)
        failures = CounterMetricFamily(
            "batchserve_model_load_failures",
            "Model versions (or model configs) that failed to load.",
            labels=["model"],
        )
        for model, count in sorted(self._repository.load_failures.items()):
            failures.add_metric([model], count)
        yield from (states, failures)


def build_registry(collector: Collector) -> CollectorRegistry:
    """An app-owned registry (never the global one): ours plus process and platform metrics."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry


def _engine_families() -> dict[str, Any]:
    """The per-model metric families, empty, by a short key."""
    labels = ["model", "version"]
    f: dict[str, Any] = {
        "wait": HistogramMetricFamily(
            "batchserve_queue_wait_seconds",
            "Time requests waited in the batching queue.", labels=labels),
        "run": HistogramMetricFamily(
            "batchserve_inference_duration_seconds",
            "ONNX Runtime time per batch, from dispatch to results.", labels=labels),
        "rows": HistogramMetricFamily(
            "batchserve_batch_rows", "Rows per ONNX Runtime run.", labels=labels),
        "queued": GaugeMetricFamily(
            "batchserve_queue_rows", "Rows waiting in the batching queue.", labels=labels),
        "capacity": GaugeMetricFamily(
            "batchserve_queue_capacity_rows",
            "Rows the queue admits before rejecting (429).", labels=labels),
        "runs": CounterMetricFamily(
            "batchserve_inference_runs", "ONNX Runtime runs.", labels=labels),
        "inferred": CounterMetricFamily(
            "batchserve_inference_rows", "Rows computed by ONNX Runtime.", labels=labels),
        "rejected": CounterMetricFamily(
            "batchserve_rejected_requests",
            "Requests refused (429): the queue was full, or a deadline it could not meet.",
            labels=labels),
        "cancelled": CounterMetricFamily(
            "batchserve_cancelled_requests",
            "Requests withdrawn from the queue (client gone).", labels=labels),
        "failed": CounterMetricFamily(
            "batchserve_failed_requests", "Requests whose ONNX Runtime run failed.",
            labels=labels),
        "load": GaugeMetricFamily(
            "batchserve_model_load_seconds", "Time to load and warm up the model.",
            labels=labels),
        "ready": GaugeMetricFamily(
            "batchserve_model_ready", "1 when the model accepts requests.", labels=labels),
        "sessions": GaugeMetricFamily(
            "batchserve_sessions", "ONNX Runtime sessions in service.", labels=labels),
        "replaced": CounterMetricFamily(
            "batchserve_session_replacements",
            "Sessions rebuilt after repeated failed runs.", labels=labels),
        "live": GaugeMetricFamily(
            "batchserve_model_live",
            "0 when the session pool is wedged or lost (liveness fails).", labels=labels),
        "cache": CounterMetricFamily(
            "batchserve_cache_lookups", "Response cache lookups by tier and result.",
            labels=[*labels, "tier", "result"]),
        "cache_errors": CounterMetricFamily(
            "batchserve_cache_errors", "Response cache errors by tier.",
            labels=[*labels, "tier"]),
        "coalesced": CounterMetricFamily(
            "batchserve_cache_coalesced_requests",
            "Requests that waited for an identical one in flight.", labels=labels),
        "cache_bytes": GaugeMetricFamily(
            "batchserve_cache_bytes", "Bytes held by the local cache tier.", labels=labels),
        "circuit": GaugeMetricFamily(
            "batchserve_cache_circuit_state",
            "Redis circuit breaker: 0 closed, 1 open, 2 half-open.", labels=labels),
        # Models with priority levels only (config.toml [priority]); level "delayed" holds
        # the late requests of levels whose policy delays them.
        "level_wait": HistogramMetricFamily(
            "batchserve_priority_queue_wait_seconds",
            "Time requests waited in the batching queue, by priority level.",
            labels=[*labels, "level"]),
        "level_queued": GaugeMetricFamily(
            "batchserve_priority_queue_rows", "Rows waiting, by priority level.",
            labels=[*labels, "level"]),
        "level_rejected": CounterMetricFamily(
            "batchserve_priority_rejected_requests",
            "Requests refused (429) by the queue, by priority level.", labels=[*labels, "level"]),
        "level_delayed": CounterMetricFamily(
            "batchserve_priority_delayed_requests",
            "Requests of a level that delays late requests, moved behind the others.",
            labels=[*labels, "level"]),
    }  # fmt: skip
    return f


def _add_engine(f: dict[str, Any], engine: Engine) -> None:
    """One loaded model version's figures into the families (only readiness if not loaded)."""
    values = [engine.name, engine.version]
    f["ready"].add_metric(values, 1.0 if engine.ready else 0.0)
    try:
        stats = engine.statistics()
    except Exception:  # not loaded (yet): only readiness is known
        return
    batcher = stats.batcher
    for key, snap in (
        ("wait", batcher.queue_wait),
        ("run", batcher.run_time),
        ("rows", batcher.batch_rows_histogram),
    ):
        if snap is not None:
            _histogram(f[key], values, snap)
    f["queued"].add_metric(values, batcher.queued_rows)
    f["capacity"].add_metric(values, engine.batch_config.max_queue_rows)
    f["runs"].add_metric(values, batcher.batches)
    f["inferred"].add_metric(values, batcher.rows)
    f["rejected"].add_metric(values, batcher.rejected)
    f["cancelled"].add_metric(values, batcher.cancelled)
    f["failed"].add_metric(values, batcher.failed)
    f["load"].add_metric(values, stats.load_seconds)
    f["sessions"].add_metric(values, stats.pool.instances - stats.pool.lost)
    f["replaced"].add_metric(values, stats.pool.replacements)
    f["live"].add_metric(values, 0.0 if engine.problem() else 1.0)
    if stats.cache is not None:
        _add_cache(f, values, stats.cache)
    for level in batcher.levels:
        by_level = [*values, level.level]
        _histogram(f["level_wait"], by_level, level.queue_wait)
        f["level_queued"].add_metric(by_level, level.queued_rows)
        f["level_rejected"].add_metric(by_level, level.rejected)
        f["level_delayed"].add_metric(by_level, level.delayed)


def _add_cache(f: dict[str, Any], values: list[str], cache: CacheStatistics) -> None:
    f["cache"].add_metric([*values, "local", "hit"], cache.local.hits)
    f["cache"].add_metric([*values, "local", "miss"], cache.local.misses)
    f["cache_bytes"].add_metric(values, cache.local.bytes)
    f["coalesced"].add_metric(values, cache.coalesced)
    if cache.redis is not None:
        f["cache"].add_metric([*values, "redis", "hit"], cache.redis.hits)
        f["cache"].add_metric([*values, "redis", "miss"], cache.redis.misses)
        f["cache_errors"].add_metric([*values, "redis"], cache.redis.errors)
        f["circuit"].add_metric(values, CIRCUIT_STATES[cache.redis.circuit])
