"""Decode V2 inference requests into numpy arrays and encode results, JSON or binary."""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from math import prod
from typing import Any, Final

import numpy as np
import orjson

from batchserve.datatypes import V2_TO_NUMPY, v2_name
from batchserve.errors import InvalidInput, PayloadTooLarge

HEADER_LENGTH: Final = "Inference-Header-Content-Length"
_NUMPY: Final = orjson.OPT_SERIALIZE_NUMPY
_DTYPES: Final = V2_TO_NUMPY
_LENGTH = struct.Struct("<I")


@dataclass(slots=True)
class InferRequest:
    inputs: dict[str, np.ndarray]
    outputs: list[str] | None = None
    binary_outputs: frozenset[str] | None = None  # None: none binary; empty: all binary
    id: str | None = None
    parameters: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class DecodeLimits:
    """What one request may declare, checked before any tensor is built.

    max_inputs: input tensors per request (400 above it).
    max_elements: elements per tensor (413 above it): bounds the memory one request can make
        the server allocate, independently of how compactly the body encodes it. Zero
        dimensions count as one here: `[20000000, 0]` holds no element but still asks a model
        for 20,000,000 rows of output, so every dimension, and the product of the non-zero
        ones, must stay within it.
    max_rank: dimensions per tensor (400 above it; numpy itself stops at 64).
    """

    max_inputs: int = 64
    max_elements: int = 1 << 24
    max_rank: int = 32


DEFAULT_LIMITS: Final = DecodeLimits()


def decode_request(
    body: bytes,
    header_length: int | None = None,
    limits: DecodeLimits = DEFAULT_LIMITS,
    *,
    raw_bytes: bool = False,
) -> InferRequest:
    """Parse a request body; `header_length` is the binary extension's JSON header length.
    `raw_bytes`: binary BYTES elements stay `bytes` (an encoded image for a handler) instead
    of being decoded as UTF-8 text."""
    blob: bytes | memoryview = b""
    if header_length is None:
        header = _loads(body)
    else:
        if not 0 <= header_length <= len(body):
            raise InvalidInput(
                f"{HEADER_LENGTH} is {header_length} but the body has {len(body)} bytes"
            )
        view = memoryview(body)
        header, blob = _loads(view[:header_length]), view[header_length:]
    if not isinstance(header, dict):
        raise InvalidInput("the request body must be a JSON object")
    inputs = _decode_inputs(header.get("inputs"), blob, limits, raw_bytes)
    outputs, binary = _decode_outputs(header)
    parameters = header.get("parameters")
    if parameters is not None and not isinstance(parameters, dict):
        raise InvalidInput("'parameters' must be an object")
    request_id = header.get("id")
    # The protocol's id is a string; null is taken as absent (clients write unset fields so).
    if request_id is not None and type(request_id) is not str:
        raise InvalidInput(f"'id' must be a string, got {_json_kind(request_id)}")
    return InferRequest(inputs, outputs, binary, request_id, parameters)


def _json_kind(value: Any) -> str:
    kinds = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list"}
    return kinds.get(type(value), "an object")


def _loads(data: bytes | memoryview) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as err:
        raw = bytes(data)
        if b"NaN" not in raw and b"Infinity" not in raw:
            raise InvalidInput(f"malformed JSON: {err}") from None
        # Triton and tritonclient write non-finite floats as NaN/Infinity/-Infinity, which
        # orjson refuses; the standard library reads them (only on this rare path).
        try:
            return json.loads(raw)
        except (ValueError, RecursionError) as fallback:
            raise InvalidInput(f"malformed JSON: {fallback}") from None


def _decode_inputs(
    specs: Any, blob: bytes | memoryview, limits: DecodeLimits, raw_bytes: bool = False
) -> dict[str, np.ndarray]:
    if type(specs) is not list or not specs:
        raise InvalidInput("'inputs' must be a non-empty list")
    if len(specs) > limits.max_inputs:
        raise InvalidInput(f"{len(specs)} inputs in one request; the limit is {limits.max_inputs}")
    arrays: dict[str, np.ndarray] = {}
    offset = 0
    for spec in specs:
        if type(spec) is not dict:
            raise InvalidInput("each input must be an object")
        name, shape, dtype = _tensor_header(spec)
        check_size(name, shape, dtype, limits)
        if name in arrays:
            raise InvalidInput(f"input {name!r} appears twice")
        size = _binary_size(name, spec["parameters"]) if "parameters" in spec else None
        if size is None:
            arrays[name] = _from_json(name, spec.get("data"), shape, dtype)
        else:
            if offset + size > len(blob):
                raise InvalidInput(
                    f"input {name!r} declares binary_data_size {size} but only "
                    f"{len(blob) - offset} binary bytes remain"
                )
            arrays[name] = from_binary(name, blob[offset : offset + size], shape, dtype, raw_bytes)
            offset += size
    if offset != len(blob):
        raise InvalidInput(f"{len(blob) - offset} bytes of binary data follow the last tensor")
    return arrays


def _tensor_header(spec: Mapping[str, Any]) -> tuple[str, list[int], np.dtype[Any]]:
    name = spec.get("name")
    if type(name) is not str or not name:
        raise InvalidInput("each input needs a 'name' string")
    shape = spec.get("shape")
    if type(shape) is not list:
        raise InvalidInput(f"input {name!r}: 'shape' must be a list of non-negative integers")
    for dim in shape:
        if type(dim) is not int or dim < 0:  # `type is`: a JSON true is not a dimension
            raise InvalidInput(f"input {name!r}: 'shape' must be a list of non-negative integers")
    datatype = spec.get("datatype")
    dtype = _DTYPES.get(datatype) if type(datatype) is str else None
    if dtype is None:
        raise InvalidInput(
            f"input {name!r}: unknown datatype {datatype!r}; expected one of {list(V2_TO_NUMPY)}"
        )
    return name, shape, dtype


# numpy describes an array's size in bytes with a signed 64-bit integer, even an empty one's.
_MAX_NBYTES: Final = (1 << 63) - 1


def check_size(name: str, shape: list[int], dtype: np.dtype[Any], limits: DecodeLimits) -> None:
    """Refuse a tensor's declared shape past `limits`, before anything is built (shared by
    every codec of the protocol: HTTP's JSON and binary tensors, gRPC's)."""
    if len(shape) > limits.max_rank:
        raise InvalidInput(
            f"input {name!r} has {len(shape)} dimensions; the limit is {limits.max_rank}"
        )
    # A zero dimension empties the tensor but not what a model makes of the others (a sum
    # over the empty axis has one value per row), so the non-zero dimensions are bounded too.
    extent = prod(dim for dim in shape if dim)
    if extent * dtype.itemsize > _MAX_NBYTES:
        raise InvalidInput(f"input {name!r}: shape {shape} is too large for any tensor")
    if extent > limits.max_elements:
        count = prod(shape)
        described = (
            f"has {count} elements"
            if count
            else f"has no elements but dimensions whose product is {extent}"
        )
        raise PayloadTooLarge(
            f"input {name!r}: shape {shape} {described}; the limit is {limits.max_elements}"
        )


def _binary_size(name: str, parameters: Any) -> int | None:
    if not parameters:
        return None
    if type(parameters) is not dict:
        raise InvalidInput(f"input {name!r}: 'parameters' must be an object")
    size = parameters.get("binary_data_size")
    if size is None:
        return None
    if type(size) is not int or size < 0:
        raise InvalidInput(f"input {name!r}: binary_data_size must be an integer >= 0")
    return size


def _from_json(name: str, data: Any, shape: list[int], dtype: np.dtype[Any]) -> np.ndarray:
    if type(data) is not list:
        raise InvalidInput(f"input {name!r} needs 'data' (a list) or binary_data_size")
    try:
        array = _numbers(data, dtype) if dtype.kind != "O" else _strings(data)
    except (ValueError, TypeError, OverflowError) as err:
        raise InvalidInput(f"input {name!r}: data does not fit {v2_name(dtype)}: {err}") from None
    except RecursionError:
        raise InvalidInput(f"input {name!r}: data is nested too deeply") from None
    count = prod(shape)
    if array.size != count:
        raise InvalidInput(
            f"input {name!r}: shape {shape} needs {count} elements, data has {array.size}"
        )
    return array.reshape(shape)


# JSON value kinds (as numpy infers them) that each target kind accepts: numbers for floats,
# integers for integers, true/false for BOOL. Strings, nulls and floats for integers are refused
# rather than converted, because numpy's casts would silently parse, truncate or flip them.
_ACCEPTS: Final = {"f": "iuf", "i": "iu", "u": "iu", "b": "b"}


def _rounding_limit(dtype: type[np.floating[Any]]) -> float:
    # Values below the midpoint between the largest finite value and the next power of two
    # round to that largest value; from the midpoint on they become inf. (The largest float32
    # printed by a float32-aware encoder, 3.4028235e38, is above float32 max but rounds to it.)
    info = np.finfo(dtype)
    return float((2 - 2.0 ** -(info.nmant + 1)) * 2.0 ** (info.maxexp - 1))


_FLOAT_LIMITS: Final = {
    np.dtype(np.float16): _rounding_limit(np.float16),
    np.dtype(np.float32): _rounding_limit(np.float32),
}


def _numbers(data: list[Any], dtype: np.dtype[Any]) -> np.ndarray:
    inferred = np.asarray(data)  # one C pass; the kind tells which JSON values were present
    kind = inferred.dtype.kind
    target = dtype.kind
    if kind not in _ACCEPTS[target]:
        if not inferred.size:
            return inferred.astype(dtype)
        if target in "iu" and kind in "fO":
            return _big_integers(data, dtype)
        found = {"f": "numbers with a fraction", "b": "true/false", "i": "integers"}
        raise TypeError(f"got {found.get(kind, 'non-numeric values')}")
    if inferred.dtype == dtype:
        return inferred
    if target == "f":
        limit = _FLOAT_LIMITS.get(dtype)
        if limit is not None:
            if kind != "f":  # integers: in float64, so the squares below cannot wrap around
                inferred = inferred.astype(np.float64)
            # x·x bounds every x_i², so one BLAS call clears the common case; only a sum past
            # the limit needs the exact (slower) check. NaN and ±inf are values, not overflow.
            if np.vdot(inferred, inferred) >= limit * limit:
                magnitude = np.abs(inferred)
                if (magnitude[np.isfinite(magnitude)] >= limit).any():
                    raise OverflowError("a value is outside its range")
    elif target in "iu" and inferred.size:
        info = np.iinfo(dtype)
        if int(inferred.min()) < info.min or int(inferred.max()) > info.max:
            raise OverflowError("a value is outside its range")
    return inferred.astype(dtype)


def _big_integers(data: list[Any], dtype: np.dtype[Any]) -> np.ndarray:
    # numpy infers float64 (losing precision) when int64 and uint64-only values are mixed.
    flat: list[Any] = []
    _flatten(data, flat)
    if not all(type(v) is int for v in flat):
        raise TypeError("got values that are not integers")
    return np.array(flat, dtype=dtype)  # raises OverflowError outside the range


def _strings(data: list[Any]) -> np.ndarray:
    flat: list[Any] = []
    _flatten(data, flat)
    array = np.empty(len(flat), dtype=object)
    for i, value in enumerate(flat):
        if not isinstance(value, str):
            raise TypeError(f"element {i} is {type(value).__name__}, not a string")
        array[i] = value
    return array


def _flatten(data: list[Any], out: list[Any]) -> None:
    # Iterative: JSON may nest deeper than Python's recursion limit.
    stack = [iter(data)]
    while stack:
        for value in stack[-1]:
            if type(value) is list:
                stack.append(iter(value))
                break
            out.append(value)
        else:
            stack.pop()


def from_binary(
    name: str,
    raw: bytes | memoryview,
    shape: list[int],
    dtype: np.dtype[Any],
    raw_bytes: bool = False,
) -> np.ndarray:
    """A tensor from its binary form (see `to_binary`), without a copy where numpy allows;
    `raw_bytes`: BYTES elements stay bytes instead of being read as UTF-8 text."""
    count = prod(shape)
    if dtype.kind == "O":
        return _bytes_elements(name, raw, count, raw_bytes).reshape(shape)
    if len(raw) != count * dtype.itemsize:
        raise InvalidInput(
            f"input {name!r}: shape {list(shape)} of {v2_name(dtype)} needs "
            f"{count * dtype.itemsize} bytes, binary_data_size is {len(raw)}"
        )
    if dtype.kind == "b":
        # One byte per element, which a client may fill with any value: numpy and ONNX Runtime
        # take the byte as it is (a `Not` of 2 would be true), so any non-zero byte is true.
        return np.frombuffer(raw, dtype=np.uint8, count=count).astype(np.bool_).reshape(shape)
    return np.frombuffer(raw, dtype=dtype.newbyteorder("<"), count=count).reshape(shape)


def _bytes_elements(
    name: str, raw: bytes | memoryview, count: int, raw_bytes: bool = False
) -> np.ndarray:
    if count * 4 > len(raw):  # every element has a 4-byte length: refuse before allocating
        raise InvalidInput(
            f"input {name!r}: {count} BYTES elements need at least {count * 4} bytes, "
            f"binary_data_size is {len(raw)}"
        )
    array = np.empty(count, dtype=object)
    view, offset = memoryview(raw), 0
    for i in range(count):
        if offset + 4 > len(view):
            raise InvalidInput(f"input {name!r}: BYTES data ends inside element {i}")
        (length,) = _LENGTH.unpack_from(view, offset)
        offset += 4
        if offset + length > len(view):
            raise InvalidInput(f"input {name!r}: BYTES element {i} runs past the data")
        try:
            element = bytes(view[offset : offset + length])
            array[i] = element if raw_bytes else element.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidInput(f"input {name!r}: BYTES element {i} is not UTF-8") from None
        offset += length
    if offset != len(view):
        raise InvalidInput(f"input {name!r}: {len(view) - offset} bytes after the last element")
    return array


def _decode_outputs(header: Mapping[str, Any]) -> tuple[list[str] | None, frozenset[str] | None]:
    parameters = header.get("parameters")
    all_binary = False
    if isinstance(parameters, dict):
        all_binary = _flag(parameters.get("binary_data_output"), "parameters.binary_data_output")
    specs = header.get("outputs")
    if specs is None or specs == []:
        return None, frozenset() if all_binary else None
    if not isinstance(specs, list):
        raise InvalidInput("'outputs' must be a list")
    names: list[str] = []
    seen: set[str] = set()
    binary: set[str] = set()
    for spec in specs:
        name = spec.get("name") if isinstance(spec, dict) else None
        if not isinstance(name, str):
            raise InvalidInput("each requested output needs a 'name' string")
        if name in seen:  # the tensor would be sent twice
            raise InvalidInput(f"output {name!r} is requested twice")
        seen.add(name)
        names.append(name)
        if _output_binary(name, spec.get("parameters"), all_binary):
            binary.add(name)
    return names, frozenset(binary) if binary else None


def _output_binary(name: str, params: Any, all_binary: bool) -> bool:
    if params is None:
        return all_binary
    if type(params) is not dict:
        raise InvalidInput(f"output {name!r}: 'parameters' must be an object")
    if "classification" in params:
        raise InvalidInput(
            f"output {name!r}: the classification extension is not supported; "
            "ask for the tensor and take its top classes on the client"
        )
    flag = params.get("binary_data")
    return all_binary if flag is None else _flag(flag, f"output {name!r}: binary_data")


def _flag(value: Any, what: str) -> bool:
    """A boolean parameter: absent (None) is false; a string "true" or a 1 is refused rather
    than read as false, which would silently answer in the other encoding."""
    if value is None:
        return False
    if type(value) is not bool:
        raise InvalidInput(f"{what} must be true or false, got {_json_kind(value)}")
    return value


def encode_response(
    model_name: str,
    model_version: str,
    request: InferRequest,
    results: Mapping[str, np.ndarray],
    *,
    max_bytes: int | None = None,
) -> tuple[bytes, int | None]:
    """The response body, and the JSON header length when binary outputs follow it.

    `max_bytes`: PayloadTooLarge (413) for a body over it. When the outputs could encode past
    it (`response_size`), they are built piece by piece against it, so no more than about
    `max_bytes` is ever built for a response that is refused."""
    binary = request.binary_outputs
    budget = None
    if max_bytes is not None and response_size(request, results) > max_bytes:
        budget = _Budget(max_bytes, hint=binary is None)
    outputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    # In the order the client asked for (a cached answer may hold them in another order).
    for name in request.outputs or results:
        array = results[name]
        entry: dict[str, Any] = {
            "name": name,
            "datatype": v2_name(array.dtype),
            "shape": list(array.shape),
        }
        if binary is not None and (not binary or name in binary):
            blob = to_binary(array) if budget is None else budget.binary(array)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = _to_json(array) if budget is None else budget.json(array)
        outputs.append(entry)
    body: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request.id is not None:
        body["id"] = request.id
    if request.parameters:
        body["parameters"] = request.parameters
    body["outputs"] = outputs
    header = orjson.dumps(body, option=_NUMPY)
    # orjson writes NaN and ±inf as null; only then (rare) write them as Triton does.
    if b"null" in header and _non_finite(outputs):
        header = json.dumps(body, default=_array_list, separators=(",", ":")).encode()
    size = len(header) + sum(len(blob) for blob in blobs)
    if max_bytes is not None and size > max_bytes:
        raise PayloadTooLarge(f"the response takes {size} bytes, over the limit of {max_bytes}")
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)


class _Budget:
    """The bytes a response may still take, spent as its outputs are built: a numeric binary
    output before it is built (its size is known), a JSON one chunk by chunk."""

    __slots__ = ("_hint", "_left", "_limit")

    CHUNK: Final = 1 << 16  # elements encoded at a time

    def __init__(self, limit: int, *, hint: bool) -> None:
        self._limit = self._left = limit
        self._hint = hint  # all outputs are JSON: say binary would be smaller

    def spend(self, size: int) -> None:
        self._left -= size
        if self._left < 0:
            raise PayloadTooLarge(
                f"the response takes more than {self._limit} bytes, the limit"
                + ("; binary outputs take less" if self._hint else "")
            )

    def binary(self, array: np.ndarray) -> bytes:
        text = array.dtype.kind in "OSU"
        if not text:
            self.spend(array.nbytes)
        blob = to_binary(array)
        if text:
            self.spend(len(blob))
        return blob

    def json(self, array: np.ndarray) -> orjson.Fragment:
        if array.dtype.kind in "OSU":
            text = orjson.dumps(_to_json(array))
            self.spend(len(text))
            return orjson.Fragment(text)
        flat = np.ascontiguousarray(array).reshape(-1)
        pieces: list[memoryview] = []
        for start in range(0, flat.size, self.CHUNK):
            piece = _json_numbers(flat[start : start + self.CHUNK])
            self.spend(len(piece) - 1)  # less its brackets, plus a comma
            pieces.append(memoryview(piece)[1:-1])
        return orjson.Fragment(b"[" + b",".join(pieces) + b"]")


def _json_numbers(flat: np.ndarray) -> bytes:
    text = orjson.dumps(flat, option=_NUMPY)
    if b"null" in text and flat.dtype.kind in "fc" and not np.isfinite(flat).all():
        text = json.dumps(flat.tolist(), separators=(",", ":")).encode()  # NaN, ±Infinity
    return text


def _json_width(dtype: np.dtype[Any]) -> int:
    """The most bytes one element of `dtype` takes in a JSON response, its comma included:
    what orjson writes for the longest value (float16 and float32 are written at float32
    precision, 16 characters at most; float64 at most 24)."""
    if dtype.kind == "b":
        return len("false,")
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return max(len(str(info.min)), len(str(info.max))) + 1
    return 25 if dtype.itemsize > 4 else 17


_JSON_WIDTHS: Final = {
    dtype: _json_width(dtype) for dtype in V2_TO_NUMPY.values() if dtype.kind != "O"
}


def response_size(request: InferRequest, results: Mapping[str, np.ndarray]) -> int:
    """The encoded outputs' size at most, told without encoding them: binary ones at their
    exact size, JSON ones at their widest text. BYTES elements count at their length prefix
    or quotes only (their text is measured once encoded)."""
    binary = request.binary_outputs
    size = 0
    for name in request.outputs or results:
        array = results[name]
        if array.dtype.kind in "OSU":
            size += array.size * (4 if binary is not None else 3)
        elif binary is not None and (not binary or name in binary):
            size += array.nbytes
        else:
            width = _JSON_WIDTHS.get(array.dtype.newbyteorder("="), 25)
            size += array.size * width
    return size


def _non_finite(outputs: list[dict[str, Any]]) -> bool:
    for entry in outputs:
        data = entry.get("data")
        if isinstance(data, np.ndarray) and data.dtype.kind in "fc" and not np.isfinite(data).all():
            return True
    return False


def _array_list(value: Any) -> Any:
    if isinstance(value, np.ndarray | np.generic):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _to_json(array: np.ndarray) -> Any:
    if array.dtype.kind in "OSU":
        return [v.decode("utf-8", "replace") if isinstance(v, bytes) else v for v in array.flat]
    # orjson writes contiguous native-endian arrays directly, without Python floats.
    return np.ascontiguousarray(array).reshape(-1)


def to_binary(array: np.ndarray) -> bytes:
    """A tensor's bytes as the binary extension and gRPC's raw contents carry them: little
    endian, BYTES elements each after its 4-byte little-endian length."""
    if array.dtype.kind in "OSU":
        parts = []
        for value in array.flat:
            raw = value if isinstance(value, bytes) else str(value).encode("utf-8")
            parts.append(_LENGTH.pack(len(raw)))
            parts.append(raw)
        return b"".join(parts)
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def encode_request(
    inputs: Mapping[str, np.ndarray],
    *,
    binary: bool = False,
    outputs: list[str] | None = None,
    binary_outputs: bool = False,
    request_id: str | None = None,
    parameters: Mapping[str, Any] | None = None,
) -> tuple[bytes, int | None]:
    """A V2 request body (the client side), and its JSON header length when binary;
    `parameters`: the request's own (`priority`, `timeout`)."""
    tensors: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name, array in inputs.items():
        entry: dict[str, Any] = {
            "name": name,
            "shape": list(array.shape),
            "datatype": v2_name(array.dtype),
        }
        if binary:
            blob = to_binary(array)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = _to_json(array)
        tensors.append(entry)
    body: dict[str, Any] = {"inputs": tensors}
    if request_id is not None:
        body["id"] = request_id
    if outputs:
        body["outputs"] = [
            {"name": n, "parameters": {"binary_data": binary_outputs}} for n in outputs
        ]
    elif binary_outputs:
        body["parameters"] = {"binary_data_output": True}
    if parameters:
        body["parameters"] = {**body.get("parameters", {}), **parameters}
    header = orjson.dumps(body, option=_NUMPY)
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)
