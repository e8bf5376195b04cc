"""V2 REST endpoints (health, metadata, infer) on aiohttp."""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import time
from dataclasses import asdict
from typing import Any

import orjson
from aiohttp import web
from aiohttp.helpers import rfc822_formatted_time
from aiohttp.http import SERVER_SOFTWARE
from aiohttp.http_parser import RawRequestMessage
from aiohttp.typedefs import Handler
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from batchserve import __version__
from batchserve.cache import CacheStatistics
from batchserve.call import Call, Result, remaining_s, request_priority, request_timeout_s
from batchserve.engine import Engine
from batchserve.errors import (
    BatchserveError,
    BodyTimeout,
    InvalidInput,
    NotReady,
    Overloaded,
    PayloadTooLarge,
)
from batchserve.front import ServerState
from batchserve.front.lag import LoopLag
from batchserve.front.stats import UNKNOWN_MODEL
from batchserve.front.turns import BIG_BODY_BYTES
from batchserve.http.bodies import (
    UnsupportedContentEncoding,
    check_content_encoding,
    client_error,
    expect_handler,
)
from batchserve.protocol import (
    HEADER_LENGTH,
    InferRequest,
    decode_request,
    encode_response,
)
from batchserve.protocol.triton import EXTENSIONS, model_config, statistics_entry
from batchserve.repository import ModelRepository
from batchserve.tracing import CLIENT_GONE

log = logging.getLogger("batchserve.http")


def authorize(state: ServerState, request: web.Request) -> None:
    """Bearer-token check (constant-time) when an API key is configured."""
    if state.api_key is not None:
        state.check_credentials(request.headers.get("Authorization", ""))


REPOSITORY = web.AppKey("repository", ModelRepository)
METRICS = web.AppKey("metrics", CollectorRegistry)
STATE = web.AppKey("state", ServerState)

_JSON = "application/json"
# The share of the deadline a request let through the connection gate may expect to use: the
# time an answer takes from there is measured, not estimated, so the margin is small.
GATE_HEADROOM = 0.9
# The infer routes' paths, as `add_routes` declares them; percent-escapes are left to the router.
_INFER_PATH = re.compile(r"/v2/models/(?P<name>[^/?#%]+)(?:/versions/(?P<version>[^/?#%]+))?/infer")


def json_response(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type=_JSON)


def error_response(status: int, message: str) -> web.Response:
    return json_response({"error": message}, status)


def to_response(request: web.Request, err: BaseException) -> web.Response:
    """The one mapping from an exception to an HTTP answer: `{"error": ...}`, never a traceback."""
    err = client_error(err) or err
    if isinstance(err, BatchserveError):
        response = error_response(err.status, err.message)
        if isinstance(err, UnsupportedContentEncoding):
            response.headers.update(err.headers)
        if err.status in (429, 503):
            # Shed load tells clients when to come back instead of letting them hammer.
            response.headers["Retry-After"] = "1"
        if err.status == 401:
            response.headers["WWW-Authenticate"] = 'Bearer realm="batchserve"'
        return response
    if isinstance(err, web.HTTPException) and err.status >= 400:
        text = err.text or ""
        return error_response(err.status, err.reason if text.startswith(str(err.status)) else text)
    log.error("unhandled error on %s %s", request.method, request.path, exc_info=err)
    return error_response(500, "internal server error")


def guarded(handler: Handler, *, protected: bool = True) -> Handler:
    """Route errors of a handler through `to_response` (a middleware costs more per request);
    `protected` endpoints need the API key when one is configured."""

    @functools.wraps(handler)
    async def wrapper(request: web.Request) -> web.StreamResponse:
        try:
            if protected:
                authorize(request.app[STATE], request)
            check_content_encoding(request.headers)
            return await handler(request)
        except Exception as err:
            return to_response(request, err)

    return wrapper


def _engine(request: web.Request) -> Engine:
    """The engine a `/v2/models/{name}[/versions/{version}]/...` path names, or 404."""
    match = request.match_info
    return request.app[REPOSITORY].get(match["name"], match.get("version"), request.headers)


async def server_metadata(request: web.Request) -> web.Response:
    return json_response(
        {"name": "batchserve", "version": __version__, "extensions": list(EXTENSIONS)}
    )


async def live(request: web.Request) -> web.Response:
    # Answering at all shows the event loop turns; a wedged or lost session pool needs a restart.
    for engine in request.app[REPOSITORY]:
        problem = engine.problem()
        if problem is not None:
            return json_response({"live": False, "error": f"model {engine.name!r}: {problem}"}, 503)
    return json_response({"live": True})


async def ready(request: web.Request) -> web.Response:
    is_ready = request.app[STATE].accepting and request.app[REPOSITORY].ready
    return json_response({"ready": is_ready}, 200 if is_ready else 503)


async def model_metadata(request: web.Request) -> web.Response:
    engine = _engine(request)
    metadata = engine.metadata
    named = request.match_info.get("version")
    versions = [named] if named else request.app[REPOSITORY].versions(engine.name)
    return json_response(
        {
            "name": engine.name,
            "versions": versions,
            "platform": "onnxruntime_onnx",
            "inputs": [t.as_dict() for t in metadata.inputs],
            "outputs": [t.as_dict() for t in metadata.outputs],
        }
    )


async def model_ready(request: web.Request) -> web.Response:
    engine = _engine(request)
    is_ready = engine.ready and request.app[STATE].accepting
    return json_response({"name": engine.name, "ready": is_ready}, 200 if is_ready else 503)


class InferEndpoint:
    """`POST .../infer`: the hot path, so it holds its collaborators instead of looking them up."""

    __slots__ = ("_repository", "_state")

    def __init__(self, repository: ModelRepository, state: ServerState) -> None:
        self._repository = repository
        self._state = state

    def admit(
        self, request: web.Request, waited_s: float | None = None, *, deadline: bool = True
    ) -> Engine:
        """The checks the headers allow, made before the body is read (and before `100
        Continue` when the client waits for one): a refusal costs far less than an answer.
        `waited_s`: how long the request has waited since it reached the server. `deadline`
        False: its deadline was checked already (by the connection gate's screen)."""
        state = self._state
        match = request.match_info
        if state.api_key is not None:  # before the lookup: no probing names without a key
            authorize(state, request)
        engine = self._repository.get(match["name"], match.get("version"), request.headers)
        # Shed before reading the body: a refusal must cost far less than an answer.
        state.admit(
            engine,
            state.timeout_s if deadline else None,
            state.lag.smoothed_s if waited_s is None else waited_s,
        )
        length = request.content_length
        if length is not None and length > state.max_body_bytes:
            raise PayloadTooLarge(f"request body of {length} bytes exceeds {state.max_body_bytes}")
        check_content_encoding(request.headers)
        return engine

    def screen(self, message: RawRequestMessage, waited_s: float, answer_s: float) -> bytes | bool:
        """A request the connection gate held in line, now let through: its refusal, as the
        whole HTTP answer, when the time it has waited (`waited_s`, plus the loop's lag for its
        time unread in the socket) and the time an answer takes from here lately (`answer_s`)
        together pass its deadline; else True, and its handler takes it without judging the
        deadline again; False for a request that is not the screen's to judge. A refusal is
        counted, logged and traced as a handler's would be, without a request object, a task,
        an exception or a response object. Only an infer request by a plain path with the key
        it needs is judged: anything else (a 401, a 404) is the handler's to answer."""
        state = self._state
        timeout_s = state.timeout_s
        if timeout_s is None:
            return False
        found = _INFER_PATH.fullmatch(message.path)
        if found is None:
            return False
        started = time.perf_counter()
        headers = message.headers
        try:
            if state.api_key is not None:
                state.check_credentials(headers.get("Authorization", ""))
            engine = self._repository.get(found["name"], found["version"], headers)
        except Exception:
            return False
        read_s = waited_s  # measured since its first bytes were read: its recorded duration
        waited_s += state.lag.smoothed_s
        if waited_s + answer_s <= GATE_HEADROOM * timeout_s:
            return True
        engine.count_refusal()
        message_text = (
            f"waited {waited_s * 1000:.0f} ms in line; with the {answer_s * 1000:.0f} ms an answer "
            f"takes now, past the request's deadline ({timeout_s * 1000:g} ms)"
        )
        tracer = state.tracer
        trace = None if tracer is None else tracer.request(headers, "http")
        body = orjson.dumps({"error": message_text})
        length = headers.get("Content-Length", "")
        received = int(length) if length.isdigit() else 0
        request_id = headers.get("X-Request-ID") or state.request_ids.next()
        status = Overloaded.status
        answer = (
            f"HTTP/1.1 429 Too Many Requests\r\nContent-Type: {_JSON}\r\nRetry-After: 1\r\n"
            f"X-Request-ID: {request_id}\r\nDate: {rfc822_formatted_time()}\r\n"
            f"Server: {SERVER_SOFTWARE}\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode("utf-8", "surrogateescape") + body
        elapsed = time.perf_counter() - started + read_s
        state.requests.record(engine.name, status, elapsed, received, len(body))
        if state.access_log.enabled:
            state.access_log.record_call(
                request_id, headers.get("traceparent"), engine.name, status,
                elapsed, None, received, len(body), "http",
            )  # fmt: skip
        if trace is not None:
            trace.end(engine.name, status, None)
        return answer

    async def handle(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        state = self._state
        stats = state.requests
        stats.in_flight += 1
        model, received = UNKNOWN_MODEL, 0
        served: Result | None = None
        decoded: InferRequest | None  # None: a raw payload for the model's handler
        match = request.match_info
        # The duration recorded runs from when its first bytes were read, not from here: under
        # load a request waits before its handler runs, and a latency that hid that would too.
        waited, before_handler = _waited(request, state.lag)
        # Let through the connection gate by its screen a moment ago: judged against its
        # deadline once, there (a second look here, a few loop turns later, would refuse some
        # of what the screen let through, at a handler's cost).
        screened = _screened(request)
        tracer = state.tracer  # None: tracing is off, and nothing below does any
        trace = None if tracer is None else tracer.request(request.headers, "http")
        # Errors are mapped here rather than by `guarded`: one coroutine less per request.
        try:
            engine = self.admit(request, waited, deadline=not screened)
            model = engine.name
            if request.content.is_eof():
                body = await request.read()  # already here: no timer needed
            else:
                body = await _read_slow_body(request, state.body_timeout_s)
            received = len(body)
            if engine.retired:  # unloaded or replaced while the body arrived: route again
                engine = self._repository.get(match["name"], match.get("version"), request.headers)
            if engine.pipeline is None:  # every body is a V2 request: the hot path, inline
                if received < BIG_BODY_BYTES:
                    decoded = _decode(request, body, state)
                else:  # one per loop iteration, so the loop stays on time (front/turns.py)
                    async with state.decode_turns:
                        decoded = _decode(request, body, state)
                parameters = decoded.parameters
                timeout_s = (
                    request_timeout_s(parameters, state.timeout_s)
                    if parameters
                    else state.timeout_s
                )
                call = Call(
                    decoded.inputs, decoded.outputs, cache=_cache_allowed(request, parameters),
                    timeout_s=remaining_s(timeout_s, waited),
                    max_output_bytes=state.max_response_bytes,
                    priority=request_priority(parameters) if parameters else 0,
                )  # fmt: skip
            elif received < BIG_BODY_BYTES:
                call, decoded = _handler_model_call(engine, request, body, state, waited)
            else:
                async with state.decode_turns:
                    call, decoded = _handler_model_call(engine, request, body, state, waited)
            if trace is not None:
                trace.decoded(call, engine.version)
            served = engine.call(call)  # kept: a failed call still says how far it got
            result = await served
            if trace is not None:
                trace.answered()
            response = _respond(engine, decoded, result, state.max_response_bytes)
        except asyncio.CancelledError:
            if _cancelled_by_caller():
                if trace is not None:
                    trace.end(model, CLIENT_GONE, served)
                raise  # the client went away or the server stops: nobody to answer
            # Cancelled from inside (the handler executor of an engine being retired shut
            # down under it): the client still gets an answer it can retry on.
            response = to_response(request, NotReady("the model version is being unloaded"))
        except Exception as err:
            response = to_response(request, err)
            name = match.get("name")
            if model is UNKNOWN_MODEL and name and self._repository.knows(name):
                model = name  # a known model that refused (not ready, no key): count it there
        finally:
            stats.in_flight -= 1
        elapsed = time.perf_counter() - started + before_handler
        sent = len(response.body) if isinstance(response.body, bytes) else 0
        stats.record(model, response.status, elapsed, received, sent)
        request_id = request.headers.get("X-Request-ID") or state.request_ids.next()
        response.headers["X-Request-ID"] = request_id
        if state.access_log.enabled:
            state.access_log.record_call(
                request_id, request.headers.get("traceparent"), model, response.status,
                elapsed, served, received, sent, "http",
            )  # fmt: skip
        if trace is not None:
            trace.end(model, response.status, served)
        return response


def _cancelled_by_caller() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _handler_model_call(
    engine: Engine, request: web.Request, body: bytes, state: ServerState, waited_s: float
) -> tuple[Call, InferRequest | None]:
    """The call for a model with a handler, and the V2 request it was decoded from (None for a
    raw payload: the body as it is, when the handler takes its Content-Type). Its deadline,
    as for any model, counts the `waited_s` before the handler ran."""
    content_type = request.headers.get("Content-Type")
    if engine.takes_raw(content_type):
        call = Call(
            body=body, content_type=content_type, parameters=request.query,
            headers=request.headers, cache=_cache_allowed(request, None),
            timeout_s=remaining_s(state.timeout_s, waited_s),
            max_output_bytes=state.max_response_bytes,
        )  # fmt: skip
        return call, None
    decoded = _decode(request, body, state, raw_bytes=engine.raw_bytes)
    parameters = decoded.parameters
    call = Call(
        decoded.inputs, decoded.outputs, parameters=parameters, headers=request.headers,
        cache=_cache_allowed(request, parameters),
        timeout_s=remaining_s(request_timeout_s(parameters, state.timeout_s), waited_s),
        max_output_bytes=state.max_response_bytes, priority=request_priority(parameters),
    )  # fmt: skip
    return call, decoded


def _respond(
    engine: Engine, decoded: InferRequest | None, result: Result, max_bytes: int
) -> web.Response:
    """A V2 inference response: JSON, or JSON header + binary outputs when asked for; 413
    over `max_bytes`. To a raw payload (`decoded` None): the handler's JSON answer."""
    if decoded is None:
        return web.Response(body=result.answer, content_type=_JSON)
    payload, header_length = encode_response(
        engine.name, engine.version, decoded, result.outputs, max_bytes=max_bytes
    )
    if header_length is None:
        return web.Response(body=payload, content_type=_JSON)
    return web.Response(
        body=payload,
        headers={HEADER_LENGTH: str(header_length)},
        content_type="application/octet-stream",
    )


async def _read_slow_body(request: web.Request, timeout_s: float) -> bytes:
    try:
        async with asyncio.timeout(timeout_s):
            return await request.read()
    except TimeoutError:
        raise BodyTimeout(f"the request body did not arrive within {timeout_s:g} s") from None


def _waited(request: web.Request, lag: LoopLag) -> tuple[float, float]:
    """How long ago the client sent the request, as far as the server can tell: since its
    first bytes were read (the wait behind the loop's backlog, or in the connection gate's
    line), plus the loop's smoothed lag for the time they sat unread in the socket before
    that; and the measured part alone (since the first bytes were read: 0 when not known)."""
    protocol = request.protocol
    arrived = getattr(protocol, "arrived_at", 0.0)
    if not arrived:
        return lag.smoothed_s, 0.0
    setattr(protocol, "arrived_at", 0.0)  # noqa: B010 (taken: the next request is timed afresh)
    read = max(0.0, time.monotonic() - arrived)
    return read + lag.smoothed_s, read


def _screened(request: web.Request) -> bool:
    protocol = request.protocol
    if not getattr(protocol, "screened", False):
        return False
    setattr(protocol, "screened", False)  # noqa: B010 (taken: the next request is its own)
    return True


def _cache_allowed(request: web.Request, parameters: dict[str, Any] | None) -> bool:
    if parameters and parameters.get("cache") is False:
        return False
    control = request.headers.get("Cache-Control")
    return not (control and ("no-cache" in control or "no-store" in control))


def _decode(
    request: web.Request, body: bytes, state: ServerState, *, raw_bytes: bool = False
) -> InferRequest:
    header_length = _header_length(request)
    json_length = len(body) if header_length is None else header_length
    if state.max_json_bytes < json_length <= len(body):  # a length past the body: 400 below
        raise PayloadTooLarge(
            f"the request's JSON is {json_length} bytes, over the limit of {state.max_json_bytes}; "
            "send large tensors with the binary tensor extension"
        )
    return decode_request(body, header_length, state.limits, raw_bytes=raw_bytes)


def _header_length(request: web.Request) -> int | None:
    value = request.headers.get(HEADER_LENGTH)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise InvalidInput(f"{HEADER_LENGTH} must be an integer, got {value!r}") from None


async def model_configuration(request: web.Request) -> web.Response:
    """`.../config`: Triton's model configuration, which Triton's tools read first."""
    engine = _engine(request)
    versions = request.app[REPOSITORY].versions(engine.name)
    return json_response(model_config(engine, versions=versions))


async def model_statistics(request: web.Request) -> web.Response:
    """`.../stats`: one entry for the named version; without one, for every version served,
    the latest first (the one requests naming no version go to, unless traffic is split)."""
    match = request.match_info
    name, version = match["name"], match.get("version")
    repository = request.app[REPOSITORY]
    if version is None:
        versions = repository.versions(name)[::-1]
        engines = [repository.get(name, v) for v in versions] or [repository.get(name)]
    else:
        engines = [repository.get(name, version)]
    return json_response({"model_stats": [_statistics(engine) for engine in engines]})


async def all_model_statistics(request: web.Request) -> web.Response:
    """`GET /v2/models/stats`: every loaded model version."""
    entries = []
    for engine in request.app[REPOSITORY]:
        try:
            entries.append(_statistics(engine))
        except NotReady:  # loading, or closing: Triton too lists loaded versions only
            continue
    return json_response({"model_stats": entries})


def _statistics(engine: Engine) -> dict[str, Any]:
    """Triton's statistics of one version (what perf_analyzer and tritonclient read), with
    batchserve's own counters beside them."""
    stats = engine.statistics()
    batcher = stats.batcher
    entry = statistics_entry(engine.name, engine.version, stats)
    for runs in entry["batch_stats"]:
        runs["execution_count"] = runs["compute_infer"]["count"]
    entry.update(
        request_count=batcher.requests,
        rejected_count=batcher.rejected,
        cancelled_count=batcher.cancelled,
        failed_count=batcher.failed,
        queued_rows=batcher.queued_rows,
        queue_wait_ns=int(batcher.queue_wait_s * 1e9),
        mean_batch_rows=batcher.rows / batcher.batches if batcher.batches else 0.0,
        sessions=stats.pool.instances,
        load_seconds=stats.load_seconds,
        cache=_cache_statistics(stats.cache),
    )
    return entry


def _cache_statistics(cache: CacheStatistics | None) -> dict[str, Any] | None:
    if cache is None:
        return None
    return {
        "local": asdict(cache.local),
        "redis": asdict(cache.redis) if cache.redis is not None else None,
        "coalesced": cache.coalesced,
    }


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[METRICS])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def repository_index(request: web.Request) -> web.Response:
    """V2 repository extension: every model version the server knows and its state."""
    rows = request.app[REPOSITORY].index()
    if request.can_read_body:
        body = _json_object(await request.read())
        if body.get("ready") is True:
            rows = [row for row in rows if row["state"] == "READY"]
    return json_response(rows)


async def repository_load(request: web.Request) -> web.Response:
    if request.can_read_body:
        _json_object(await request.read())  # Triton's optional parameters: accepted, unused
    await request.app[REPOSITORY].load(request.match_info["name"])
    return json_response({})


async def repository_unload(request: web.Request) -> web.Response:
    if request.can_read_body:
        _json_object(await request.read())
    await request.app[REPOSITORY].unload(request.match_info["name"])
    return json_response({})


def _json_object(body: bytes) -> dict[str, Any]:
    if not body.strip():
        return {}
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as err:
        raise InvalidInput(f"malformed JSON: {err}") from None
    if not isinstance(value, dict):
        raise InvalidInput("the request body must be a JSON object")
    return value


async def no_route(request: web.Request) -> web.Response:
    # A known path asked with another method is 405 with `Allow`, as HTTP says; the rest 404.
    allowed: set[str] = set()
    for resource in request.app.router.resources():
        if resource.canonical != _CATCH_ALL:
            match, methods = await resource.resolve(request)
            if match is None:
                allowed |= methods
    allowed.discard("*")
    if allowed:
        response = error_response(
            405,
            f"{request.method} is not allowed on {request.path}; use {', '.join(sorted(allowed))}",
        )
        response.headers["Allow"] = ", ".join(sorted(allowed))
        return response
    return error_response(404, f"no endpoint {request.method} {request.path}")


_CATCH_ALL = "/{tail}"


def _body_precheck(request: web.Request) -> None:
    state = request.app[STATE]
    authorize(state, request)
    length = request.content_length
    if length is not None and length > state.max_body_bytes:
        raise PayloadTooLarge(f"request body of {length} bytes exceeds {state.max_body_bytes}")
    check_content_encoding(request.headers)


def add_routes(app: web.Application) -> None:
    endpoint = InferEndpoint(app[REPOSITORY], app[STATE])
    infer = endpoint.handle
    # `Expect: 100-continue` is answered after the checks the headers allow.
    infer_expect = expect_handler(endpoint.admit, to_response)
    body_expect = expect_handler(_body_precheck, to_response)
    # The infer routes first: aiohttp tries the routes under one path prefix in the order they
    # were added, and every infer request would otherwise be matched against the four model
    # routes before it (no other route's path ends in /infer, so the order changes no answer).
    for prefix in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        app.router.add_post(prefix + "/infer", infer, expect_handler=infer_expect)
    get = app.router.add_get
    get("/v2", guarded(server_metadata))
    # Probes must work without credentials; metrics too unless the operator says otherwise.
    get("/v2/health/live", guarded(live, protected=False))
    get("/v2/health/ready", guarded(ready, protected=False))
    get("/metrics", guarded(metrics, protected=not app[STATE].metrics_public))
    # Before the model routes, which would take `stats` for a model's name.
    get("/v2/models/stats", guarded(all_model_statistics))
    for prefix in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        get(prefix, guarded(model_metadata))
        get(prefix + "/ready", guarded(model_ready))
        get(prefix + "/config", guarded(model_configuration))
        get(prefix + "/stats", guarded(model_statistics))
    post = functools.partial(app.router.add_post, expect_handler=body_expect)
    post("/v2/repository/index", guarded(repository_index))
    post("/v2/repository/models/{name}/load", guarded(repository_load))
    post("/v2/repository/models/{name}/unload", guarded(repository_unload))
    # Last, so unknown paths and methods answer in JSON like every other error.
    app.router.add_route("*", "/{tail:.*}", no_route)
