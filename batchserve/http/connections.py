"""Connection-level limits on the HTTP front end: how long a connection may take over its
request headers, how many connections may be open, and how the listener is closed on shutdown
so that no connection the kernel has accepted is reset."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import resource
import socket
import struct
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from aiohttp.web_response import StreamResponse
from aiohttp.web_server import Server as WebServer
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

# File descriptors kept back from the connection cap: model files, Redis connections, handler
# worker pipes, log files, the listening sockets and the interpreter's own.
NOFILE_RESERVE = 256


def default_max_connections(nofile: int | None = None) -> int:
    """`soft RLIMIT_NOFILE - max(256, soft / 4)`, at least 16: 1024 descriptors give 768."""
    if nofile is None:
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if nofile == resource.RLIM_INFINITY:
            nofile = 1 << 20
    return max(16, nofile - max(NOFILE_RESERVE, nofile // 4))


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """header_timeout_s: a connection that started a request's headers and has not finished them
        within this gets 408 and is closed.
    keepalive_timeout_s: an idle connection (between requests) is closed after this.
    max_connections: open connections past this are answered 503 with Retry-After and closed.
    refusal_linger_s: how long a refused connection may stay open for the client to read its 503.
    """

    header_timeout_s: float = 30.0
    keepalive_timeout_s: float = 75.0
    max_connections: int = 1024
    refusal_linger_s: float = 1.0

    def __post_init__(self) -> None:
        for name in ("header_timeout_s", "keepalive_timeout_s", "max_connections"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")


@dataclass(frozen=True, slots=True)
class ConnectionStatistics:
    open: int
    refused: int  # connections answered 503 because max_connections were open
    header_timeouts: int  # connections closed with 408 because their headers came too slowly


def _raw_response(status: str, message: str, extra: str = "") -> bytes:
    body = orjson.dumps({"error": message})
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n{extra}"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


# At most this many refused connections wait for their client to read the 503; past it a
# refused connection is closed as soon as the answer is written (a flood holds no descriptors).
_MAX_LINGERING_REFUSALS = 64


class ConnectionGuard:
    """Counts the open connections and builds the protocol for each one the loop accepts."""

    def __init__(self, limits: ConnectionLimits, handler_kwargs: dict[str, Any]) -> None:
        self.limits = limits
        self._handler_kwargs = handler_kwargs
        self.open = 0
        self.refused = 0
        self.header_timeouts = 0
        self.lingering = 0
        self.last_accept = 0.0
        self._refusal = _raw_response(
            "503 Service Unavailable",
            f"too many open connections (the limit is {limits.max_connections}); retry later",
            "Retry-After: 1\r\n",
        )
        self.header_timeout = _raw_response(
            "408 Request Timeout",
            f"the request headers did not arrive within {limits.header_timeout_s:g} s",
        )

    def factory(self, server: WebServer) -> Callable[[], asyncio.Protocol]:
        loop = asyncio.get_running_loop()

        def protocol() -> asyncio.Protocol:
            self.last_accept = loop.time()
            if self.open >= self.limits.max_connections:
                self.refused += 1
                return _Refusal(self, loop)
            return GuardedRequestHandler(server, guard=self, loop=loop, **self._handler_kwargs)

        return protocol

    def statistics(self) -> ConnectionStatistics:
        return ConnectionStatistics(self.open, self.refused, self.header_timeouts)


class _Refusal(asyncio.Protocol):
    """A connection past the cap: 503 written at once, our side shut, the client's bytes
    discarded unread; closed when the client closes or after a short linger."""

    def __init__(self, guard: ConnectionGuard, loop: asyncio.AbstractEventLoop) -> None:
        self._guard = guard
        self._loop = loop
        self._timer: asyncio.TimerHandle | None = None
        self._counted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        guard = self._guard
        transport.write(guard._refusal)
        if guard.lingering >= _MAX_LINGERING_REFUSALS or not transport.can_write_eof():
            transport.close()
            return
        # A half close lets the client read the whole answer; closing outright with its
        # request unread would send a reset that can destroy the answer in flight.
        transport.write_eof()
        guard.lingering += 1
        self._counted = True
        self._timer = self._loop.call_later(guard.limits.refusal_linger_s, transport.close)

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> bool:
        return False  # the client is done: close

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._counted:
            self._guard.lingering -= 1
            self._counted = False


class GuardedRequestHandler(RequestHandler):
    """aiohttp's protocol plus a header-read deadline, the connection count, and a shutdown that
    answers a connection accepted before the listener closed instead of dropping it."""

    __slots__ = ("_answer_first", "_counted", "_first_answered", "_guard", "_header_timer",
                 "arrived_at")  # fmt: skip

    def __init__(self, manager: WebServer, *, guard: ConnectionGuard, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        # `time.monotonic()` when the first bytes of the request not yet handled were read
        # (0: none pending). Under load a request waits here, behind the loop's backlog, before
        # its handler runs: a deadline the client counts must count that wait too.
        self.arrived_at = 0.0
        self._guard = guard
        self._header_timer: asyncio.TimerHandle | None = None
        self._answer_first = False  # shutting down with no request read yet
        self._first_answered: asyncio.Future[None] | None = None
        self._counted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._guard.open += 1
        self._counted = True
        super().connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._counted:
            self._guard.open -= 1
            self._counted = False
        self._cancel_header_timer()
        self._first_done()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if not self._messages and not self._request_in_progress and self._header_timer is None:
            self.arrived_at = time.monotonic()  # a new request's first bytes
        super().data_received(data)
        # Waiting for headers: no parsed request queued, and either none was ever parsed on
        # this connection or the handler sits idle between requests. (While a request is
        # handled, arriving bytes are its body: the body timeout covers those.)
        waiting = not self._messages and (
            self._request_count == 0 or (self._waiter is not None and not self._waiter.done())
        )
        if not waiting:
            self._cancel_header_timer()
        elif data and self._header_timer is None and self.transport is not None:
            self._header_timer = self._loop.call_later(
                self._guard.limits.header_timeout_s, self._headers_late
            )

    def _headers_late(self) -> None:
        self._header_timer = None
        idle = self._request_count == 0 or (self._waiter is not None and not self._waiter.done())
        if self.transport is None or self._messages or self._request_in_progress or not idle:
            return
        self._guard.header_timeouts += 1
        # No response is being written (the handler waits for a request): 408 goes out whole.
        self.transport.write(self._guard.header_timeout)
        self.force_close()

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def close(self) -> None:
        # aiohttp calls this on every connection once the listener is closed; a connection
        # accepted just before then has a request on its way: answer it (shutdown below).
        if self._request_count == 0 and self.transport is not None and not self._force_close:
            self._answer_first = True
            return
        super().close()

    async def shutdown(self, timeout: float | None = 15.0) -> None:  # noqa: ASYNC109 (aiohttp's)
        if self._answer_first and self.transport is not None:
            self._first_answered = self._loop.create_future()
            # The header timeout and body timeout bound the wait in practice.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._first_answered
            super().close()
        await super().shutdown(timeout)

    def _first_done(self) -> None:
        if self._first_answered is not None and not self._first_answered.done():
            self._first_answered.set_result(None)

    async def finish_response(
        self, request: BaseRequest, resp: StreamResponse, start_time: float | None
    ) -> tuple[StreamResponse, bool]:
        if self._answer_first:
            resp.force_close()
        # A refused body that is compressed, broken or not yet sent (Expect) is not worth
        # reading to its end: lingering would inflate a compression bomb or wait for nothing.
        skip_body = (
            resp.status >= 400 and not request.content.is_eof() and _not_worth_reading(request)
        )
        if skip_body:
            resp.force_close()
        try:
            return await super().finish_response(request, resp, start_time)
        finally:
            if skip_body:
                self._lingering_time = 0.0
            self._first_done()


def _not_worth_reading(request: BaseRequest) -> bool:
    headers = request.headers
    return (
        "Content-Encoding" in headers
        or "Expect" in headers
        or request.content.exception() is not None
    )


class GuardedSite(web.BaseSite):
    """A TCP listener whose connections go through a `ConnectionGuard`."""

    __slots__ = ("_guard", "_host", "_port", "_reuse_port")

    def __init__(
        self,
        runner: web.BaseRunner,
        guard: ConnectionGuard,
        host: str,
        port: int,
        *,
        reuse_port: bool = False,
        backlog: int = 128,
    ) -> None:
        super().__init__(runner, backlog=backlog)
        self._guard = guard
        self._host = host
        self._port = port
        self._reuse_port = reuse_port

    @property
    def name(self) -> str:
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        self._server = await asyncio.get_running_loop().create_server(
            self._guard.factory(server),
            self._host,
            self._port,
            backlog=self._backlog,
            reuse_port=self._reuse_port or None,
        )

    @property
    def listeners(self) -> list[Any]:
        # asyncio's and uvloop's servers both have `sockets`; the abstract type does not say so.
        return list(getattr(self._server, "sockets", None) or ())


# cBPF on a TCP socket sees the TCP header: byte 13 holds the flags; SYN is 0x02.
_DROP_SYN = (
    (0x30, 0, 0, 13),  # ldb [13]
    (0x45, 0, 1, 0x02),  # jset #SYN, drop, keep
    (0x06, 0, 0, 0),  # drop
    (0x06, 0, 0, 0xFFFFFFFF),  # keep
)
_SO_ATTACH_FILTER = 26


class _SockFilter(ctypes.Structure):
    _fields_ = [
        ("code", ctypes.c_ushort),
        ("jt", ctypes.c_ubyte),
        ("jf", ctypes.c_ubyte),
        ("k", ctypes.c_uint32),
    ]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


def refuse_new_handshakes(listener: Any) -> bool:
    """Make a listening socket drop new SYNs while it still completes handshakes already under
    way and keeps its accept queue. A client whose SYN is dropped retries it and, once the
    socket is closed, is refused at connect; closing a listener with connections still queued
    would reset them after their connect succeeded. Linux only; False elsewhere."""
    if not sys.platform.startswith("linux"):
        return False
    program = (_SockFilter * len(_DROP_SYN))(*(_SockFilter(*op) for op in _DROP_SYN))
    fprog = _SockFprog(len(_DROP_SYN), program)
    try:
        listener.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, bytes(fprog))
    except OSError:
        return False
    return True


def accept_queue_length(listener: Any) -> int:
    """Connections the kernel has accepted that the loop has not yet taken (Linux TCP_INFO
    `tcpi_unacked` on a listening socket); 0 where it cannot be read."""
    try:
        info = listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    except (OSError, AttributeError):
        return 0
    return int(struct.unpack_from("I", info, 24)[0])


async def drain_listeners(
    listeners: list[Any], guard: ConnectionGuard, deadline_s: float, settle_s: float = 0.1
) -> None:
    """Stop new handshakes, then let the loop accept every connection already queued (each
    gets its request answered), until the queues have been empty for `settle_s` (handshakes
    in flight complete within a round trip) or `deadline_s` passes."""
    if not [sock for sock in listeners if refuse_new_handshakes(sock)]:
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + deadline_s
    while loop.time() < deadline:  # the kernel's accept queue has no event to wait on
        queued = sum(accept_queue_length(sock) for sock in listeners)
        if queued == 0 and loop.time() - guard.last_accept >= settle_s:
            return
        await asyncio.sleep(0.01)


class ConnectionCollector(Collector):
    def __init__(self, statistics: Callable[[], ConnectionStatistics]) -> None:
        self._statistics = statistics

    def collect(self) -> Iterator[Metric]:
        stats = self._statistics()
        yield GaugeMetricFamily(
            "batchserve_http_connections_open", "Open HTTP connections.", value=stats.open
        )
        yield CounterMetricFamily(
            "batchserve_http_connections_refused",
            "Connections answered 503 because --max-connections were open.",
            value=stats.refused,
        )
        yield CounterMetricFamily(
            "batchserve_http_header_timeouts",
            "Connections closed with 408: request headers slower than --header-timeout-s.",
            value=stats.header_timeouts,
        )
