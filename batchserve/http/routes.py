"""V2 REST endpoints (health, metadata, infer) on aiohttp."""

from __future__ import annotations

import logging
from typing import Any

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler

from batchserve import __version__
from batchserve.errors import BatchserveError, InvalidInput, NotReady, PayloadTooLarge
from batchserve.protocol import HEADER_LENGTH, decode_request, encode_response
from batchserve.repository import ModelRepository

log = logging.getLogger("batchserve.http")


class ServerState:
    """Whether the front door is open; turned false first when the server drains."""

    __slots__ = ("accepting", "max_body_bytes")

    def __init__(self, max_body_bytes: int) -> None:
        self.accepting = False
        self.max_body_bytes = max_body_bytes


REPOSITORY = web.AppKey("repository", ModelRepository)
STATE = web.AppKey("state", ServerState)

_JSON = "application/json"


def json_response(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type=_JSON)


def error_response(status: int, message: str) -> web.Response:
    return json_response({"error": message}, status)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure leaves as `{"error": ...}` with its status; never a traceback."""
    try:
        return await handler(request)
    except BatchserveError as err:
        return error_response(err.status, err.message)
    except web.HTTPException as err:
        if err.status < 400:
            raise
        message = err.text if err.text and not err.text.startswith(str(err.status)) else err.reason
        return error_response(err.status, message)
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(500, "internal server error")


async def server_metadata(request: web.Request) -> web.Response:
    return json_response(
        {"name": "batchserve", "version": __version__, "extensions": ["binary_tensor_data"]}
    )


async def live(request: web.Request) -> web.Response:
    return json_response({"live": True})


async def ready(request: web.Request) -> web.Response:
    is_ready = request.app[STATE].accepting and request.app[REPOSITORY].ready
    return json_response({"ready": is_ready}, 200 if is_ready else 503)


async def model_metadata(request: web.Request) -> web.Response:
    engine = request.app[REPOSITORY].get(
        request.match_info["name"], request.match_info.get("version")
    )
    metadata = engine.metadata
    return json_response(
        {
            "name": engine.name,
            "versions": [engine.version],
            "platform": "onnxruntime_onnx",
            "inputs": [t.as_dict() for t in metadata.inputs],
            "outputs": [t.as_dict() for t in metadata.outputs],
        }
    )


async def model_ready(request: web.Request) -> web.Response:
    engine = request.app[REPOSITORY].get(
        request.match_info["name"], request.match_info.get("version")
    )
    is_ready = engine.ready and request.app[STATE].accepting
    return json_response({"name": engine.name, "ready": is_ready}, 200 if is_ready else 503)


async def infer(request: web.Request) -> web.Response:
    app = request.app
    state = app[STATE]
    engine = app[REPOSITORY].get(request.match_info["name"], request.match_info.get("version"))
    if not state.accepting:
        raise NotReady("the server is shutting down")
    length = request.content_length
    if length is not None and length > state.max_body_bytes:
        raise PayloadTooLarge(f"request body of {length} bytes exceeds {state.max_body_bytes}")
    body = await request.read()
    decoded = decode_request(body, _header_length(request))
    results = await engine.infer(decoded.inputs, decoded.outputs)
    payload, header_length = encode_response(engine.name, engine.version, decoded, results)
    if header_length is None:
        return web.Response(body=payload, content_type=_JSON)
    return web.Response(
        body=payload,
        headers={HEADER_LENGTH: str(header_length)},
        content_type="application/octet-stream",
    )


def _header_length(request: web.Request) -> int | None:
    value = request.headers.get(HEADER_LENGTH)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise InvalidInput(f"{HEADER_LENGTH} must be an integer, got {value!r}") from None


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v2", server_metadata)
    app.router.add_get("/v2/health/live", live)
    app.router.add_get("/v2/health/ready", ready)
    for prefix in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        app.router.add_get(prefix, model_metadata)
        app.router.add_get(prefix + "/ready", model_ready)
        app.router.add_post(prefix + "/infer", infer)
