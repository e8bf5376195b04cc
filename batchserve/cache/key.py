"""The cache key: a BLAKE2b digest over everything that determines a response."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

_SEP = b"\x00"


def cache_key(
    model: str,
    version: str,
    inputs: Mapping[str, np.ndarray],
    outputs: Sequence[str] | None = None,
) -> bytes:
    """A 32-byte digest of model, version, requested outputs and every input's name, dtype,
    shape and bytes. Lengths are hashed before variable-length fields, so no two different
    requests can produce the same byte stream (only a BLAKE2b collision could share a key)."""
    digest = hashlib.blake2b(digest_size=32, person=b"batchserve-v1")
    _field(digest, model.encode())
    _field(digest, version.encode())
    names = sorted(outputs) if outputs else []
    digest.update(struct.pack("<I", len(names)))
    for name in names:
        _field(digest, name.encode())
    digest.update(struct.pack("<I", len(inputs)))
    for name in sorted(inputs):
        array = inputs[name]
        _field(digest, name.encode())
        _field(digest, array.dtype.str.encode())
        digest.update(struct.pack(f"<I{array.ndim}Q", array.ndim, *array.shape))
        if array.dtype.kind == "O":
            for value in array.flat:
                _field(digest, value if isinstance(value, bytes) else str(value).encode())
        else:
            _field(digest, np.ascontiguousarray(array).data.cast("B"))
    return digest.digest()


def _field(digest: Any, data: bytes | memoryview) -> None:
    digest.update(struct.pack("<Q", len(data)))
    digest.update(data)
