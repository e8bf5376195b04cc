"""One inference call as every front end hands it to the engine, whatever its protocol, and its
result: `await engine.call(Call(inputs, outputs, timeout_s=0.5))`.

A front end (HTTP, gRPC) decodes its protocol into a `Call` and formats the `Result`; which
path the call takes (straight to the model or through its handler), the response cache,
batching, deadlines and size limits are the engine's.
"""

from __future__ import annotations

from collections.abc import Coroutine, Generator, Mapping, Sequence
from dataclasses import KW_ONLY, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from batchserve.errors import InvalidInput

if TYPE_CHECKING:
    import numpy as np

    from batchserve.tracing import RequestTrace

# How the response cache served a call: not consulted (off, or the call opted out), a local
# or Redis hit, or a miss that computed (and stored) the answer.
CacheOutcome = Literal["off", "hit", "miss"]


# Not frozen: one is built per request, and a frozen dataclass takes about four times as long
# to build. Nothing changes a call once built.
@dataclass(slots=True)
class Call:
    """One request to one model.

    Either tensors (`inputs`, decoded from a V2 request, JSON, binary or gRPC) or a raw
    payload (`body`, not None, with its `content_type`: an image for the model's handler).
    `outputs` names the outputs wanted (None: all). `parameters` are the request's own
    (V2 `parameters`, or a raw request's query arguments); `headers` its metadata, for a
    handler (credentials are dropped before a handler sees them).

    `cache`: False computes the answer even when the response cache holds it (and stores
    nothing). `timeout_s`: the seconds the call may still take (None: no deadline); past it,
    DeadlineExceeded (504). `max_output_bytes`: PayloadTooLarge (413) when the outputs, or a
    handler's answer, would take more. `priority`: the V2 `parameters.priority` (1 highest; 0
    the model's default level), read by models that have priority levels (docs/batching.md);
    other models serve every call in arrival order. `trace`: the request's span when tracing is
    on and the request was sampled (None otherwise), for the batch that runs it to link to.
    """

    inputs: Mapping[str, np.ndarray] = field(default_factory=dict)
    outputs: Sequence[str] | None = None
    _: KW_ONLY
    body: bytes | None = None
    content_type: str | None = None
    parameters: Mapping[str, Any] | None = None
    headers: Mapping[str, str] | None = None
    cache: bool = True
    timeout_s: float | None = None
    max_output_bytes: int | None = None
    priority: int = 0
    trace: RequestTrace | None = None


class Result:
    """What a call produced, and how it was served, for logs and metrics.

    `Engine.call` returns it before the call runs; awaiting it runs the call and returns the
    result itself: `outputs` (the outputs asked for; for V2 tensors that went through the
    model's handler, its one output `predictions`), or `answer`, the handler's JSON answer to
    a raw payload. `batch_rows` (rows of the model run the call shared; 0: none) and `cache`
    say how far the call got even when it fails, so a failed request's log line says so too.
    """

    __slots__ = ("answer", "batch_rows", "cache", "outputs", "running")

    def __init__(self) -> None:
        self.outputs: dict[str, np.ndarray] = {}
        self.answer: bytes | None = None
        self.batch_rows = 0
        self.cache: CacheOutcome = "off"
        # The coroutine that serves the call (set by the engine); awaited through this object,
        # so awaiting a result costs no coroutine of its own.
        self.running: Coroutine[Any, Any, Result] | None = None

    def __await__(self) -> Generator[Any, None, Result]:
        running = self.running
        if running is None:
            raise RuntimeError("a Result is awaited once, and made by Engine.call")
        # The coroutine holds this result: let go of it here, or the pair would be a cycle
        # that only the cyclic collector frees (rarely, by design), keeping every request's
        # tensors alive until then and costing the hot path the collections.
        self.running = None
        return running.__await__()


def request_timeout_s(parameters: Mapping[str, Any] | None, default: float | None) -> float | None:
    """A call's deadline in seconds: the V2 `parameters.timeout` (microseconds, as Triton reads
    it, over HTTP and gRPC alike), never longer than the server's `default`."""
    requested = parameters.get("timeout") if parameters else None
    if requested is None:
        return default
    if type(requested) is not int or requested <= 0:
        raise InvalidInput("parameters.timeout must be a positive integer (microseconds)")
    seconds = requested / 1e6
    return seconds if default is None else min(seconds, default)


def request_priority(parameters: Mapping[str, Any] | None) -> int:
    """A call's priority: the V2 `parameters.priority` (as Triton reads it: 1 is the highest
    level, 0 or none the model's default), a non-negative integer; InvalidInput otherwise.
    Which levels exist is the model's (`PriorityConfig.tier` checks the range)."""
    requested = parameters.get("priority") if parameters else None
    if requested is None:
        return 0
    if type(requested) is not int or requested < 0:
        raise InvalidInput("parameters.priority must be a non-negative integer (1 is highest)")
    return requested


def remaining_s(timeout_s: float | None, waited_s: float) -> float | None:
    """What is left of a deadline after the wait before the front end's handler ran (at least
    1 ms, so a call the queue cannot serve at once is refused or cut off rather than never
    tried)."""
    return None if timeout_s is None else max(timeout_s - waited_s, 0.001)
