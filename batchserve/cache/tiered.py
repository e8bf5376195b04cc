"""The response cache: local LRU, then Redis, then one shared computation per key.

Every caller gets arrays of its own: a hit, and each caller that waited for an identical request
in flight, decodes new arrays from the stored bytes, so no caller can see another's writes or
change a stored answer."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from batchserve.cache import codec
from batchserve.cache.codec import Outputs
from batchserve.cache.lru import ByteLRU, LRUStatistics
from batchserve.cache.redis_tier import RedisStatistics, RedisTier
from batchserve.errors import DeadlineExceeded, Overloaded
from batchserve.lifecycle import Lifecycle


class _LeaderGone(Exception):
    """The request computing a key was cancelled, or refused for its own deadline; a waiting
    duplicate takes over (with its own deadline)."""


@dataclass(frozen=True, slots=True)
class CacheStatistics:
    local: LRUStatistics
    redis: RedisStatistics | None
    coalesced: int  # requests that waited for an identical one in flight instead of computing


class ResponseCache(Lifecycle):
    """`get_or_compute(key, compute)`: a hit from either tier, or the result of the single
    computation of that key in flight (single-flight), which then fills both tiers."""

    def __init__(self, local: ByteLRU, redis: RedisTier | None = None) -> None:
        self._local = local
        self._redis = redis
        # The encoded answer: each waiting duplicate decodes its own arrays from it.
        self._in_flight: dict[bytes, asyncio.Future[bytes]] = {}
        self._coalesced = 0

    async def start(self) -> None:
        if self._redis is not None:
            await self._redis.start()

    async def aclose(self) -> None:
        """Close the Redis tier (its pending writes get a moment to finish)."""
        if self._redis is not None:
            await self._redis.aclose()

    def local_hit(self, key: bytes) -> Outputs | None:
        """New arrays decoded from the local tier's entry, or None."""
        value = self._local.get(key) if self._local.enabled else None
        return codec.loads(value) if value is not None else None

    async def get_or_compute(
        self, key: bytes, compute: Callable[[], Awaitable[Outputs]], *, checked_local: bool = False
    ) -> Outputs:
        """`checked_local`: the caller has just missed the local tier (count that once)."""
        while True:
            if not checked_local and (hit := self.local_hit(key)) is not None:
                return hit
            checked_local = False
            leader = self._in_flight.get(key)
            if leader is None:
                return await self._lead(key, compute)
            self._coalesced += 1
            with contextlib.suppress(_LeaderGone):
                # Shielded: this caller's cancellation must not cancel the shared result.
                return codec.loads(await asyncio.shield(leader))

    async def _lead(self, key: bytes, compute: Callable[[], Awaitable[Outputs]]) -> Outputs:
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._in_flight[key] = future
        try:
            found = await self._redis.get(key) if self._redis is not None else None
            if found is not None:
                value, outputs = found
            else:
                outputs = await compute()
                # Encoded before the caller gets `outputs`: its later writes change nothing here.
                value = codec.dumps(outputs)
                if self._redis is not None:
                    self._redis.put_later(key, value)
            if self._local.enabled:
                self._local.put(key, value)
        except (asyncio.CancelledError, Overloaded, DeadlineExceeded):
            # The leader's own deadline or cancellation: not an answer for the others.
            future.set_exception(_LeaderGone())
            raise
        except BaseException as err:
            future.set_exception(err)
            raise
        else:
            future.set_result(value)
            return outputs
        finally:
            del self._in_flight[key]
            if not future.cancelled() and future.exception() is not None:
                future.exception()  # mark retrieved: followers may be none

    def statistics(self) -> CacheStatistics:
        redis = self._redis.statistics() if self._redis is not None else None
        return CacheStatistics(self._local.statistics(), redis, self._coalesced)
