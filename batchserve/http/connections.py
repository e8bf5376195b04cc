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
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web
from aiohttp.http_parser import RawRequestMessage
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
    max_active_requests: requests handled at once, all connections together (0: no cap); a new
        request that arrives past it waits, unread, in its connection until one finishes.
    answer_target_s: while a line waits, the cap in force comes down while answers after the
        gate take longer than this, and goes back up while they take under three quarters of
        it (0: the cap never moves).
    """

    header_timeout_s: float = 30.0
    keepalive_timeout_s: float = 75.0
    max_connections: int = 1024
    refusal_linger_s: float = 1.0
    max_active_requests: int = 0
    answer_target_s: float = 0.0

    def __post_init__(self) -> None:
        for name in ("header_timeout_s", "keepalive_timeout_s", "max_connections"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("max_active_requests", "answer_target_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


@dataclass(frozen=True, slots=True)
class ConnectionStatistics:
    open: int
    refused: int  # connections answered 503 because max_connections were open
    header_timeouts: int  # connections closed with 408 because their headers came too slowly
    active: int = 0  # requests read (or let through) and not yet answered
    held: int = 0  # connections whose next request waits for `active` to drop below the cap
    gate_refusals: int = 0  # held requests refused at the gate when their turn came
    cap: int = 0  # the active-request cap in force (lowered under a line; 0: no cap)


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


# A request let through the cap after waiting in line, how long it waited (seconds since its
# first bytes were read) and how long an answer takes from there lately: the whole HTTP answer
# to write at once (a refusal), True (judged and let through: its handler does not judge its
# deadline again, and its answer time is measured), or False (not the screen's to judge). It
# sees the parsed request line and headers; its body, if any, is already read whole.
Screen = Callable[[RawRequestMessage, float, float], "bytes | bool"]

# Answer times after the gate: the window the quantile is taken over, how often it is taken,
# and which quantile. The median: a high quantile feeds on itself under overload (refusals
# busy the loop, which lengthens the answers' tail, which refuses more, until nearly all are
# refused); the slow few it lets through are cut off by their own deadline (504), which the
# overload benchmark keeps under 1%.
ANSWER_WINDOW = 256
ANSWER_EVERY = 32
ANSWER_QUANTILE = 0.5
# The least age at which that quantile counts as old (see `ConnectionGuard.answer_s`).
STALE_ANSWER_S = 0.1
# The least the cap in force goes down to (see `ConnectionGuard._adapt`).
MIN_ADAPTED_CAP = 16
# The share of the request deadline an answer after the gate is kept under while a line waits
# (`ConnectionLimits.answer_target_s`; see `ConnectionGuard._adapt`).
ANSWER_SHARE = 0.25


class ConnectionGuard:
    """Counts the open connections and builds the protocol for each one the loop accepts.

    It also holds back new requests past `max_active_requests`: with closed-loop clients a
    refusal costs the loop most of what an answer does and its client comes straight back, so
    refusing turns the loop's time into refusals. A held connection's request stays unparsed
    and its socket unread (the kernel keeps the rest) until a request finishes; connections are
    let through in the order their requests arrived, so the oldest is served first.

    A request that waited in line meets the `screen` first, which may answer it at once (a
    refusal whose wait has used up its deadline) without a request object, a task or a
    response object: a refusal made there costs a fraction of one made by a handler, which is
    what lets the line keep moving when more clients wait than the deadline has room for."""

    def __init__(
        self,
        limits: ConnectionLimits,
        handler_kwargs: dict[str, Any],
        screen: Screen | None = None,
    ) -> None:
        self.limits = limits
        self._handler_kwargs = handler_kwargs
        self.screen = screen
        self.gate_refusals = 0  # requests the screen refused at the gate
        # Seconds from let through to answered, of the requests the screen let through.
        self._answers: deque[float] = deque(maxlen=ANSWER_WINDOW)
        self._answer_s = 0.0  # their ANSWER_QUANTILE, taken every ANSWER_EVERY answers
        self._last_answer = 0.0
        self._unsorted = 0  # answers since the quantile was last taken
        # A cap of 0 means none: a count that never reaches it keeps the check one compare.
        self.max_active = limits.max_active_requests or sys.maxsize
        # The cap in force: the configured one, lowered while answers after the gate take
        # longer than `limits.answer_target_s` (see `_adapt`).
        self.cap = self.max_active
        self.active = 0
        self._held: deque[GuardedRequestHandler] = deque()
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
        return ConnectionStatistics(
            self.open, self.refused, self.header_timeouts, self.active, len(self._held),
            self.gate_refusals, 0 if self.cap == sys.maxsize else self.cap,
        )  # fmt: skip

    def hold(self, connection: GuardedRequestHandler) -> None:
        self._held.append(connection)

    def forget(self, connection: GuardedRequestHandler) -> None:
        """A held connection closed: its place in line goes (rare, so a linear removal)."""
        with contextlib.suppress(ValueError):
            self._held.remove(connection)

    def answered(self, seconds: float, now: float) -> None:
        """A request the screen let through was answered `seconds` after."""
        answers = self._answers
        answers.append(seconds)
        self._last_answer = now
        self._unsorted += 1
        if self._unsorted >= ANSWER_EVERY:
            self._unsorted = 0
            ordered = sorted(answers)
            self._answer_s = ordered[int(ANSWER_QUANTILE * (len(ordered) - 1))]
            self._adapt(self._answer_s)

    def _adapt(self, median_s: float) -> None:
        """Under a line (only held requests are measured), lower the cap in force by a tenth
        while the median answer after the gate takes longer than `answer_target_s`, and raise
        it back by 2 while it takes under three quarters of that. Past what keeps the sessions
        busy, more places only lengthen every answer (the answer time is the places over the
        answers per second); and once refusals slow the loop, long answers under a deadline
        refuse more, which slows it further: with the configured 128 places and 1,500 answers a
        second an answer took 85 ms and the gate refused nearly everything.

        The target is a share of the deadline, not a multiple of the quickest answer time seen:
        that figure is set by whichever window came first, and it failed both ways (a first
        window of 1 ms held the cap at its floor for a whole run; one of 37 ms let answers take
        60 ms with 128 places, refusing 11,000 requests a second for 500 answers). Without a
        line the configured cap stands untouched."""
        target = self.limits.answer_target_s
        if not target:
            return
        limit = self.max_active
        if median_s > target:
            self.cap = max(min(limit, MIN_ADAPTED_CAP), int(self.cap * 0.9))
        elif median_s < 0.75 * target and self.cap < limit:
            self.cap = min(limit, self.cap + 2)

    def answer_s(self, now: float) -> float:
        """How long an answer takes after the gate lately; 0 once that is no longer known:
        with nothing let through for twice that long (everything refused), the figure is old,
        and an old figure would go on refusing everything. 0 lets requests through to be
        measured again."""
        answer_s = self._answer_s
        if now - self._last_answer > max(2 * answer_s, STALE_ANSWER_S):
            return 0.0
        return answer_s

    def finished(self) -> None:
        """A request finished (or a let-through connection closed without one): let the
        oldest held requests through while there is room. Each one let through counts as
        active at once, so one finish admits one request however fast the next arrives."""
        self.active -= 1
        held = self._held
        while held and self.active < self.cap:
            self.active += 1
            if held.popleft().let_through():  # answered at the gate: its place is free again
                self.active -= 1


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
                 "_held_data", "_let_at", "_token", "arrived_at", "screened")  # fmt: skip

    def __init__(self, manager: WebServer, *, guard: ConnectionGuard, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        # `time.monotonic()` when the first bytes of the request not yet handled were read
        # (0: none pending). Under load a request waits here, behind the loop's backlog, before
        # its handler runs: a deadline the client counts must count that wait too.
        self.arrived_at = 0.0
        # The request now parsed was let through by the guard's screen (its deadline checked).
        self.screened = False
        self._let_at = 0.0  # when the screen let this request through (0: it did not)
        self._guard = guard
        self._header_timer: asyncio.TimerHandle | None = None
        self._answer_first = False  # shutting down with no request read yet
        self._first_answered: asyncio.Future[None] | None = None
        self._counted = False
        # The first bytes of a request held back by the guard's cap (None: none held).
        self._held_data: bytes | None = None
        # This connection's request counts in the guard's `active` (from when its first bytes
        # were taken in, or it was let through, until it is answered or the connection closes).
        self._token = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._guard.open += 1
        self._counted = True
        super().connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._counted:
            self._guard.open -= 1
            self._counted = False
        if self._held_data is not None:
            self._held_data = None
            self._guard.forget(self)
        self._give_back()
        self._cancel_header_timer()
        self._first_done()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._held_data is not None:  # a read already under way when reading was paused
            self._held_data += data
            return
        if not self._messages and not self._request_in_progress and self._header_timer is None:
            self.arrived_at = time.monotonic()  # a new request's first bytes
            guard = self._guard
            # Counted as it is read, not when its handler starts: one loop iteration reads
            # every ready connection before any handler runs, and those reads are the backlog.
            if data and not self._token and self._between_requests():
                if guard.active >= guard.cap:
                    self._hold(data)
                    return
                guard.active += 1
                self._token = True
        self._receive(data)

    def _give_back(self) -> None:
        if self._token:
            self._token = False
            self._guard.finished()

    def _between_requests(self) -> bool:
        """No request of this connection is read, queued or handled: these bytes start a new
        one. (Not "the handler waits for one": a client quick to send its next request would
        otherwise slip past the line while the handler loop has yet to come round.)"""
        return (
            not self._request_in_progress
            and not self._close
            and not self._force_close
            and self.transport is not None
        )

    def _hold(self, data: bytes) -> None:
        # Neither parsed nor timed: it is the server, not the client, that is late. Its
        # deadline still counts from `arrived_at`, when these bytes were read.
        self._held_data = data
        self._guard.hold(self)
        self._pause_transport_reading()

    def let_through(self, *, screened: bool = True) -> bool:
        """The guard's turn for this connection's request (already counted as active). True
        when it took no place after all: the screen answered it, or it had gone."""
        data, self._held_data = self._held_data, None
        if data is None:
            return True
        self._token = True
        if not self._reading_paused and not self._buffer_paused:
            self._resume_transport_reading()
        screen = self._guard.screen
        if screen is None or not screened:
            self._receive(data)
            return False
        # The handler is not woken by the parse: the screen looks at the request first.
        waiter, self._waiter = self._waiter, None
        try:
            super().data_received(data)
        finally:
            self._waiter = waiter
        answered = self._screen(screen)
        if self._messages and waiter is not None and not waiter.done():
            waiter.set_result(None)
        if answered:  # these bytes were one whole request: the connection is idle now
            self._cancel_header_timer()
        else:
            self._watch_headers(data)
        return answered

    def _screen(self, screen: Screen) -> bool:
        """Show the one whole request the held bytes made to the screen; write its answer if it
        gives one. Anything else (part of a request, several pipelined, a parse error, one that
        ends its connection or whose body is not all here) goes to the handler as usual."""
        messages = self._messages
        if len(messages) != 1 or self.transport is None:
            return False
        message, payload = messages[0]
        if (
            not isinstance(message, RawRequestMessage)  # a parse error
            or message.method != "POST"
            or message.should_close
            or message.upgrade
            or not payload.is_eof()
        ):
            return False
        now = time.monotonic()
        answer = screen(message, now - self.arrived_at, self._guard.answer_s(now))
        if answer is False:
            return False
        if answer is True:
            self.screened = True
            self._let_at = now
            return False
        messages.popleft()
        if self._parser is not None:
            self._parser.message_consumed()
        self.arrived_at = 0.0
        self._token = False  # the caller frees the place: no `finished` from here
        self._guard.gate_refusals += 1
        self.transport.write(answer)
        # Answered on a kept-alive connection, as the handler loop would have: its idle timer
        # runs from now.
        close_time = self._loop.time() + self._keepalive_timeout
        self._next_keepalive_close_time = close_time
        if self._keepalive_handle is None:
            self._keepalive_handle = self._loop.call_at(close_time, self._process_keepalive)
        return True

    def _process_keepalive(self) -> None:
        if self._held_data is None:  # a held request is waiting for the server, not idle
            super()._process_keepalive()

    def _receive(self, data: bytes) -> None:
        super().data_received(data)
        self._watch_headers(data)

    def _watch_headers(self, data: bytes) -> None:
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
        # So is one whose request the cap holds back: it goes through now, past the cap.
        if self._held_data is not None and self.transport is not None:
            self._guard.forget(self)
            self._guard.active += 1
            self.let_through(screened=False)  # answered by its handler, which shutdown awaits
            self._answer_first = True
            return
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
            if self._let_at:
                now = time.monotonic()
                self._guard.answered(now - self._let_at, now)
                self._let_at = 0.0
                self.screened = False  # not taken (a handler that refused before it looked)
            # Answered: its place goes to the next in line. (A request that ends without an
            # answer ends with its connection: `connection_lost` gives the place back. One
            # pipelined behind another, read with it, is not counted: the cap is on reads.)
            self._give_back()


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
        yield GaugeMetricFamily(
            "batchserve_http_requests_active",
            "Requests read and not yet answered (capped by --max-active-requests).",
            value=stats.active,
        )
        yield GaugeMetricFamily(
            "batchserve_http_connections_held",
            "Connections whose next request waits, unread, for --max-active-requests.",
            value=stats.held,
        )
        yield CounterMetricFamily(
            "batchserve_http_header_timeouts",
            "Connections closed with 408: request headers slower than --header-timeout-s.",
            value=stats.header_timeouts,
        )
        yield GaugeMetricFamily(
            "batchserve_http_requests_active_cap",
            "The cap on requests handled at once in force: --max-active-requests, lowered while "
            "a line waits and answers take over a quarter of the request deadline (0: no cap).",
            value=stats.cap,
        )
        yield CounterMetricFamily(
            "batchserve_http_gate_refusals",
            "Requests held by --max-active-requests and refused when let through, before any "
            "handler ran: their wait had used up their deadline (also in the requests counts).",
            value=stats.gate_refusals,
        )
