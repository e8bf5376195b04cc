"""A lean HTTP/1.1 keep-alive client for load generation.

A load generator must cost far less per request than the server it measures. A general client
(redirects, cookies, header objects, body streams) costs more per request than a small server
does, so this one writes pre-encoded request bytes on raw asyncio transports and lets
`httptools` (the llhttp parser) parse the answers; it reads only the status and the body's end.

Every request carries a deadline (perf_counter seconds). One periodic sweep enforces all of
them, both for requests on the wire and for those still waiting for a connection slot.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from typing import Final, cast
from urllib.parse import urlsplit

import httptools

from batchserve.lifecycle import Lifecycle

SCHEMES = {"http": 80, "https": 443}


class Disconnected(ConnectionError):
    """The server closed the connection before answering."""


class Aborted(ConnectionAbortedError):
    """The load generator closed the connection itself (its pool shutting down)."""


class RequestTimeout(TimeoutError):
    """No complete answer by the request's deadline."""


def split_url(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of an http:// or https:// URL; ValueError for anything else."""
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES or not parts.hostname:
        raise ValueError(f"expected an http:// or https:// URL with a host, got {url!r}")
    return parts.scheme, parts.hostname, parts.port or SCHEMES[parts.scheme]


def encode_post(url: str, body: bytes, headers: dict[str, str]) -> bytes:
    """The full bytes of one POST request, built once and reused for every send."""
    parts = urlsplit(url)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    head = [f"POST {path} HTTP/1.1", f"Host: {parts.netloc}", f"Content-Length: {len(body)}"]
    head += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


class _Connection(asyncio.Protocol):
    __slots__ = ("_parser", "_status", "_transport", "_waiter", "closed", "deadline")

    def __init__(self) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self._waiter: asyncio.Future[int] | None = None
        self._status = 0
        self.deadline = 0.0  # of the request on the wire; 0 when idle
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing asyncio.Transport.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as err:
            self._fail(Disconnected(f"malformed response: {err}"))
            self.abort()

    def on_headers_complete(self) -> None:
        self._status = self._parser.get_status_code()

    def on_message_complete(self) -> None:
        waiter, self._waiter = self._waiter, None
        self.deadline = 0.0
        if waiter is not None and not waiter.done():
            waiter.set_result(self._status)
        if not self._parser.should_keep_alive():
            self.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        # A request still waiting here was cut off by the server unless this side closed first.
        ours, self.closed = self.closed, True
        if ours:
            self._fail(Aborted("closed by the load generator"))
        else:
            self._fail(Disconnected(str(exc) if exc else "connection closed by the server"))

    def _fail(self, error: Exception) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)

    def send(
        self, raw: bytes, deadline: float, loop: asyncio.AbstractEventLoop
    ) -> asyncio.Future[int]:
        assert self._transport is not None
        waiter = self._waiter = loop.create_future()
        self.deadline = deadline
        self._transport.write(raw)
        return waiter

    def time_out(self) -> None:
        self._fail(RequestTimeout("no answer within the timeout"))
        self.abort()

    def abort(self) -> None:
        self.closed = True
        if self._transport is not None:
            self._transport.abort()


class Slots:
    """At most `limit` requests hold a connection; the rest wait in FIFO order. Deadlines
    arrive in order (a constant timeout after a monotonic schedule), so expiring from the head
    finds every overdue waiter."""

    __slots__ = ("_free", "_waiters")

    def __init__(self, limit: int) -> None:
        self._free = limit
        self._waiters: deque[tuple[float, asyncio.Future[None]]] = deque()

    @property
    def saturated(self) -> bool:
        return self._free == 0

    async def acquire(self, deadline: float) -> None:
        if self._free and not self._waiters:
            self._free -= 1
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((deadline, waiter))
        try:
            await waiter
        except asyncio.CancelledError:
            # Cancelled after the slot was handed over: pass it on, or it leaks.
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self.release()
            raise

    def release(self) -> None:
        if self._waiters:
            self.expire(time.perf_counter())  # an overdue waiter must not take the slot
        while self._waiters:
            _, waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot goes straight to the next waiter
                return
        self._free += 1

    def expire(self, now: float) -> None:
        while self._waiters and self._waiters[0][0] < now:
            _, waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(RequestTimeout("no free connection slot within the timeout"))


class ConnectionPool(Lifecycle):
    """Keep-alive connections to one host, at most `limit` open; LIFO reuse keeps them warm.
    https:// URLs use TLS with `ssl_context` (default: the system's trust store)."""

    ok_status: Final = 200
    timeout_status: Final = None  # a 504 is the server's answer; the pool's own is an error

    def __init__(
        self, url: str, limit: int, timeout_s: float, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        scheme, self._host, self._port = split_url(url)
        self._ssl: ssl.SSLContext | None = None
        if scheme == "https":
            self._ssl = ssl_context or ssl.create_default_context()
        self._timeout_s = timeout_s
        self._idle: list[_Connection] = []
        self._all: set[_Connection] = set()
        self._slots = Slots(limit)
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._sweeper = asyncio.create_task(self._sweep())

    async def aclose(self) -> None:
        """Stop timing requests out and drop every connection."""
        if self._sweeper is not None:
            self._sweeper.cancel()
        for connection in self._all:
            connection.abort()

    @property
    def saturated(self) -> bool:
        return self._slots.saturated

    @property
    def sweep_interval(self) -> float:
        """How late past its deadline a request may be timed out."""
        return min(0.5, self._timeout_s / 4)

    async def post(self, raw: bytes, deadline: float | None = None) -> int:
        """Send one pre-encoded request; returns the response status. RequestTimeout when no
        answer came by `deadline` (perf_counter seconds; default: the timeout from now),
        including time spent waiting for a free slot."""
        if deadline is None:
            deadline = time.perf_counter() + self._timeout_s
        await self._slots.acquire(deadline)
        try:
            connection = await self._acquire(deadline)
            try:
                status = await connection.send(raw, deadline, asyncio.get_running_loop())
            except BaseException:
                connection.abort()
                self._all.discard(connection)
                raise
            self._idle.append(connection)
            return status
        finally:
            self._slots.release()

    async def _acquire(self, deadline: float) -> _Connection:
        while self._idle:
            connection = self._idle.pop()
            if not connection.closed:
                return connection
            self._all.discard(connection)
        loop = asyncio.get_running_loop()
        # The sweep sees a connection only once it is made: connecting (a full backlog, a TLS
        # handshake the server never answers) needs its own timer, on this rare path only.
        connect = asyncio.ensure_future(
            loop.create_connection(
                _Connection,
                self._host,
                self._port,
                ssl=self._ssl,
                server_hostname=self._host if self._ssl else None,
            )
        )
        try:
            # The loop's timers run on its own clock (milliseconds under uvloop), which can
            # fire a little before the request's perf_counter deadline: wait again until that
            # deadline has really passed, so a request never ends early.
            while not connect.done():
                left = deadline - time.perf_counter()
                if left <= 0:
                    raise RequestTimeout("no connection within the timeout")
                await asyncio.wait((connect,), timeout=left)
        finally:
            if not connect.done():
                connect.cancel()
        _, connection = connect.result()
        self._all.add(connection)
        return connection

    async def _sweep(self) -> None:
        # One periodic check instead of a timer per request: timers would cost more than the
        # request itself at tens of thousands of requests per second.
        while True:
            await asyncio.sleep(self.sweep_interval)
            now = time.perf_counter()
            self._slots.expire(now)
            for connection in list(self._all):
                if connection.deadline and connection.deadline < now:
                    connection.time_out()
