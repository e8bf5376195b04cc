"""ModelInfer, and each request of ModelStreamInfer: the gRPC twin of HTTP's `InferEndpoint`.

Everything below the protocol is HTTP's own: the repository lookup, the front door's checks
(`ServerState.check_credentials`, `ServerState.admit`: draining, the engine's admission,
a late event loop), the deadline (`request_timeout_s`, `remaining_s`), and `Engine.call`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any

from multidict import CIMultiDict

from batchserve.call import Call, Result, remaining_s, request_priority, request_timeout_s
from batchserve.engine import Engine
from batchserve.front import ServerState
from batchserve.front.stats import UNKNOWN_MODEL, RequestStatistics
from batchserve.repository import ModelRepository
from batchserve.rpc.convert import decode_inputs, infer_response, parameters, requested_outputs
from batchserve.rpc.errors import Code, Refusal, refusal
from batchserve.tracing import CLIENT_GONE

Metadata = Mapping[str, str]

_UNLOADING = Refusal(503, "the model version is being unloaded")


def call_metadata(context: Any) -> Metadata:
    """A call's text metadata, looked up without regard to case as HTTP headers are (a
    model's traffic split names its sticky header as it likes); binary (`-bin`) entries are
    left out."""
    pairs = context.invocation_metadata() or ()
    return CIMultiDict([(key, value) for key, value in pairs if type(value) is str])


class InferCalls:
    """Serves one ModelInferRequest: the hot path, so it holds its collaborators."""

    __slots__ = ("_repository", "_requests", "_state")

    def __init__(
        self, repository: ModelRepository, state: ServerState, requests: RequestStatistics
    ) -> None:
        self._repository = repository
        self._state = state
        self._requests = requests

    async def serve(
        self, request: Any, metadata: Metadata, context: Any
    ) -> tuple[Any, Refusal | None]:
        """The ModelInferResponse, or None and why not; counted and logged either way."""
        started = time.perf_counter()
        stats = self._requests
        stats.in_flight += 1
        model, response, refused = UNKNOWN_MODEL, None, None
        served: Result | None = None
        tracer = self._state.tracer  # None: tracing is off, and nothing below does any
        trace = None if tracer is None else tracer.request(metadata, "grpc")
        try:
            engine = self._engine(request, metadata)
            model = engine.name
            call = self._call(engine, request, metadata, context.time_remaining())
            if trace is not None:
                trace.decoded(call, engine.version)
            served = engine.call(call)  # kept: a failed call still says how far it got
            outputs = (await served).outputs
            if trace is not None:
                trace.answered()
            response = infer_response(engine.name, engine.version, request.id, outputs,
                                      call.outputs, self._state.max_response_bytes)  # fmt: skip
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                if trace is not None:
                    trace.end(model, CLIENT_GONE, served, Code.CANCELLED.value[0])
                raise  # the client went away or the server stops: nobody to answer
            # Cancelled from inside (the handler executor of an engine being retired shut
            # down under it): the client still gets an answer it can retry on.
            refused = _UNLOADING
        except Exception as err:
            refused = refusal(err, "ModelInfer")
            if model is UNKNOWN_MODEL and self._repository.knows(request.model_name):
                model = request.model_name  # a known model that refused: count it there
        finally:
            stats.in_flight -= 1
        status = 200 if refused is None else refused.status
        self._record(model, status, started, request, response, served, metadata)
        if trace is not None:
            trace.end(model, status, served, (refused.code if refused else Code.OK).value[0])
        return response, refused

    def _engine(self, request: Any, metadata: Metadata) -> Engine:
        state = self._state
        if state.api_key is not None:  # before the lookup: no probing names without a key
            state.check_credentials(metadata.get("authorization", ""))
        return self._repository.get(request.model_name, request.model_version or None, metadata)

    def _call(
        self, engine: Engine, request: Any, metadata: Metadata, deadline_s: float | None
    ) -> Call:
        """The call, once the front door let it in. Its deadline: `parameters.timeout`, the
        server's default and the gRPC call's own deadline, whichever is shortest."""
        state = self._state
        params = parameters(request.parameters)
        timeout_s = request_timeout_s(params, state.timeout_s) if params else state.timeout_s
        if deadline_s is not None and (timeout_s is None or deadline_s < timeout_s):
            timeout_s = deadline_s
        waited = state.lag.smoothed_s  # how late the loop runs: about how long it sat unread
        state.admit(engine, timeout_s, waited)
        inputs = decode_inputs(request, state.limits, raw_bytes=engine.raw_bytes)
        cache = not params or params.get("cache") is not False
        priority = request_priority(params) if params else 0
        if engine.pipeline is None:
            return Call(inputs, requested_outputs(request), cache=cache,
                        timeout_s=remaining_s(timeout_s, waited),
                        max_output_bytes=state.max_response_bytes, priority=priority)  # fmt: skip
        return Call(inputs, requested_outputs(request), parameters=params, headers=metadata,
                    cache=cache, timeout_s=remaining_s(timeout_s, waited),
                    max_output_bytes=state.max_response_bytes, priority=priority)  # fmt: skip

    def _record(
        self,
        model: str,
        status: int,
        started: float,
        request: Any,
        response: Any,
        served: Result | None,
        metadata: Metadata,
    ) -> None:
        elapsed = time.perf_counter() - started
        received = request.ByteSize()
        sent = response.ByteSize() if response is not None else 0
        self._requests.record(model, status, elapsed, received, sent)
        state = self._state
        if state.access_log.enabled:
            request_id = request.id or metadata.get("x-request-id") or state.request_ids.next()
            state.access_log.record_call(
                request_id, metadata.get("traceparent"), model, status, elapsed, served,
                received, sent, "grpc",
            )  # fmt: skip
