"""Compact binary form of a set of named arrays, for Redis (no JSON floats, no pickle)."""

from __future__ import annotations

import struct

import numpy as np

from batchserve.datatypes import V2_TO_NUMPY, v2_name

MAGIC = b"BSC1"
_U32 = struct.Struct("<I")

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
    """The inverse of `dumps`; ValueError for anything that is not exactly such a value."""
    if not data.startswith(MAGIC):
        raise ValueError("not a cached value")
    view, offset = memoryview(data), len(MAGIC)
    (count,), offset = _U32.unpack_from(view, offset), offset + 4
    outputs: Outputs = {}
    try:
        for _ in range(count):
            name, offset = _read_text(view, offset)
            datatype, offset = _read_text(view, offset)
            (ndim,) = _U32.unpack_from(view, offset)
            shape = struct.unpack_from(f"<{ndim}Q", view, offset + 4)
            offset += 4 + 8 * ndim
            (size,) = struct.unpack_from("<Q", view, offset)
            offset += 8
            blob = view[offset : offset + size]
            if len(blob) != size:
                raise ValueError("truncated")
            offset += size
            outputs[name] = _array(datatype, shape, blob)
    except (struct.error, KeyError, UnicodeDecodeError) as err:
        raise ValueError(f"corrupt cached value: {err}") from None
    if offset != len(view):
        raise ValueError("trailing bytes in cached value")
    return outputs


def _array(datatype: str, shape: tuple[int, ...], blob: memoryview) -> np.ndarray:
    count = int(np.prod(shape)) if shape else 1
    if datatype == "BYTES":
        values, offset = [], 0
        for _ in range(count):
            value, offset = _read_text(blob, offset)
            values.append(value)
        array = np.empty(count, dtype=object)
        array[:] = values
        return array.reshape(shape)
    dtype = V2_TO_NUMPY[datatype].newbyteorder("<")
    return (
        np.frombuffer(blob, dtype=dtype, count=count).reshape(shape).astype(dtype.newbyteorder("="))
    )


def _text(value: str) -> bytes:
    raw = value.encode()
    return _U32.pack(len(raw)) + raw


def _read_text(view: memoryview, offset: int) -> tuple[str, int]:
    (length,) = _U32.unpack_from(view, offset)
    end = offset + 4 + length
    if end > len(view):
        raise struct.error("truncated text")
    return bytes(view[offset + 4 : end]).decode(), end
