"""Structured access logs: one JSON line per request, written off the request's path.

`record` only appends a tuple; a flush scheduled on the event loop (at most every 250 ms, and
only while there is something to write) formats and writes them together.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections import deque

import orjson

from batchserve.call import Result

log = logging.getLogger("batchserve.access")

# (time, request id, trace id, model, status, seconds, batch rows, cache, bytes in, bytes out,
# protocol): a gRPC call's status is the one HTTP gives the same outcome.
Entry = tuple[float, str, str | None, str, int, float, int, str, int, int, str]


def trace_id(traceparent: str | None) -> str | None:
    """The trace id of a W3C `traceparent` header (version-traceid-parentid-flags), if valid."""
    if not traceparent:
        return None
    parts = traceparent.strip().split("-")
    if len(parts) != 4 or len(parts[1]) != 32 or parts[1] == "0" * 32:
        return None
    try:
        int(parts[1], 16)
    except ValueError:
        return None
    return parts[1]


class RequestIds:
    """Cheap unique ids for requests that arrive without `X-Request-ID`: process prefix + count."""

    __slots__ = ("_counter", "_prefix")

    def __init__(self) -> None:
        self._prefix = os.urandom(4).hex()
        self._counter = itertools.count(1)

    def next(self) -> str:
        return f"{self._prefix}-{next(self._counter):x}"


class AccessLog:
    __slots__ = ("_buffer", "_dropped", "_scheduled", "enabled")

    def __init__(self, enabled: bool, max_buffered: int = 100_000) -> None:
        self.enabled = enabled
        self._buffer: deque[Entry] = deque(maxlen=max_buffered)
        self._scheduled = False
        self._dropped = 0

    def record_call(
        self,
        request_id: str,
        traceparent: str | None,
        model: str,
        status: int,
        elapsed: float,
        served: Result | None,
        received: int,
        sent: int,
        protocol: str,
    ) -> None:
        """One answered call, from any front end. A call that failed still says how far it got
        (a cache miss, the batch that failed)."""
        rows, cache = (served.batch_rows, served.cache) if served is not None else (0, "off")
        self.record((wall_clock(), request_id, trace_id(traceparent), model, status, elapsed,
                     rows, cache, received, sent, protocol))  # fmt: skip

    def record(self, entry: Entry) -> None:
        if len(self._buffer) == self._buffer.maxlen:
            self._dropped += 1  # a stuck log sink must not grow memory without bound
        self._buffer.append(entry)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_later(0.25, self.flush)

    def flush(self) -> None:
        self._scheduled = False
        buffer, self._buffer = self._buffer, deque(maxlen=self._buffer.maxlen)
        for entry in buffer:
            ts, rid, trace, model, status, latency, rows, cache, received, sent, protocol = entry
            log.info(
                orjson.dumps(
                    {
                        "ts": round(ts, 6), "request_id": rid, "trace_id": trace,
                        "model": model, "status": status, "latency_ms": round(latency * 1e3, 3),
                        "batch_rows": rows, "cache": cache,
                        "request_bytes": received, "response_bytes": sent,
                        "protocol": protocol,
                    }
                ).decode()
            )  # fmt: skip
        if self._dropped:
            log.warning("dropped %d access log lines (the log sink is too slow)", self._dropped)
            self._dropped = 0


def wall_clock() -> float:
    return time.time()  # a timestamp for humans, not a duration
