"""An OTLP/HTTP trace receiver in the test's own process: an aiohttp server on 127.0.0.1 (an
ephemeral port) that takes `POST /v1/traces` as a collector does, decodes each body with the
protocol's own message definitions (opentelemetry-proto's `ExportTraceServiceRequest`) and
keeps the spans, so tests wait for them on an event instead of sleeping.

It speaks the protocol, not the SDK: what it receives is what any collector would.
"""

from __future__ import annotations

import asyncio
import gzip
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Self, TypeVar

from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

PROTOBUF = "application/x-protobuf"
T = TypeVar("T")

# opentelemetry.proto.trace.v1.Span.SpanKind and Status.StatusCode, by number.
KINDS = {0: "UNSPECIFIED", 1: "INTERNAL", 2: "SERVER", 3: "CLIENT", 4: "PRODUCER", 5: "CONSUMER"}
STATUSES = {0: "UNSET", 1: "OK", 2: "ERROR"}


@dataclass(frozen=True)
class Link:
    trace_id: str
    span_id: str


@dataclass(frozen=True)
class Span:
    """One received span, its ids as lower-case hex (as in a `traceparent`)."""

    name: str
    trace_id: str
    span_id: str
    parent_span_id: str  # "" for a root span
    kind: str
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    links: tuple[Link, ...]
    status: str
    resource: dict[str, Any] = field(default_factory=dict)
    scope: str = ""


def _value(value: Any) -> Any:
    which = value.WhichOneof("value")
    if which == "array_value":
        return [_value(item) for item in value.array_value.values]
    return getattr(value, which) if which else None


def _attributes(pairs: Any) -> dict[str, Any]:
    return {pair.key: _value(pair.value) for pair in pairs}


def decode(body: bytes) -> list[Span]:
    """The spans of one `ExportTraceServiceRequest`."""
    request = ExportTraceServiceRequest()
    request.ParseFromString(body)
    spans = []
    for resource_spans in request.resource_spans:
        resource = _attributes(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                spans.append(
                    Span(
                        name=span.name,
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex(),
                        kind=KINDS[span.kind],
                        start_ns=span.start_time_unix_nano,
                        end_ns=span.end_time_unix_nano,
                        attributes=_attributes(span.attributes),
                        links=tuple(Link(k.trace_id.hex(), k.span_id.hex()) for k in span.links),
                        status=STATUSES[span.status.code],
                        resource=resource,
                        scope=scope_spans.scope.name,
                    )
                )
    return spans


class OtlpReceiver:
    """`async with OtlpReceiver() as receiver:` listens on `receiver.url` (give it to the
    exporter as its base URL); `receiver.spans` grows as exports arrive."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.exports = 0  # requests received
        self._arrived = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def __aenter__(self) -> Self:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/traces", self._export)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self._runner = runner
        self.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _export(self, request: web.Request) -> web.Response:
        if request.content_type != PROTOBUF:
            return web.Response(status=415, text=f"expected {PROTOBUF}")
        body = await request.read()
        encoding = request.headers.get("Content-Encoding", "")
        if encoding == "gzip":
            body = gzip.decompress(body)
        elif encoding == "deflate":
            body = zlib.decompress(body)
        spans = decode(body)
        async with self._arrived:
            self.exports += 1
            self.spans.extend(spans)
            self._arrived.notify_all()
        answer = ExportTraceServiceResponse().SerializeToString()
        return web.Response(body=answer, content_type=PROTOBUF)

    async def wait_for(
        self, found: Callable[[list[Span]], T | None], what: str, timeout_s: float = 30.0
    ) -> T:
        """Wait until `found(spans)` gives something other than None (or a false value) and
        return it; checked at once and again after each export arrives."""
        async with self._arrived:
            try:
                async with asyncio.timeout(timeout_s):
                    while not (result := found(self.spans)):
                        await self._arrived.wait()
            except TimeoutError:
                names = sorted({span.name for span in self.spans})
                raise AssertionError(
                    f"still waiting after {timeout_s:g} s for {what}; spans received: {names}"
                ) from None
        return result

    def named(self, name: str) -> list[Span]:
        return [span for span in self.spans if span.name == name]
