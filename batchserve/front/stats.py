"""Per-model request counts, latency and bytes, recorded by the infer endpoint."""

from __future__ import annotations

from dataclasses import dataclass, field

from batchserve.histogram import LATENCY_BUCKETS, Histogram, HistogramSnapshot

UNKNOWN_MODEL = "_unknown"  # requests for models that do not exist share one label value


@dataclass(slots=True)
class _ModelRequests:
    statuses: dict[int, int] = field(default_factory=dict)
    latency: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))
    request_bytes: int = 0
    response_bytes: int = 0


@dataclass(frozen=True, slots=True)
class ModelRequestStatistics:
    statuses: dict[int, int]
    latency: HistogramSnapshot
    request_bytes: int
    response_bytes: int


class RequestStatistics:
    """Counters on the event loop's thread; read as snapshots by the metrics collector."""

    __slots__ = ("_models", "in_flight")

    def __init__(self) -> None:
        self._models: dict[str, _ModelRequests] = {}
        self.in_flight = 0

    def record(
        self, model: str, status: int, seconds: float, request_bytes: int, response_bytes: int
    ) -> None:
        entry = self._models.get(model)
        if entry is None:
            entry = self._models[model] = _ModelRequests()
        entry.statuses[status] = entry.statuses.get(status, 0) + 1
        entry.latency.observe(seconds)
        entry.request_bytes += request_bytes
        entry.response_bytes += response_bytes

    def snapshot(self) -> dict[str, ModelRequestStatistics]:
        return {
            model: ModelRequestStatistics(
                dict(e.statuses), e.latency.snapshot(), e.request_bytes, e.response_bytes
            )
            for model, e in self._models.items()
        }
