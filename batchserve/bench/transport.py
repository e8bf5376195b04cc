"""A lean HTTP/1.1 keep-alive client for load generation.

A load generator must cost far less per request than the server it measures. A general client
(redirects, cookies, header objects, body streams) costs more per request than a small server
does, so this one writes pre-encoded request bytes on raw asyncio transports and lets
`httptools` (the llhttp parser) parse the answers; it reads only the status and the body's end.
"""

from __future__ import annotations

import asyncio
import time
from typing import cast
from urllib.parse import urlsplit

import httptools


class Disconnected(ConnectionError):
    """The server closed the connection before answering."""


class RequestTimeout(TimeoutError):
    """No complete answer within the timeout."""


def encode_post(url: str, body: bytes, headers: dict[str, str]) -> bytes:
    """The full bytes of one POST request, built once and reused for every send."""
    parts = urlsplit(url)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    head = [f"POST {path} HTTP/1.1", f"Host: {parts.netloc}", f"Content-Length: {len(body)}"]
    head += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


class _Connection(asyncio.Protocol):
    __slots__ = ("_parser", "_status", "_transport", "_waiter", "busy_since", "closed")

    def __init__(self) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self._waiter: asyncio.Future[int] | None = None
        self._status = 0
        self.busy_since = 0.0
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
        self.busy_since = 0.0
        if waiter is not None and not waiter.done():
            waiter.set_result(self._status)
        if not self._parser.should_keep_alive():
            self.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(Disconnected(str(exc) if exc else "connection closed by the server"))

    def _fail(self, error: Exception) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)

    def send(self, raw: bytes, loop: asyncio.AbstractEventLoop) -> asyncio.Future[int]:
        assert self._transport is not None
        waiter = self._waiter = loop.create_future()
        self.busy_since = time.perf_counter()
        self._transport.write(raw)
        return waiter

    def time_out(self) -> None:
        self._fail(RequestTimeout("no answer within the timeout"))
        self.abort()

    def abort(self) -> None:
        self.closed = True
        if self._transport is not None:
            self._transport.abort()


class ConnectionPool:
    """Keep-alive connections to one host, at most `limit` open; LIFO reuse keeps them warm."""

    def __init__(self, url: str, limit: int, timeout_s: float) -> None:
        parts = urlsplit(url)
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or 80
        self._limit = limit
        self._timeout_s = timeout_s
        self._idle: list[_Connection] = []
        self._all: set[_Connection] = set()
        self._slots = asyncio.Semaphore(limit)
        self._sweeper: asyncio.Task[None] | None = None

    async def __aenter__(self) -> ConnectionPool:
        self._sweeper = asyncio.create_task(self._sweep())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        for connection in self._all:
            connection.abort()

    @property
    def saturated(self) -> bool:
        return self._slots.locked()

    async def post(self, raw: bytes) -> int:
        """Send one pre-encoded request; returns the response status."""
        async with self._slots:
            connection = await self._acquire()
            try:
                status = await connection.send(raw, asyncio.get_running_loop())
            except BaseException:
                connection.abort()
                self._all.discard(connection)
                raise
            self._idle.append(connection)
            return status

    async def _acquire(self) -> _Connection:
        while self._idle:
            connection = self._idle.pop()
            if not connection.closed:
                return connection
            self._all.discard(connection)
        loop = asyncio.get_running_loop()
        _, connection = await loop.create_connection(_Connection, self._host, self._port)
        self._all.add(connection)
        return connection

    async def _sweep(self) -> None:
        # One periodic check instead of a timer per request: timers would cost more than the
        # request itself at tens of thousands of requests per second.
        while True:
            await asyncio.sleep(min(0.5, self._timeout_s / 4))
            deadline = time.perf_counter() - self._timeout_s
            for connection in list(self._all):
                if connection.busy_since and connection.busy_since < deadline:
                    connection.time_out()
