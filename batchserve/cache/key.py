"""The cache key: a BLAKE2b digest over everything that determines a response."""

from __future__ import annotations

import functools
import hashlib
import struct
from collections.abc import Mapping, Sequence

import numpy as np

# v2: string elements carry their type. A new personalisation gives every key a new value, so
# no replica reads an entry written under the old encoding from a shared Redis.
_PERSON = b"batchserve-v2"


def cache_key(
    model: str,
    version: str,
    inputs: Mapping[str, np.ndarray],
    outputs: Sequence[str] | None = None,
) -> bytes:
    """A 32-byte digest of model, version, requested outputs and every input's name, dtype,
    shape and bytes (object arrays: each element's type, str or bytes, then its length and
    bytes). Every variable-length field is hashed after its length, so no two
    different requests produce the same byte stream (only a BLAKE2b collision could share a
    key). One hash call over the joined fields: per-call overhead dominates for small inputs."""
    parts: list[bytes | memoryview] = [
        _prefix(model, version, tuple(sorted(outputs)) if outputs else (), len(inputs))
    ]
    for name in sorted(inputs) if len(inputs) > 1 else inputs:
        array = inputs[name]
        parts.append(_array_header(name, array.dtype.str, array.shape))
        if array.dtype.kind == "O":
            parts.extend(_strings(array))
        else:
            data = array if array.flags.c_contiguous else np.ascontiguousarray(array)
            parts.append(struct.pack("<Q", data.nbytes))
            # memoryview cannot cast an empty array's view; its nbytes (0) already says it all.
            parts.append(data.data.cast("B") if data.size else b"")
    return hashlib.blake2b(b"".join(parts), digest_size=32, person=_PERSON).digest()


@functools.lru_cache(maxsize=1024)
def _prefix(model: str, version: str, outputs: tuple[str, ...], count: int) -> bytes:
    fields = [_field(model.encode()), _field(version.encode()), struct.pack("<I", len(outputs))]
    fields += [_field(name.encode()) for name in outputs]
    return b"".join([*fields, struct.pack("<I", count)])


@functools.lru_cache(maxsize=4096)
def _array_header(name: str, dtype: str, shape: tuple[int, ...]) -> bytes:
    dims = struct.pack(f"<I{len(shape)}Q", len(shape), *shape)
    return _field(name.encode()) + _field(dtype.encode()) + dims


def _strings(array: np.ndarray) -> list[bytes]:
    # A type tag per element: "a" and b"a" are different inputs (the model sees str only, so
    # `ModelMetadata.validate` converts before keys are made, and equal requests still share).
    parts = []
    for value in array.flat:
        if isinstance(value, str):
            parts.append(b"s" + _field(value.encode("utf-8", "surrogatepass")))
        elif isinstance(value, bytes):
            parts.append(b"b" + _field(value))
        else:
            raise ValueError(
                f"cannot key an object array holding {type(value).__name__}: only str and bytes"
            )
    return parts


def _field(data: bytes) -> bytes:
    return struct.pack("<Q", len(data)) + data
