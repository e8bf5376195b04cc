"""Tier 1: an in-process LRU bounded by the bytes of what it holds, not by entry count."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

Outputs = dict[str, np.ndarray]


def outputs_nbytes(outputs: Outputs) -> int:
    # Object arrays (BYTES) hold pointers; count their strings too so the bound means something.
    total = 0
    for array in outputs.values():
        total += array.nbytes
        if array.dtype.kind == "O":
            total += sum(len(v) for v in array.flat if isinstance(v, str | bytes))
    return total


@dataclass(slots=True)
class LRUStatistics:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    entries: int = 0
    bytes: int = 0
    capacity_bytes: int = 0


class ByteLRU:
    """Least-recently-used entries go first once the total size passes `capacity_bytes`.

    Stored arrays are read-only so a caller cannot change what a later hit returns.
    """

    def __init__(self, capacity_bytes: int) -> None:
        if capacity_bytes < 0:
            raise ValueError("capacity_bytes must be >= 0")
        self._capacity = capacity_bytes
        self._entries: OrderedDict[bytes, tuple[Outputs, int]] = OrderedDict()
        self._bytes = 0
        self._stats = LRUStatistics(capacity_bytes=capacity_bytes)

    @property
    def enabled(self) -> bool:
        return self._capacity > 0

    def get(self, key: bytes) -> Outputs | None:
        entry = self._entries.get(key)
        if entry is None:
            self._stats.misses += 1
            return None
        self._entries.move_to_end(key)
        self._stats.hits += 1
        return entry[0]

    def put(self, key: bytes, outputs: Outputs) -> None:
        size = outputs_nbytes(outputs) + len(key)
        if size > self._capacity:
            return  # larger than the whole cache: keeping it would evict everything else
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= old[1]
        frozen = {name: _frozen(array) for name, array in outputs.items()}
        self._entries[key] = (frozen, size)
        self._bytes += size
        while self._bytes > self._capacity:
            _, (_, evicted) = self._entries.popitem(last=False)
            self._bytes -= evicted
            self._stats.evictions += 1

    def clear(self) -> None:
        self._entries.clear()
        self._bytes = 0

    def statistics(self) -> LRUStatistics:
        stats = self._stats
        return LRUStatistics(
            stats.hits, stats.misses, stats.evictions, len(self._entries), self._bytes,
            self._capacity,
        )  # fmt: skip


def _frozen(array: np.ndarray) -> np.ndarray:
    # A copy: the batch's output buffer must not stay alive for one row, nor change under us.
    copy = np.array(array, copy=True)
    copy.flags.writeable = False
    return copy
