"""Tier 1: an in-process LRU bounded by the memory its entries take, not by entry count.

Values are the cache codec's bytes (`batchserve.cache.codec`), not arrays: one immutable object
per entry is both what keeps the size honest (a dict of numpy arrays costs about 600 bytes of
Python objects for 40 bytes of data) and what makes a stored answer impossible to change, since
every hit decodes into new arrays.
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from dataclasses import dataclass


def entry_size(key: bytes, value: bytes) -> int:
    """The memory of an entry's key and value objects, each rounded up to the allocator's
    16-byte blocks. The table that holds them is counted as a whole (`ByteLRU.nbytes`)."""
    return _block(sys.getsizeof(key)) + _block(sys.getsizeof(value))


def _block(size: int) -> int:
    return (size + 15) & ~15


@dataclass(slots=True)
class LRUStatistics:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    entries: int = 0
    bytes: int = 0
    capacity_bytes: int = 0


class ByteLRU:
    """Least-recently-used entries go first once the total size passes `capacity_bytes`."""

    def __init__(self, capacity_bytes: int) -> None:
        if capacity_bytes < 0:
            raise ValueError("capacity_bytes must be >= 0")
        self._capacity = capacity_bytes
        self._entries: OrderedDict[bytes, bytes] = OrderedDict()
        self._bytes = 0  # of keys and values; `nbytes` adds the table
        self._stats = LRUStatistics(capacity_bytes=capacity_bytes)

    @property
    def enabled(self) -> bool:
        return self._capacity > 0

    @property
    def nbytes(self) -> int:
        """Memory held: keys and values, plus the OrderedDict itself as `sys.getsizeof` sees
        it (hash table, node array and one linked-list node per entry: 120 to 200 bytes an
        entry, depending on how full the table is since it last grew)."""
        return self._bytes + sys.getsizeof(self._entries)

    def get(self, key: bytes) -> bytes | None:
        value = self._entries.get(key)
        if value is None:
            self._stats.misses += 1
            return None
        self._entries.move_to_end(key)
        self._stats.hits += 1
        return value

    def put(self, key: bytes, value: bytes) -> None:
        # bytes(...) so a bytes subclass or a caller's buffer cannot be kept and changed later.
        key, value = bytes(key), bytes(value)
        size = entry_size(key, value)
        if size > self._capacity:
            return  # larger than the whole cache: keeping it would evict everything else
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= entry_size(key, old)
        self._entries[key] = value
        self._bytes += size
        # The table does not shrink as entries leave, so counting it keeps the total honest
        # right after it grows, when it is at its emptiest.
        while self.nbytes > self._capacity and self._entries:
            evicted_key, evicted = self._entries.popitem(last=False)
            self._bytes -= entry_size(evicted_key, evicted)
            self._stats.evictions += 1

    def clear(self) -> None:
        self._entries.clear()
        self._bytes = 0

    def statistics(self) -> LRUStatistics:
        stats = self._stats
        return LRUStatistics(
            stats.hits, stats.misses, stats.evictions, len(self._entries), self.nbytes,
            self._capacity,
        )  # fmt: skip
