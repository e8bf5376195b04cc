"""OpenTelemetry traces, opt-in: a server span per inference request that continues the
caller's W3C trace context, and a span per ONNX Runtime run, linked to and from the request
spans whose rows it carried.

Nothing here imports OpenTelemetry before `Tracing.start`. With tracing off the server's parts
hold None instead of a `Tracing`, so the request path does no tracing work and the SDK is never
loaded. Spans leave through the SDK's batch span processor, whose own thread exports them over
OTLP/HTTP, off the event loop.

Times: the batcher measures with the engine's monotonic clock (`Clock`); spans need wall-clock
nanoseconds, so every span time here is monotonic time plus one offset taken at start, and a
request's phases and its batch's run line up exactly.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import random
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from batchserve.lifecycle import Lifecycle
from batchserve.version import __version__

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.sampling import Sampler
    from opentelemetry.trace import Span, SpanContext, Tracer

    from batchserve.call import Call, Result

log = logging.getLogger("batchserve.tracing")

# The OTLP/HTTP path of traces under a collector's base URL (as the SDK appends it to
# OTEL_EXPORTER_OTLP_ENDPOINT).
TRACES_PATH = "/v1/traces"

# Attribute keys (docs/observability.md lists them): the server's own under `batchserve.`,
# the status under OpenTelemetry's semantic-convention names.
MODEL = "batchserve.model"
VERSION = "batchserve.model.version"
ROWS = "batchserve.rows"
CACHE = "batchserve.cache"
BATCH_ROWS = "batchserve.batch.rows"
BATCH_REQUESTS = "batchserve.batch.requests"
SESSION = "batchserve.session"
PROTOCOL = "batchserve.protocol"
STATUS = "batchserve.status"
HTTP_STATUS = "http.response.status_code"
# The status of a request whose client went away before its answer (nginx's convention).
CLIENT_GONE = 499
GRPC_STATUS = "rpc.grpc.status_code"


@dataclass(frozen=True, slots=True)
class TracingConfig:
    """Where spans go, and how many.

    endpoint: the OTLP/HTTP base URL of a collector (`http://collector:4318`); spans are
        posted to it + `/v1/traces`. None: tracing is off, unless `from_environment`.
    from_environment: on, with the SDK's own `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or
        `OTEL_EXPORTER_OTLP_ENDPOINT` saying where (the CLI sets it when either is set).
    sample_ratio: parent-based: a request whose caller sent a sampled (or an unsampled)
        `traceparent` is traced (or not) as the caller decided; one without is traced with this
        probability (by its trace id, so every process agrees).
    service_name: `service.name` of the spans' resource; `OTEL_SERVICE_NAME` wins when set.
    schedule_delay_ms: the batch span processor's export interval (None: the SDK's
        `OTEL_BSP_SCHEDULE_DELAY`, 5000 ms by default).
    """

    endpoint: str | None = None
    sample_ratio: float = 1.0
    service_name: str = "batchserve"
    from_environment: bool = False
    schedule_delay_ms: float | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.sample_ratio <= 1.0:
            raise ValueError(f"otel_sample_ratio must be in [0, 1], got {self.sample_ratio}")
        if self.endpoint is not None and not self.endpoint.startswith(("http://", "https://")):
            raise ValueError(
                f"otel_endpoint must be an http:// or https:// URL, not {self.endpoint!r}"
            )
        if not self.service_name:
            raise ValueError("service_name must not be empty")
        if self.schedule_delay_ms is not None and self.schedule_delay_ms <= 0:
            raise ValueError(f"schedule_delay_ms must be > 0, got {self.schedule_delay_ms}")

    @property
    def enabled(self) -> bool:
        return self.endpoint is not None or self.from_environment

    def check_installed(self) -> None:
        """ValueError when tracing is on and the `otel` extra is not installed: said at start,
        in one line, rather than as an import error once the models are loaded."""
        if not self.enabled:
            return
        for module in ("opentelemetry.sdk.trace", "opentelemetry.exporter.otlp.proto.http"):
            try:
                found = importlib.util.find_spec(module) is not None
            except ModuleNotFoundError:  # a parent package is missing
                found = False
            if not found:
                raise ValueError(
                    "tracing needs the OpenTelemetry SDK and its OTLP exporter: "
                    "pip install 'batchserve[otel]'"
                )

    @property
    def traces_url(self) -> str | None:
        """The URL spans are posted to (None: the SDK's environment variables say)."""
        return None if self.endpoint is None else self.endpoint.rstrip("/") + TRACES_PATH


class Tracing(Lifecycle):
    """The server's tracer: built from a `TracingConfig` by the composition root, started before
    the engines and closed after them (`aclose` exports what is left: the drained requests'
    spans too). It owns its `TracerProvider`; OpenTelemetry's global provider is left alone."""

    def __init__(self, config: TracingConfig) -> None:
        if not config.enabled:
            raise ValueError("tracing is off in this config (no endpoint): build no Tracing")
        self.config = config
        self._provider: TracerProvider | None = None
        self._tracer: Tracer | None = None
        self._offset_ns = 0
        self._otel: Any = None  # the API names the hot path uses, bound once at start
        self._ratio = config.sample_ratio
        self._draw = random.Random().random  # the ratio's draw for requests without a parent

    async def start(self) -> None:
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self._offset_ns = time.time_ns() - time.monotonic_ns()
        provider = TracerProvider(
            sampler=_sampler(self.config.sample_ratio),
            resource=_resource(self.config.service_name),
            shutdown_on_exit=False,  # `aclose` shuts it down; no atexit hook of the SDK's
        )
        provider.add_span_processor(_processor(self.config))
        self._provider = provider
        self._tracer = provider.get_tracer("batchserve", __version__)
        self._otel = _Api(trace, TraceContextTextMapPropagator())
        where = self.config.traces_url or "the OTEL_EXPORTER_OTLP_* endpoint"
        log.info("tracing to %s, sample ratio %g (parent-based)", where, self.config.sample_ratio)

    async def aclose(self) -> None:
        provider, self._provider = self._provider, None
        self._tracer = None
        if provider is not None:
            # Blocks until the last batch is exported (or the exporter's timeout): off the loop.
            await asyncio.to_thread(provider.shutdown)

    def wall_ns(self, monotonic_s: float) -> int:
        """A `time.monotonic()` (or event-loop) time as the wall-clock nanoseconds spans use."""
        return int(monotonic_s * 1e9) + self._offset_ns

    def now_ns(self) -> int:
        return time.monotonic_ns() + self._offset_ns

    def request(self, carrier: Mapping[str, str], protocol: str) -> RequestTrace | None:
        """The span of one inference request, started now: a child of the caller's span when
        `carrier` (HTTP headers, gRPC metadata) holds a valid `traceparent` (and `tracestate`).
        None for a request that is not sampled, decided here before any OpenTelemetry call
        (the SDK's context extraction and span start cost a request tens of microseconds,
        which at a 1% ratio would be paid 99 times for nothing): parent-based, so a caller's
        unsampled `traceparent` is followed; the ratio for a request without one."""
        tracer, otel = self._tracer, self._otel
        if tracer is None:
            raise RuntimeError("tracing has not started")
        sampled = _parent_sampled(carrier.get("traceparent"))
        if sampled is None:  # no valid parent: a root span, by the ratio
            if self._ratio < 1.0 and self._draw() >= self._ratio:
                return None
        elif not sampled:
            return None
        parent = otel.propagator.extract(carrier)
        start_ns = self.now_ns()
        span = tracer.start_span(
            "infer", parent, otel.server, {PROTOCOL: protocol}, start_time=start_ns
        )
        return RequestTrace(self, span, start_ns)

    def batches(self, model: str, version: str) -> BatchTracer:
        """The tracer of one engine's ONNX Runtime runs."""
        return BatchTracer(self, model, version)

    def _child(self, parent: Span, name: str, start_ns: int, end_ns: int) -> None:
        tracer = self._tracer
        if tracer is None:  # closed meanwhile: the request's span is lost with it
            return
        context = self._otel.trace.set_span_in_context(parent)
        child = tracer.start_span(name, context, start_time=start_ns)
        child.end(end_time=max(end_ns, start_ns))


class _Api:
    """The OpenTelemetry names the request path needs, looked up once."""

    __slots__ = ("error", "link", "propagator", "server", "status", "trace")

    def __init__(self, trace: Any, propagator: Any) -> None:
        self.trace = trace
        self.propagator = propagator
        self.server = trace.SpanKind.SERVER
        self.link = trace.Link
        self.status = trace.Status
        self.error = trace.StatusCode.ERROR


class RequestTrace:
    """One request's span and the times of its phases. A request the sampler dropped has a
    span that records nothing, and this object then does nothing either: it never reaches the
    batcher (`decoded` leaves `call.trace` None)."""

    __slots__ = ("_answered_ns", "_decoded_ns", "_rows", "_started_ns", "_tracing", "_version",
                 "recording", "span")  # fmt: skip

    def __init__(self, tracing: Tracing, span: Span, started_ns: int) -> None:
        self._tracing = tracing
        self.span = span
        self.recording = span.is_recording()
        self._started_ns = started_ns
        self._decoded_ns = 0
        self._answered_ns = 0
        self._rows: int | None = None
        self._version: str | None = None

    @property
    def context(self) -> SpanContext:
        return self.span.get_span_context()

    def decoded(self, call: Call, version: str) -> None:
        """The request is read and decoded into `call` for the engine of this model `version`;
        a sampled request's call carries this trace to the batcher."""
        if not self.recording:
            return
        self._decoded_ns = self._tracing.now_ns()
        self._version = version
        call.trace = self
        for array in call.inputs.values():
            self._rows = int(array.shape[0]) if array.shape else 1
            break

    def answered(self) -> None:
        """The engine's answer is in: encoding the response starts."""
        if self.recording:
            self._answered_ns = self._tracing.now_ns()

    def batched(self, enqueued_s: float, started_s: float, ended_s: float, batch: Span) -> None:
        """The request's rows waited in the queue from `enqueued_s` and ran in `batch` from
        `started_s` to `ended_s` (monotonic seconds)."""
        tracing = self._tracing
        started = tracing.wall_ns(started_s)
        tracing._child(self.span, "queue", tracing.wall_ns(enqueued_s), started)
        tracing._child(self.span, "inference", started, tracing.wall_ns(ended_s))
        self.span.add_link(batch.get_span_context())

    def end(
        self, model: str, status: int, served: Result | None, grpc_code: int | None = None
    ) -> None:
        """Name, attributes and status, then the span ends now. `status`: the HTTP status (a
        gRPC call's too: the one HTTP gives the same outcome), `grpc_code` the gRPC status."""
        span = self.span
        if not self.recording:
            span.end()
            return
        tracing = self._tracing
        end_ns = tracing.now_ns()
        span.update_name(f"infer {model}")
        attributes: dict[str, str | int] = {MODEL: model, STATUS: status}
        if grpc_code is None:
            attributes[HTTP_STATUS] = status
        else:
            attributes[GRPC_STATUS] = grpc_code
        if self._version is not None:
            attributes[VERSION] = self._version
        if self._rows is not None:
            attributes[ROWS] = self._rows
        if served is not None:
            attributes[CACHE] = served.cache
            attributes[BATCH_ROWS] = served.batch_rows
        span.set_attributes(attributes)
        if status >= 500:
            otel = tracing._otel
            span.set_status(otel.status(otel.error))
        if self._decoded_ns:
            tracing._child(span, "decode", self._started_ns, self._decoded_ns)
        if self._answered_ns:
            tracing._child(span, "encode", self._answered_ns, end_ns)
        span.end(end_time=end_ns)


class Queued(Protocol):
    """What the batch tracer reads of a queued request (the batcher's `Pending`)."""

    @property
    def trace(self) -> RequestTrace | None: ...

    @property
    def enqueued_at(self) -> float: ...


class BatchTracer:
    """The spans of one engine's ONNX Runtime runs: one per run that carried a sampled
    request, linked to each sampled request span in it, and each of those linked back."""

    __slots__ = ("_name", "_tracing", "_version")

    def __init__(self, tracing: Tracing, model: str, version: str) -> None:
        self._tracing = tracing
        self._name = model
        self._version = version

    def ran(
        self,
        batch: Sequence[Queued],
        rows: int,
        session: int | None,
        started_s: float,
        ended_s: float,
        error: BaseException | None,
    ) -> None:
        """A run of `batch` (`rows` rows on session `session`) from `started_s` to `ended_s`
        (monotonic seconds), failed with `error` or not."""
        traced = [(item.trace, item.enqueued_at) for item in batch if item.trace is not None]
        tracing = self._tracing
        tracer, otel = tracing._tracer, tracing._otel
        if not traced or tracer is None:
            return  # no sampled request in it: nobody would follow a link to it
        attributes: dict[str, str | int] = {
            MODEL: self._name, VERSION: self._version, BATCH_ROWS: rows,
            BATCH_REQUESTS: len(batch),
        }  # fmt: skip
        if session is not None:
            attributes[SESSION] = session
        links = [otel.link(trace.context) for trace, _ in traced]
        span = tracer.start_span(
            f"batch {self._name}", None, attributes=attributes, links=links,
            start_time=tracing.wall_ns(started_s),
        )  # fmt: skip
        if error is not None:
            span.set_status(otel.status(otel.error, str(error).strip()[:200]))
        span.end(end_time=tracing.wall_ns(ended_s))
        for trace, enqueued_s in traced:
            trace.batched(enqueued_s, started_s, ended_s, span)


# W3C Trace Context's `traceparent`: version-traceid-parentid-flags, lowercase hex; a version
# other than 00 may carry more fields after these.
_TRACEPARENT = re.compile(
    r"[ \t]*([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?[ \t]*"
)


def _parent_sampled(traceparent: str | None) -> bool | None:
    """The sampled flag of a W3C `traceparent`; None when there is none or it is not valid
    (the request then starts a trace of its own, as the propagator reads it too)."""
    if traceparent is None:
        return None
    match = _TRACEPARENT.fullmatch(traceparent)
    if match is None:
        return None
    version, trace_id, span_id, flags, more = match.groups()
    if version == "ff" or (version == "00" and more) or trace_id == "0" * 32 or span_id == "0" * 16:
        return None
    return bool(int(flags, 16) & 1)


def _sampler(ratio: float) -> Sampler:
    """Parent-based sampling, and a run's span sampled whenever a request it links to is
    (a run is a root span of its own trace: a ratio decision on its own trace id would lose
    most of the runs the sampled requests point to). The ratio itself is drawn in
    `Tracing.request`, before the SDK is asked: a root request span that reaches the SDK was
    drawn already, so roots are always sampled here (`ratio` only names the policy)."""
    from opentelemetry.sdk.trace.sampling import (
        ALWAYS_ON,
        Decision,
        ParentBased,
        Sampler,
        SamplingResult,
    )

    class LinkedOrParentBased(Sampler):
        def __init__(self) -> None:
            self._requests = ParentBased(ALWAYS_ON)
            self._ratio = ratio

        def should_sample(  # type: ignore[no-untyped-def]
            self, parent_context, trace_id, name, kind=None, attributes=None, links=None,
            trace_state=None,
        ) -> SamplingResult:  # fmt: skip
            if (
                parent_context is None
                and links
                and any(link.context.trace_flags.sampled for link in links)
            ):
                return SamplingResult(Decision.RECORD_AND_SAMPLE, attributes)
            return self._requests.should_sample(
                parent_context, trace_id, name, kind, attributes, links, trace_state
            )

        def get_description(self) -> str:
            return f"LinkedOrParentBased{{ParentBased{{TraceIdRatio{{{self._ratio}}}}}}}"

    return LinkedOrParentBased()


def _resource(service_name: str) -> Any:
    from opentelemetry.sdk.resources import SERVICE_NAME, OTELResourceDetector, Resource

    # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES (read by the detector) win over the default.
    detected = dict(OTELResourceDetector().detect().attributes)
    return Resource.create({SERVICE_NAME: service_name, **detected})


def _processor(config: TracingConfig) -> Any:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    # Headers (an API key), timeout, compression and TLS come from the SDK's OTEL_EXPORTER_OTLP_*.
    exporter = OTLPSpanExporter(endpoint=config.traces_url)
    return BatchSpanProcessor(exporter, schedule_delay_millis=config.schedule_delay_ms)
