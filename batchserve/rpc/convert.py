"""Tensors between the protocol's gRPC messages and numpy, under the same limits as HTTP.

Inputs come as `raw_input_contents` (one bytes entry per input, the layout of HTTP's binary
tensors: read in place, without a copy, where numpy allows) or in the typed `contents` fields.
Outputs always go as `raw_output_contents`, which tritonclient and KServe's client read.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from math import prod
from typing import Any, Final, Protocol

import numpy as np
from tritonclient.grpc import service_pb2

from batchserve.datatypes import V2_TO_NUMPY, v2_name
from batchserve.errors import InvalidInput, PayloadTooLarge
from batchserve.protocol.v2 import DecodeLimits, check_size, from_binary, to_binary

# The typed field each datatype travels in, and the dtype numpy reads that field's values as
# (narrower integers travel widened and are range-checked back). FP16 (and BF16) has no typed
# field: raw only, as in Triton.
_CONTENTS: Final[dict[str, tuple[str, np.dtype[Any]]]] = {
    "BOOL": ("bool_contents", np.dtype(np.bool_)),
    "INT8": ("int_contents", np.dtype(np.int32)),
    "INT16": ("int_contents", np.dtype(np.int32)),
    "INT32": ("int_contents", np.dtype(np.int32)),
    "INT64": ("int64_contents", np.dtype(np.int64)),
    "UINT8": ("uint_contents", np.dtype(np.uint32)),
    "UINT16": ("uint_contents", np.dtype(np.uint32)),
    "UINT32": ("uint_contents", np.dtype(np.uint32)),
    "UINT64": ("uint64_contents", np.dtype(np.uint64)),
    "FP32": ("fp32_contents", np.dtype(np.float32)),
    "FP64": ("fp64_contents", np.dtype(np.float64)),
    "BYTES": ("bytes_contents", np.dtype(np.object_)),
}

# Integers narrower than the field they travel in: checked against their range, not wrapped.
_NARROW: Final = {
    name: (int(np.iinfo(kind).min), int(np.iinfo(kind).max))
    for name, kind in (("INT8", np.int8), ("INT16", np.int16), ("UINT8", np.uint8),
                       ("UINT16", np.uint16))
}  # fmt: skip


def parameters(fields: Mapping[str, Any]) -> dict[str, Any] | None:
    """A request's `parameters` map as plain values, the shape HTTP's JSON gives them (so
    `timeout`, `cache` and a handler's own read the same); None when there are none."""
    if not fields:
        return None
    values: dict[str, Any] = {}
    for key, parameter in fields.items():
        choice = parameter.WhichOneof("parameter_choice")
        values[key] = getattr(parameter, choice) if choice is not None else None
    return values


def requested_outputs(request: Any) -> list[str] | None:
    """The outputs a ModelInferRequest names, in its order (None: all of them)."""
    if not request.outputs:
        return None
    names: list[str] = []
    for output in request.outputs:
        name = output.name
        if not name:
            raise InvalidInput("each requested output needs a name")
        if name in names:  # the tensor would be sent twice
            raise InvalidInput(f"output {name!r} is requested twice")
        if "classification" in output.parameters:
            raise InvalidInput(
                f"output {name!r}: the classification extension is not supported; "
                "ask for the tensor and take its top classes on the client"
            )
        names.append(name)
    return names


def decode_inputs(
    request: Any, limits: DecodeLimits, *, raw_bytes: bool = False
) -> dict[str, np.ndarray]:
    """The input tensors of a ModelInferRequest. `raw_bytes`: BYTES elements stay bytes (an
    encoded image for a model's handler) instead of being read as UTF-8 text."""
    tensors = request.inputs
    if not tensors:
        raise InvalidInput("a request needs at least one input")
    if len(tensors) > limits.max_inputs:
        raise InvalidInput(
            f"{len(tensors)} inputs in one request; the limit is {limits.max_inputs}"
        )
    raw = request.raw_input_contents
    if raw and len(raw) != len(tensors):
        raise InvalidInput(
            f"raw_input_contents has {len(raw)} entries for {len(tensors)} inputs: "
            "raw contents come for every input or for none"
        )
    arrays: dict[str, np.ndarray] = {}
    for index, tensor in enumerate(tensors):
        name, shape, dtype = _header(tensor, limits)
        if name in arrays:
            raise InvalidInput(f"input {name!r} appears twice")
        if raw:
            if tensor.HasField("contents"):
                raise InvalidInput(f"input {name!r} has both contents and raw_input_contents")
            arrays[name] = from_binary(name, raw[index], shape, dtype, raw_bytes)
        else:
            arrays[name] = _from_contents(name, tensor, shape, raw_bytes)
    return arrays


def _header(tensor: Any, limits: DecodeLimits) -> tuple[str, list[int], np.dtype[Any]]:
    name: str = tensor.name
    if not name:
        raise InvalidInput("each input needs a name")
    dtype = V2_TO_NUMPY.get(tensor.datatype)
    if dtype is None:
        raise InvalidInput(
            f"input {name!r}: unknown datatype {tensor.datatype!r}; "
            f"expected one of {list(V2_TO_NUMPY)}"
        )
    shape = list(tensor.shape)
    if any(dim < 0 for dim in shape):
        raise InvalidInput(f"input {name!r}: 'shape' must be a list of non-negative integers")
    check_size(name, shape, dtype, limits)
    return name, shape, dtype


def _from_contents(name: str, tensor: Any, shape: list[int], raw_bytes: bool) -> np.ndarray:
    datatype: str = tensor.datatype
    field = _CONTENTS.get(datatype)
    if field is None:
        raise InvalidInput(f"input {name!r}: {datatype} travels in raw_input_contents only")
    values = getattr(tensor.contents, field[0])
    count = prod(shape)
    if len(values) != count:
        raise InvalidInput(
            f"input {name!r}: shape {shape} needs {count} elements, {field[0]} has {len(values)}"
        )
    if datatype == "BYTES":
        return _strings(name, values, raw_bytes).reshape(shape)
    array = np.array(values, dtype=field[1])
    bounds = _NARROW.get(datatype)
    if bounds is not None:
        if array.size and (int(array.min()) < bounds[0] or int(array.max()) > bounds[1]):
            raise InvalidInput(f"input {name!r}: a value is outside the range of {datatype}")
        array = array.astype(V2_TO_NUMPY[datatype])
    return array.reshape(shape)


def _strings(name: str, values: Sequence[bytes], raw_bytes: bool) -> np.ndarray:
    array = np.empty(len(values), dtype=object)
    for i, value in enumerate(values):
        try:
            array[i] = value if raw_bytes else value.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidInput(f"input {name!r}: BYTES element {i} is not UTF-8") from None
    return array


def infer_response(
    engine_name: str,
    version: str,
    request_id: str,
    outputs: Mapping[str, np.ndarray],
    order: Sequence[str] | None,
    max_bytes: int,
) -> Any:
    """A ModelInferResponse of `outputs` (in the requested `order`, else as they came), all
    as raw contents; PayloadTooLarge once they take more than `max_bytes`."""
    response = service_pb2.ModelInferResponse(
        model_name=engine_name, model_version=version, id=request_id
    )
    tensors, blobs = response.outputs, response.raw_output_contents
    size = 0
    for name in order or outputs:
        array = outputs[name]
        blob = to_binary(array)
        size += len(blob)
        if size > max_bytes:
            raise PayloadTooLarge(f"the outputs take more than {max_bytes} bytes, the limit")
        tensors.add(name=name, datatype=v2_name(array.dtype), shape=array.shape)
        blobs.append(blob)
    return response


class Tensor(Protocol):
    """A model input or output as the engine's metadata describes it (-1: a free dimension)."""

    @property
    def name(self) -> str: ...

    @property
    def datatype(self) -> str: ...

    @property
    def shape(self) -> tuple[int, ...]: ...


def tensor_metadata(tensors: Iterable[Tensor]) -> list[Any]:
    """ModelMetadataResponse's TensorMetadata of each tensor."""
    entry = service_pb2.ModelMetadataResponse.TensorMetadata
    return [entry(name=t.name, datatype=t.datatype, shape=t.shape) for t in tensors]
