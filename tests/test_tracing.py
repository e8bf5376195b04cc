"""OpenTelemetry traces against a real OTLP/HTTP receiver (tests/otlp_receiver.py decodes what
arrives with the protocol's own messages): real servers over HTTP and gRPC, real ONNX Runtime
runs, the SDK's real exporter. Checked: the request span continues the caller's trace, its
phases and attributes, the span of the run that carried it and the links both ways, sampling,
and that with tracing off the tracing SDK is never loaded."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from batchserve.app import Server, build_server
from batchserve.config import BatchConfig, CacheConfig, RuntimeConfig, ServerConfig
from batchserve.flags import settings_from_args
from batchserve.http import REPOSITORY
from batchserve.settings import ServeSettings
from batchserve.tracing import Tracing, TracingConfig

from helpers import StartServerProcess, parse_with_env, wait_until
from otlp_receiver import OtlpReceiver, Span

CALLER_TRACE = "0af7651916cd43dd8448eb211c80319c"
CALLER_SPAN = "b7ad6b7169203331"
PHASES = ["decode", "queue", "inference", "encode"]


def traceparent(
    trace_id: str = CALLER_TRACE, span_id: str = CALLER_SPAN, sampled: bool = True
) -> str:
    return f"00-{trace_id}-{span_id}-{'01' if sampled else '00'}"


def v2_body(name: str, array: np.ndarray) -> dict[str, Any]:
    return {
        "inputs": [
            {"name": name, "datatype": "FP32", "shape": list(array.shape),
             "data": array.ravel().tolist()}
        ]
    }  # fmt: skip


def grpc_request(model: str, name: str, array: np.ndarray) -> Any:
    request = service_pb2.ModelInferRequest(model_name=model)
    request.inputs.add(name=name, datatype="FP32", shape=array.shape)
    request.raw_input_contents.append(np.ascontiguousarray(array, "<f4").tobytes())
    return request


MLP_X = np.full((2, 64), 0.25, np.float32)

Serve = Callable[..., Awaitable[Server]]


@pytest.fixture
async def receiver() -> AsyncIterator[OtlpReceiver]:
    async with OtlpReceiver() as started:
        yield started


@pytest.fixture
async def serve(receiver: OtlpReceiver) -> AsyncIterator[Serve]:
    """Start `build_server` on a model with tracing to the receiver (exports every 20 ms);
    closed (its last spans flushed) before the receiver stops."""
    servers: list[Server] = []

    async def start(
        model: Path, name: str, *, ratio: float = 1.0, batch: BatchConfig | None = None,
        cache: CacheConfig | None = None,
    ) -> Server:  # fmt: skip
        settings = ServeSettings(
            model=str(model), name=name, batch=batch or BatchConfig(),
            cache=cache or CacheConfig(), runtime=RuntimeConfig(instances=1),
            server=ServerConfig(host="127.0.0.1", port=0, grpc_port=0),
            tracing=TracingConfig(endpoint=receiver.url, sample_ratio=ratio,
                                  schedule_delay_ms=20),
        )  # fmt: skip
        server = build_server(settings)
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in reversed(servers):
        await server.aclose()


async def post(server: Server, model: str, body: dict[str, Any], **headers: str) -> int:
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{server.url}/v2/models/{model}/infer", json=body, headers=headers) as answer,
    ):
        await answer.read()
        return answer.status


async def grpc_infer(server: Server, request: Any, metadata: tuple[tuple[str, str], ...]) -> Any:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        return await stub.ModelInfer(request, metadata=metadata)


def request_span(trace_id: str, name: str = "infer mlp") -> Callable[[list[Span]], Span | None]:
    def found(spans: list[Span]) -> Span | None:
        return next((s for s in spans if s.name == name and s.trace_id == trace_id), None)

    return found


def children(spans: list[Span], parent: Span) -> dict[str, Span]:
    return {
        s.name: s
        for s in spans
        if s.parent_span_id == parent.span_id and s.trace_id == parent.trace_id
    }


def batch_of(spans: list[Span], request: Span) -> Span:
    """The run span the request span links to (exactly one), which links back to it."""
    (link,) = request.links
    (batch,) = [s for s in spans if s.span_id == link.span_id and s.trace_id == link.trace_id]
    assert (request.trace_id, request.span_id) in {(k.trace_id, k.span_id) for k in batch.links}
    return batch


async def whole_request(receiver: OtlpReceiver, trace_id: str, name: str = "infer mlp") -> Span:
    """The request span once it, its phases and its run's span have all arrived."""

    def complete(spans: list[Span]) -> Span | None:
        span = request_span(trace_id, name)(spans)
        if span is None or len(children(spans, span)) < len(PHASES):
            return None
        linked = {(k.trace_id, k.span_id) for k in span.links}
        return span if any((s.trace_id, s.span_id) in linked for s in spans) else None

    return await receiver.wait_for(complete, f"the request span of trace {trace_id}")


# -------------------------------------------------------------------------------- one request


async def test_an_http_request_continues_the_callers_trace_and_links_its_run(
    serve: Serve, receiver: OtlpReceiver, mlp_path: Path
) -> None:
    server = await serve(mlp_path, "mlp")
    status = await post(server, "mlp", v2_body("input", MLP_X), traceparent=traceparent())
    assert status == 200
    span = await whole_request(receiver, CALLER_TRACE)
    assert span.parent_span_id == CALLER_SPAN  # the caller's span is its parent
    assert span.kind == "SERVER"
    assert span.status == "UNSET"
    assert span.attributes == {
        "batchserve.protocol": "http", "batchserve.model": "mlp",
        "batchserve.model.version": "1", "batchserve.rows": 2, "batchserve.cache": "off",
        "batchserve.batch.rows": 2, "batchserve.status": 200, "http.response.status_code": 200,
    }  # fmt: skip
    assert span.resource["service.name"] == "batchserve"
    phases = children(receiver.spans, span)
    assert sorted(phases) == sorted(PHASES)
    decode, queue, inference, encode = (phases[name] for name in PHASES)
    # One after the other, inside the request's span.
    assert span.start_ns == decode.start_ns <= decode.end_ns <= queue.start_ns
    assert queue.start_ns <= queue.end_ns == inference.start_ns <= inference.end_ns
    assert inference.end_ns <= encode.start_ns <= encode.end_ns == span.end_ns
    batch = batch_of(receiver.spans, span)
    assert batch.name == "batch mlp"
    assert batch.trace_id != CALLER_TRACE
    assert batch.parent_span_id == ""
    assert batch.attributes == {
        "batchserve.model": "mlp", "batchserve.model.version": "1", "batchserve.batch.rows": 2,
        "batchserve.batch.requests": 1, "batchserve.session": 0,
    }  # fmt: skip
    # The request's inference phase is the run, to the nanosecond.
    assert (batch.start_ns, batch.end_ns) == (inference.start_ns, inference.end_ns)


async def test_a_grpc_request_continues_the_trace_in_its_metadata(
    serve: Serve, receiver: OtlpReceiver, mlp_path: Path
) -> None:
    server = await serve(mlp_path, "mlp")
    trace_id = "1" * 32
    metadata = (("traceparent", traceparent(trace_id)),)
    response = await grpc_infer(server, grpc_request("mlp", "input", MLP_X), metadata)
    assert response.model_name == "mlp"
    span = await whole_request(receiver, trace_id)
    assert span.parent_span_id == CALLER_SPAN
    assert span.kind == "SERVER"
    assert span.attributes["batchserve.protocol"] == "grpc"
    assert span.attributes["rpc.grpc.status_code"] == 0  # OK
    assert span.attributes["batchserve.status"] == 200
    assert "http.response.status_code" not in span.attributes
    assert sorted(children(receiver.spans, span)) == sorted(PHASES)
    assert batch_of(receiver.spans, span).attributes["batchserve.batch.rows"] == 2


async def test_each_request_of_a_stream_is_a_span_in_the_streams_trace(
    serve: Serve, receiver: OtlpReceiver, mlp_path: Path
) -> None:
    server = await serve(mlp_path, "mlp")
    trace_id = "c" * 32

    async def requests() -> AsyncIterator[Any]:
        for index in range(3):
            request = grpc_request("mlp", "input", MLP_X)
            request.id = f"r{index}"
            yield request

    metadata = (("traceparent", traceparent(trace_id)),)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        answers = [a async for a in stub.ModelStreamInfer(requests(), metadata=metadata)]
    assert sorted(a.infer_response.id for a in answers) == ["r0", "r1", "r2"]

    def three(spans: list[Span]) -> list[Span] | None:
        found = [s for s in spans if s.name == "infer mlp" and s.trace_id == trace_id]
        return found if len(found) == 3 else None

    spans = await receiver.wait_for(three, "three request spans")
    assert {s.parent_span_id for s in spans} == {CALLER_SPAN}
    assert {s.attributes["batchserve.protocol"] for s in spans} == {"grpc"}


async def test_a_request_without_traceparent_starts_a_trace(
    serve: Serve, receiver: OtlpReceiver, mlp_path: Path
) -> None:
    server = await serve(mlp_path, "mlp")
    assert await post(server, "mlp", v2_body("input", MLP_X)) == 200
    span = await receiver.wait_for(
        lambda spans: next((s for s in spans if s.name == "infer mlp"), None), "a request span"
    )
    assert span.parent_span_id == ""
    assert span.trace_id != CALLER_TRACE


async def test_failures_set_the_status_a_refusal_does_not(
    serve: Serve, receiver: OtlpReceiver, gather_path: Path
) -> None:
    server = await serve(gather_path, "gather")
    bad, unknown = "2" * 32, "3" * 32
    body = {"inputs": [{"name": "index", "datatype": "INT64", "shape": [1, 1], "data": [7]}]}
    assert await post(server, "gather", body, traceparent=traceparent(bad)) == 500
    assert await post(server, "nope", body, traceparent=traceparent(unknown)) == 404
    failed = await receiver.wait_for(request_span(bad, "infer gather"), "the failed request")
    assert failed.status == "ERROR"
    assert failed.attributes["http.response.status_code"] == 500
    run = await receiver.wait_for(
        lambda spans: next((s for s in spans if s.name == "batch gather"), None), "its run"
    )
    assert run.status == "ERROR"  # the run itself failed (index 7 is out of range)
    refused = await receiver.wait_for(request_span(unknown, "infer _unknown"), "the 404")
    assert refused.status == "UNSET"  # a client's mistake is not the server's error
    assert refused.attributes["http.response.status_code"] == 404
    assert not refused.links  # it never reached a run


async def test_a_cache_hit_has_no_run(serve: Serve, receiver: OtlpReceiver, mlp_path: Path) -> None:
    server = await serve(mlp_path, "mlp", cache=CacheConfig(size_mb=4))
    first, second = "4" * 32, "5" * 32
    assert await post(server, "mlp", v2_body("input", MLP_X), traceparent=traceparent(first)) == 200
    await whole_request(receiver, first)
    assert (
        await post(server, "mlp", v2_body("input", MLP_X), traceparent=traceparent(second)) == 200
    )
    hit = await receiver.wait_for(request_span(second), "the cache hit")
    assert hit.attributes["batchserve.cache"] == "hit"
    assert hit.attributes["batchserve.batch.rows"] == 0
    assert not hit.links
    assert sorted(children(receiver.spans, hit)) == ["decode", "encode"]
    miss = request_span(first)(receiver.spans)
    assert miss is not None
    assert miss.attributes["batchserve.cache"] == "miss"


# -------------------------------------------------------------------------------- batches


@pytest.mark.slow
async def test_every_request_span_a_run_carried_is_linked_to_it(
    serve: Serve, receiver: OtlpReceiver, slow_path: Path
) -> None:
    server = await serve(slow_path, "slow", batch=BatchConfig(max_batch_size=8192))
    repository = server.app[REPOSITORY]
    (engine,) = list(repository)
    # The only session busy for about a second with an untraced call, so the traced requests
    # queue behind it and leave together in the next run.
    busy = asyncio.create_task(engine.infer({"x": np.zeros((4096, 1024), np.float32)}))
    await wait_until(lambda: engine.statistics().batcher.in_flight_batches == 1, "the busy run")
    x = np.full((1, 1024), 0.5, np.float32)
    traces = ["6" * 32, "7" * 32, "8" * 32]
    answers = [
        asyncio.create_task(post(server, "slow", v2_body("x", x), traceparent=traceparent(t)))
        for t in traces[:2]
    ]
    metadata = (("traceparent", traceparent(traces[2])),)
    answers.append(asyncio.create_task(grpc_infer(server, grpc_request("slow", "x", x), metadata)))
    await wait_until(lambda: engine.statistics().batcher.queued_rows == 3, "three queued")
    await busy
    assert (await asyncio.gather(*answers))[:2] == [200, 200]
    spans = [await whole_request(receiver, t, "infer slow") for t in traces]
    batches = {batch_of(receiver.spans, span).span_id for span in spans}
    assert len(batches) == 1  # one run carried all three
    (run,) = [s for s in receiver.spans if s.name == "batch slow"]  # the busy run: no span
    assert run.attributes["batchserve.batch.rows"] == 3
    assert run.attributes["batchserve.batch.requests"] == 3
    assert {(k.trace_id, k.span_id) for k in run.links} == {(s.trace_id, s.span_id) for s in spans}
    for span in spans:
        assert span.attributes["batchserve.batch.rows"] == 3
        assert span.attributes["batchserve.rows"] == 1
        inference = children(receiver.spans, span)["inference"]
        assert (inference.start_ns, inference.end_ns) == (run.start_ns, run.end_ns)


# -------------------------------------------------------------------------------- sampling


async def test_ratio_zero_traces_only_what_a_sampled_caller_asks_for(
    serve: Serve, receiver: OtlpReceiver, mlp_path: Path
) -> None:
    server = await serve(mlp_path, "mlp", ratio=0.0)
    body = v2_body("input", MLP_X)
    unsampled = "9" * 32
    assert await post(server, "mlp", body) == 200  # no parent: the ratio says no
    # A caller that decided not to sample: parent-based, so not sampled here either.
    assert await post(server, "mlp", body, traceparent=traceparent(unsampled, sampled=False)) == 200
    assert await post(server, "mlp", body, traceparent=traceparent()) == 200  # sampled: traced
    span = await whole_request(receiver, CALLER_TRACE)
    run = batch_of(receiver.spans, span)
    # Spans end, and are exported, in order: the earlier requests would have come first.
    assert {s.trace_id for s in receiver.spans} == {CALLER_TRACE, run.trace_id}
    assert len(receiver.named("infer mlp")) == 1
    assert len(receiver.named("batch mlp")) == 1


async def test_ratio_one_traces_unsampled_callers_as_they_asked_not_to(
    serve: Serve, receiver: OtlpReceiver, mlp_path: Path
) -> None:
    server = await serve(mlp_path, "mlp", ratio=1.0)
    body = v2_body("input", MLP_X)
    unsampled = "a" * 32
    assert await post(server, "mlp", body, traceparent=traceparent(unsampled, sampled=False)) == 200
    assert await post(server, "mlp", body) == 200
    await receiver.wait_for(lambda spans: receiver.named("infer mlp"), "the unparented request")
    await receiver.wait_for(lambda spans: receiver.named("batch mlp"), "its run")
    assert unsampled not in {s.trace_id for s in receiver.spans}


@pytest.mark.parametrize(
    ("header", "sampled"),
    [
        (None, None),
        ("00-" + "1" * 32 + "-" + "2" * 16 + "-01", True),
        ("00-" + "1" * 32 + "-" + "2" * 16 + "-00", False),
        ("00-" + "1" * 32 + "-" + "2" * 16 + "-03", True),  # other flags beside sampled
        ("  00-" + "1" * 32 + "-" + "2" * 16 + "-01\t", True),
        ("01-" + "1" * 32 + "-" + "2" * 16 + "-01-future", True),  # a later version's fields
        ("00-" + "1" * 32 + "-" + "2" * 16 + "-01-more", None),  # version 00 has four
        ("ff-" + "1" * 32 + "-" + "2" * 16 + "-01", None),
        ("00-" + "0" * 32 + "-" + "2" * 16 + "-01", None),
        ("00-" + "1" * 32 + "-" + "0" * 16 + "-01", None),
        ("00-" + "A" * 32 + "-" + "2" * 16 + "-01", None),  # uppercase hex is not valid
        ("00-" + "1" * 31 + "-" + "2" * 16 + "-01", None),
        ("garbage", None),
    ],
)
def test_the_sampling_decision_reads_the_traceparent_as_the_propagator_does(
    header: str | None, sampled: bool | None
) -> None:
    # Requests the SDK is never asked about must be exactly the ones it would drop.
    from opentelemetry.trace import get_current_span
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    from batchserve.tracing import _parent_sampled

    assert _parent_sampled(header) is sampled
    carrier = {} if header is None else {"traceparent": header}
    context = get_current_span(TraceContextTextMapPropagator().extract(carrier)).get_span_context()
    assert context.is_valid is (sampled is not None)
    if sampled is not None:
        assert context.trace_flags.sampled is sampled


# -------------------------------------------------------------------------------- lifecycle


@pytest.mark.slow
async def test_the_cli_honours_the_sdk_variables_and_flushes_on_shutdown(
    receiver: OtlpReceiver, serve_process: StartServerProcess, mlp_path: Path
) -> None:
    # An export interval of an hour: only the flush at shutdown can deliver the spans.
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
        "OTEL_BSP_SCHEDULE_DELAY": "3600000",
        "OTEL_SERVICE_NAME": "scorer",
    }
    server = await asyncio.to_thread(serve_process, str(mlp_path), "--name", "mlp", env=env)
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{server.url}/v2/models/mlp/infer", json=v2_body("input", MLP_X),
                     headers={"traceparent": traceparent()}) as answer,
    ):  # fmt: skip
        assert answer.status == 200
    assert not receiver.spans
    # The process's exporter posts to this loop's receiver as it drains: wait off the loop.
    assert await asyncio.to_thread(server.stop) == 0
    span = await whole_request(receiver, CALLER_TRACE)
    assert span.resource["service.name"] == "scorer"


async def test_tracing_off_never_loads_the_tracing_sdk(mlp_path: Path) -> None:
    # A fresh interpreter serves a request that carries a traceparent, tracing off. (redis-py
    # imports OpenTelemetry's metrics API when it is installed: the tracing SDK must stay out.)
    code = textwrap.dedent(
        f"""
        import asyncio, sys, aiohttp
        from batchserve.app import build_server
        from batchserve.config import ServerConfig
        from batchserve.settings import ServeSettings

        async def main():
            settings = ServeSettings(model={str(mlp_path)!r}, name="mlp",
                                     server=ServerConfig(port=0, grpc_port=0))
            async with build_server(settings) as server, aiohttp.ClientSession() as session:
                body = {v2_body("input", MLP_X)!r}
                headers = {{"traceparent": {traceparent()!r}}}
                url = server.url + "/v2/models/mlp/infer"
                async with session.post(url, json=body, headers=headers) as answer:
                    assert answer.status == 200, answer.status
            loaded = [m for m in sys.modules if m.startswith(
                ("opentelemetry.sdk.trace", "opentelemetry.exporter",
                 "opentelemetry.trace.propagation.tracecontext"))]
            assert not loaded, loaded

        asyncio.run(main())
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    await asyncio.to_thread(
        subprocess.run, [sys.executable, "-c", code], check=True, timeout=120, env=env
    )


async def test_a_server_without_tracing_holds_no_tracer(mlp_path: Path) -> None:
    server = build_server(ServeSettings(model=str(mlp_path)))
    assert server.tracing is None
    assert all(engine.tracing is None for engine in server.app[REPOSITORY])


# -------------------------------------------------------------------------------- settings


def test_the_flags_and_the_sdk_variables_turn_tracing_on(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_SDK_DISABLED",
    ):
        monkeypatch.delenv(name, raising=False)
    off = settings_from_args(parse_with_env(monkeypatch, {})).tracing
    assert off == TracingConfig()
    assert not off.enabled
    flags = {
        "BATCHSERVE_OTEL_ENDPOINT": "http://collector:4318/",
        "BATCHSERVE_OTEL_SAMPLE_RATIO": "0.01",
    }
    on = settings_from_args(parse_with_env(monkeypatch, flags)).tracing
    assert on.enabled
    assert on.sample_ratio == 0.01
    assert on.traces_url == "http://collector:4318/v1/traces"
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318")
    by_sdk = settings_from_args(parse_with_env(monkeypatch, {})).tracing
    assert by_sdk.enabled
    assert by_sdk.endpoint is None
    assert by_sdk.traces_url is None
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert not settings_from_args(parse_with_env(monkeypatch, {})).tracing.enabled


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"endpoint": "http://c:4318", "sample_ratio": 1.5}, "sample_ratio must be in"),
        ({"endpoint": "http://c:4318", "sample_ratio": -0.1}, "sample_ratio must be in"),
        ({"endpoint": "collector:4318"}, "must be an http:// or https:// URL"),
        ({"endpoint": "http://c:4318", "service_name": ""}, "service_name"),
        ({"endpoint": "http://c:4318", "schedule_delay_ms": 0}, "schedule_delay_ms"),
    ],
)
def test_a_bad_tracing_config_is_refused(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TracingConfig(**fields)


def test_no_tracer_is_built_for_tracing_off() -> None:
    with pytest.raises(ValueError, match="tracing is off"):
        Tracing(TracingConfig())


def test_the_cli_says_in_one_line_when_the_otel_extra_is_missing(mlp_path: Path) -> None:
    # The exporter made unimportable, as in an install without batchserve[otel].
    code = (
        "import sys; sys.modules['opentelemetry.exporter.otlp.proto.http'] = None; "
        "from batchserve.cli import main; "
        f"sys.exit(main(['serve', {str(mlp_path)!r}, '--otel-endpoint', 'http://c:4318']))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "batchserve: error: tracing needs the OpenTelemetry SDK and its OTLP exporter: "
        "pip install 'batchserve[otel]'"
    )
