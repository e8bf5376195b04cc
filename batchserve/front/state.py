"""What every front end (HTTP, gRPC) checks the same way before it reads a call's tensors:
whether the server accepts calls, the API key, the engine's admission and the event loop's lag;
and what they record the same way (per-model request statistics, the access log)."""

from __future__ import annotations

import hmac

from batchserve.config import ServerConfig
from batchserve.engine import Engine
from batchserve.errors import NotReady, Overloaded, Unauthorized
from batchserve.front.access import AccessLog, RequestIds
from batchserve.front.lag import LoopLag
from batchserve.front.stats import RequestStatistics
from batchserve.front.turns import DecodeTurns
from batchserve.protocol import DecodeLimits
from batchserve.tracing import Tracing


class ServerState:
    """Whether the front door is open (turned false first when the server drains), the
    per-model request statistics, and the request policies (API key, default deadline)."""

    __slots__ = (
        "accepting",
        "access_log",
        "api_key",
        "body_timeout_s",
        "decode_turns",
        "lag",
        "lag_shed",
        "limits",
        "max_body_bytes",
        "max_json_bytes",
        "max_response_bytes",
        "metrics_public",
        "request_ids",
        "requests",
        "timeout_s",
        "tracer",
    )  # fmt: skip

    def __init__(self, config: ServerConfig) -> None:
        self.accepting = False
        self.max_response_bytes = config.max_response_bytes  # 413 for a larger answer
        # JSON costs ~14x its size in memory and holds the loop while it is parsed: big
        # tensors belong in the binary extension, whose decode is zero-copy.
        self.max_json_bytes = config.max_json_bytes
        timeout_s = config.request_timeout_s
        # Measured whenever there is a deadline: the wait before a handler runs counts in it.
        self.lag = LoopLag(config.max_loop_lag_ms / 1000.0, measure=timeout_s is not None)
        self.decode_turns = DecodeTurns()  # big bodies decode one per loop iteration
        self.lag_shed = 0  # requests refused because the event loop ran late
        self.limits = DecodeLimits(config.max_inputs, config.max_tensor_elements)
        self.body_timeout_s = config.body_timeout_s
        self.max_body_bytes = config.max_body_bytes
        self.requests = RequestStatistics()
        self.access_log = AccessLog(config.access_log)
        self.request_ids = RequestIds()
        self.api_key = config.api_key.encode() if config.api_key else None
        self.timeout_s = timeout_s  # server default deadline per request, None = no deadline
        self.metrics_public = config.metrics_public
        # Request spans (batchserve.tracing), set by the composition root; None: tracing off.
        self.tracer: Tracing | None = None

    def check_credentials(self, authorization: str) -> None:
        """`authorization`: the value of an HTTP `Authorization` header or of gRPC
        `authorization` metadata; Unauthorized unless it is `Bearer <the API key>`."""
        if self.api_key is None:
            return
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), self.api_key
        ):
            raise Unauthorized("missing or wrong API key (Authorization: Bearer <key>)")

    def admit(self, engine: Engine, timeout_s: float | None, waited_s: float) -> None:
        """The refusals every front end makes before it reads a call's tensors, whatever its
        protocol: the server is draining (503), the engine's queue cannot take the call or
        meet its deadline, or the event loop runs late (429)."""
        if not self.accepting:
            raise NotReady("the server is shutting down")
        engine.check_admission(timeout_s, waited_s)
        if self.lag.overloaded:
            self.lag_shed += 1
            raise Overloaded(
                f"server overloaded: its event loop runs {self.lag.lag_s * 1000:.0f} ms late"
            )
