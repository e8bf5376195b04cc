"""Compact binary form of a set of named arrays, for Redis (no JSON floats, no pickle)."""

from __future__ import annotations

import math
import struct

import numpy as np

from batchserve.datatypes import V2_TO_NUMPY, v2_name

MAGIC = b"BSC1"
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")

# A model's answer: its outputs by name (what the engine returns and the cache stores).
Outputs = dict[str, np.ndarray]


def dumps(outputs: Outputs) -> bytes:
    """MAGIC, count, then per array: name, V2 datatype, rank, dims, payload (all length-prefixed).
    BYTES payloads are a u32 length + UTF-8 bytes per element."""
    parts = [MAGIC, _U32.pack(len(outputs))]
    for name, array in outputs.items():
        datatype = v2_name(array.dtype)
        parts += [_text(name), _text(datatype), _U32.pack(array.ndim)]
        parts.append(struct.pack(f"<{array.ndim}Q", *array.shape))
        if datatype == "BYTES":
            blob = b"".join(_text(v if isinstance(v, str) else v.decode()) for v in array.flat)
        else:
            blob = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
        parts += [struct.pack("<Q", len(blob)), blob]
    return b"".join(parts)


def loads(data: bytes) -> Outputs:
    """The inverse of `dumps`, into new writable arrays; ValueError for anything that is not
    exactly such a value."""
    if not data.startswith(MAGIC):
        raise ValueError("not a cached value")
    outputs: Outputs = {}
    try:
        (count,) = _U32.unpack_from(data, len(MAGIC))
        offset = len(MAGIC) + 4
        for _ in range(count):
            name, offset = _read_text(data, offset)
            datatype, offset = _read_text(data, offset)
            (ndim,) = _U32.unpack_from(data, offset)
            shape = struct.unpack_from(f"<{ndim}Q", data, offset + 4)
            offset += 4 + 8 * ndim
            (size,) = _U64.unpack_from(data, offset)
            offset += 8
            if offset + size > len(data):
                raise ValueError("truncated")
            outputs[name] = _array(datatype, shape, data, offset, size)
            offset += size
    except (struct.error, KeyError, UnicodeDecodeError, ValueError) as err:
        raise ValueError(f"corrupt cached value: {err}") from None
    if offset != len(data):
        raise ValueError("trailing bytes in cached value")
    return outputs


# Looked up, not derived, on every hit: building dtypes costs more than decoding a small answer.
_WIRE = {name: dtype.newbyteorder("<") for name, dtype in V2_TO_NUMPY.items() if name != "BYTES"}
_NATIVE = {name: dtype.newbyteorder("=") for name, dtype in _WIRE.items()}


def _array(
    datatype: str, shape: tuple[int, ...], data: bytes, offset: int, size: int
) -> np.ndarray:
    count = math.prod(shape)
    if datatype == "BYTES":
        values, end = [], offset + size
        for _ in range(count):
            value, offset = _read_text(data, offset, end)
            values.append(value)
        if offset != end:
            raise ValueError("BYTES payload longer than its elements")
        array = np.empty(count, dtype=object)
        array[:] = values
        return array.reshape(shape)
    wire = _WIRE[datatype]
    if size != count * wire.itemsize:
        raise ValueError(f"{size} payload bytes for {count} {datatype} elements")
    # astype copies: the arrays are the caller's own, never a view of the stored bytes.
    return np.frombuffer(data, wire, count, offset).astype(_NATIVE[datatype]).reshape(shape)


def _text(value: str) -> bytes:
    raw = value.encode()
    return _U32.pack(len(raw)) + raw


def _read_text(data: bytes, offset: int, limit: int | None = None) -> tuple[str, int]:
    (length,) = _U32.unpack_from(data, offset)
    end = offset + 4 + length
    if end > (len(data) if limit is None else limit):
        raise ValueError("truncated text")
    return data[offset + 4 : end].decode(), end
