"""Tier 2: Redis shared by every replica, behind tight timeouts and a circuit breaker.

Redis must never make the server slower or less available than no Redis: reads give up after
`timeout_s` (a miss), writes run in the background off the request's path (bounded; extra
writes are dropped), and after `failure_threshold` errors in a row the breaker skips Redis for
`reset_after_s` before one trial call.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from batchserve.cache import codec
from batchserve.cache.breaker import CircuitBreaker, CircuitState
from batchserve.cache.codec import Outputs
from batchserve.clock import Clock
from batchserve.lifecycle import Lifecycle

log = logging.getLogger("batchserve.cache")


@dataclass(slots=True)
class RedisStatistics:
    hits: int = 0
    misses: int = 0
    errors: int = 0
    skipped: int = 0  # calls not made because the circuit was open
    writes: int = 0
    writes_dropped: int = 0
    circuit: str = "closed"
    circuit_opened: int = 0


class RedisTier(Lifecycle):
    def __init__(
        self,
        url: str,
        clock: Clock,
        *,
        ttl_s: float,
        timeout_s: float = 0.05,
        prefix: bytes = b"batchserve:",
        max_pending_writes: int = 256,
        failure_threshold: int = 3,
        reset_after_s: float = 5.0,
    ) -> None:
        self._client = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry_on_timeout=False,
            health_check_interval=0,
            # After a Redis restart every pooled connection is dead; one immediate retry on a
            # fresh connection turns each of those into a success instead of an error that
            # would open the breaker again. Timeouts are never retried (they cost the budget).
            retry=Retry(NoBackoff(), 1),
            retry_on_error=[RedisConnectionError],
        )
        self._ttl_ms = max(1, int(ttl_s * 1000))
        self._prefix = prefix
        self._breaker = CircuitBreaker(clock, failure_threshold, reset_after_s)
        self._timeout = timeout_s
        self._writes: set[asyncio.Task[None]] = set()
        self._max_pending = max_pending_writes
        self._stats = RedisStatistics()

    async def start(self) -> None:
        """Nothing to wait for: the client connects on first use, and a Redis that is down
        must not keep the server from starting."""

    async def get(self, key: bytes) -> tuple[bytes, Outputs] | None:
        """The stored value and the arrays decoded from it, or None (a miss, an error, a
        skipped call or a value that does not decode exactly)."""
        if not self._breaker.allow():
            self._stats.skipped += 1
            return None
        try:
            async with asyncio.timeout(self._timeout):
                raw = await self._client.get(self._prefix + key)
        except (RedisError, OSError, TimeoutError) as err:
            self._failed(err)
            return None
        self._breaker.success()
        if not isinstance(raw, bytes):
            self._stats.misses += 1
            return None
        try:
            outputs = codec.loads(raw)
        except ValueError as err:  # never serve what we cannot read back exactly
            log.warning("ignoring an unreadable cache entry: %s", err)
            self._stats.misses += 1
            return None
        self._stats.hits += 1
        return raw, outputs

    def put_later(self, key: bytes, value: bytes) -> None:
        """Store `value` (`codec.dumps` of the outputs) in the background; the caller never
        waits for Redis."""
        if len(self._writes) >= self._max_pending or self._breaker.state is CircuitState.OPEN:
            self._stats.writes_dropped += 1
            return
        task = asyncio.get_running_loop().create_task(self._put(key, value))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _put(self, key: bytes, value: bytes) -> None:
        if not self._breaker.allow():
            self._stats.writes_dropped += 1
            return
        try:
            async with asyncio.timeout(self._timeout * 4):
                await self._client.set(self._prefix + key, value, px=self._ttl_ms)
        except (RedisError, OSError, TimeoutError) as err:
            self._failed(err)
            return
        self._breaker.success()
        self._stats.writes += 1

    def _failed(self, err: BaseException) -> None:
        self._stats.errors += 1
        before = self._breaker.opened
        self._breaker.failure()
        if self._breaker.opened != before:
            log.warning("redis unavailable (%s): using the local cache only for now", err)

    async def aclose(self) -> None:
        if self._writes:
            await asyncio.wait(set(self._writes), timeout=1.0)
        for task in self._writes:
            task.cancel()
        await self._client.aclose()

    def statistics(self) -> RedisStatistics:
        stats = self._stats
        return RedisStatistics(
            stats.hits, stats.misses, stats.errors, stats.skipped, stats.writes,
            stats.writes_dropped, self._breaker.state.name.lower(), self._breaker.opened,
        )  # fmt: skip
