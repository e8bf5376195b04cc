"""Image inputs sent as UINT8 or FP16: a cast-and-normalise prefix added to the model's graph.

A client sends the bytes it has (a decoded image is UINT8) and the conversion to what the model
expects, `(x * scale - mean) / std` per channel, runs as two graph nodes where the model runs:
on the GPU when served with CUDA. A 3x224x224 image is then 150 KB on the wire instead of
602 KB as FP32. The result is cached on disk, like the FP16 conversion.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from batchserve.errors import ModelLoadError
from batchserve.runtime.fp16 import built_once

if TYPE_CHECKING:
    import onnx

log = logging.getLogger("batchserve.runtime")

# The datatypes a client may send an FP32 input as (V2 names).
INPUT_DATATYPES = ("UINT8", "FP16")
_KEYS = ("datatype", "scale", "mean", "std", "channel_axis")
# Bump when the graph this module writes changes: cached files of older versions are not used.
_FORMAT_VERSION = "1"


@dataclass(frozen=True, slots=True)
class InputFormat:
    """How clients send the FP32 input `name`: as `datatype`, turned into what the model
    expects by `(x * scale - mean) / std`, with `mean` and `std` per channel along
    `channel_axis` (1 for NCHW) or one value for all."""

    name: str
    datatype: str
    scale: float = 1.0
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    channel_axis: int = 1

    def __post_init__(self) -> None:
        where = f"input {self.name!r}"
        if not self.name:
            raise ValueError("an input format needs the input's name")
        if self.datatype not in INPUT_DATATYPES:
            raise ValueError(
                f"{where}: datatype must be one of {', '.join(INPUT_DATATYPES)}, "
                f"got {self.datatype!r}"
            )
        if not (math.isfinite(self.scale) and self.scale != 0):
            raise ValueError(f"{where}: scale must be a finite number other than 0")
        for key, values in (("mean", self.mean), ("std", self.std)):
            if not values or not all(math.isfinite(v) for v in values):
                raise ValueError(f"{where}: {key} must be one or more finite numbers")
        if any(v == 0 for v in self.std):
            raise ValueError(f"{where}: std must not be 0")
        if len(self.mean) > 1 and len(self.std) > 1 and len(self.mean) != len(self.std):
            raise ValueError(
                f"{where}: mean has {len(self.mean)} values and std {len(self.std)}; give one "
                "value or one per channel for each"
            )

    @property
    def normalises(self) -> bool:
        """Whether the prefix computes anything beyond the cast."""
        return self.scale != 1.0 or any(self.mean) or any(v != 1.0 for v in self.std)

    @property
    def channels(self) -> int:
        return max(len(self.mean), len(self.std))

    def coefficients(self) -> tuple[np.ndarray, np.ndarray]:
        """(a, b) per channel with `(x * scale - mean) / std == x * a + b`: one Mul and one Add,
        which ONNX Runtime fuses with the Cast on GPU."""
        shape = (self.channels,)
        mean = np.broadcast_to(np.asarray(self.mean, dtype=np.float64), shape)
        std = np.broadcast_to(np.asarray(self.std, dtype=np.float64), shape)
        return self.scale / std, -mean / std

    def describe(self) -> str:
        return (
            f"{self.name}={self.datatype}:scale={self.scale!r}:mean={_slashed(self.mean)}"
            f":std={_slashed(self.std)}:channel_axis={self.channel_axis}"
        )


def _slashed(values: tuple[float, ...]) -> str:
    return "/".join(repr(v) for v in values)


def parse_input_format(text: str) -> InputFormat:
    """`NAME=DATATYPE[:scale=S][:mean=M1/M2/M3][:std=S1/S2/S3][:channel_axis=A]` (the
    --input-format flag), e.g. `input=UINT8:mean=123.675/116.28/103.53:std=58.395/57.12/57.375`.
    ValueError says what is wrong."""
    name, sep, rest = text.partition("=")
    if not sep or not name.strip():
        raise ValueError(f"expected NAME=DATATYPE[:key=value...], got {text!r}")
    datatype, *options = rest.split(":")
    raw: dict[str, Any] = {"datatype": datatype.strip().upper()}
    for option in options:
        key, sep, value = option.partition("=")
        key = key.strip()
        if not sep or key not in _KEYS[1:]:
            raise ValueError(
                f"{text!r}: expected scale=, mean=, std= or channel_axis=, got {option!r}"
            )
        try:
            if key == "channel_axis":
                raw[key] = int(value)
            elif key == "scale":
                raw[key] = float(value)
            else:
                raw[key] = [float(v) for v in value.split("/")]
        except ValueError:
            raise ValueError(f"{text!r}: {key} {value!r} is not a number") from None
    return input_format(name.strip(), raw)


def input_format(name: str, raw: Mapping[str, Any]) -> InputFormat:
    """An InputFormat from a config.toml table `[inputs.NAME]` (or the parsed flag)."""
    unknown = sorted(set(raw) - set(_KEYS))
    if unknown:
        raise ValueError(f"input {name!r}: unknown key(s) {unknown}; known: {list(_KEYS)}")
    datatype = raw.get("datatype")
    if type(datatype) is not str:
        raise ValueError(f"input {name!r}: datatype must be one of {', '.join(INPUT_DATATYPES)}")
    return InputFormat(
        name,
        datatype.upper(),
        scale=_number(name, "scale", raw.get("scale", 1.0)),
        mean=_numbers(name, "mean", raw.get("mean", 0.0)),
        std=_numbers(name, "std", raw.get("std", 1.0)),
        channel_axis=_axis(name, raw.get("channel_axis", 1)),
    )


def _number(name: str, key: str, value: object) -> float:
    if type(value) not in (int, float):
        raise ValueError(f"input {name!r}: {key} must be a number, got {value!r}")
    return float(value)  # type: ignore[arg-type]


def _numbers(name: str, key: str, value: object) -> tuple[float, ...]:
    values = value if type(value) is list else [value]
    return tuple(_number(name, key, v) for v in values)


def _axis(name: str, value: object) -> int:
    if type(value) is not int:
        raise ValueError(f"input {name!r}: channel_axis must be an integer, got {value!r}")
    return value


def formats_key(formats: Iterable[InputFormat]) -> str:
    """Identifies what the formats compute (cache file names and response cache keys)."""
    text = "\n".join(sorted(f.describe() for f in formats))
    return hashlib.blake2b(f"{_FORMAT_VERSION}\n{text}".encode(), digest_size=8).hexdigest()


# ---------------------------------------------------------------------- the graph


def prefixed_model(
    model: Callable[[], bytes],
    formats: tuple[InputFormat, ...],
    *,
    digest: str,
    cache_dir: Path,
    source: str,
    fp16: bool,
) -> bytes:
    """The model `model()` gives (FP16-converted when `fp16`) with the formats' prefixes: from
    the cache when this digest was built with these formats before, else built now and cached
    (`model` is called only then)."""
    precision = "-fp16" if fp16 else ""
    wanted = ", ".join(f"{f.name} as {f.datatype}" for f in formats)
    return built_once(
        cache_dir / "inputs" / f"{digest}-{formats_key(formats)}{precision}.onnx",
        lambda: add_prefixes(model(), formats, source),
        reused=f"using the input formats of {source}",
        built=f"{source} takes {wanted} (cast and normalised in the graph)",
        what="the model with input formats",
    )


def add_prefixes(model: bytes, formats: tuple[InputFormat, ...], source: str) -> bytes:
    import onnx

    try:
        proto = onnx.load_from_string(model)
    except Exception as err:  # onnx raises DecodeError and others; translate at the boundary
        raise ModelLoadError(f"{source} is not a valid ONNX model: {err}") from err
    graph = proto.graph
    inputs = {value.name: value for value in graph.input}
    initializers = {init.name for init in graph.initializer}
    for spec in formats:
        value = inputs.get(spec.name)
        if value is None or spec.name in initializers:
            names = [name for name in inputs if name not in initializers]
            raise ModelLoadError(f"{source} has no input {spec.name!r} (its inputs: {names})")
        _add_prefix(graph, value, spec, source)
    return bytes(proto.SerializeToString())


def _add_prefix(
    graph: onnx.GraphProto, value: onnx.ValueInfoProto, spec: InputFormat, source: str
) -> None:
    from onnx import TensorProto

    tensor = value.type.tensor_type
    if tensor.elem_type != TensorProto.FLOAT:
        kind = TensorProto.DataType.Name(tensor.elem_type)
        raise ModelLoadError(
            f"{source}: input {spec.name!r} is {kind}; only FP32 inputs can be sent as "
            f"{spec.datatype}"
        )
    if any(output.name == spec.name for output in graph.output):
        raise ModelLoadError(f"{source}: input {spec.name!r} is also an output")
    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
    shape = _constant_shape(spec, dims, source)
    # After the FP16 conversion (inputs kept FP32), the input only feeds Casts to FP16: the
    # prefix then computes in FP16 and replaces them, so FP16 input needs no cast at all.
    consumers = [node for node in graph.node if spec.name in node.input]
    casts = [node for node in consumers if _casts_to_fp16(node)]
    work = TensorProto.FLOAT16 if casts and len(casts) == len(consumers) else TensorProto.FLOAT
    prefix, result = _prefix(graph, spec, work, shape)
    if work == TensorProto.FLOAT16:
        for cast in casts:
            graph.node.remove(cast)
            _rename_uses(graph, cast.output[0], result)
    else:
        _rename_uses(graph, spec.name, result)
    tensor.elem_type = TensorProto.UINT8 if spec.datatype == "UINT8" else TensorProto.FLOAT16
    # ONNX wants nodes in topological order; the prefix reads only the input and constants.
    nodes = prefix + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)


def _prefix(
    graph: onnx.GraphProto, spec: InputFormat, work: int, shape: list[int]
) -> tuple[list[onnx.NodeProto], str]:
    """The prefix's nodes (its constants are added to the graph) and the tensor it produces."""
    from onnx import TensorProto, helper

    taken = _names(graph)
    nodes: list[onnx.NodeProto] = []

    def step(op: str, inputs: list[str], label: str, **attributes: Any) -> str:
        output = _unique(f"{spec.name}/batchserve/{label}", taken)
        nodes.append(helper.make_node(op, inputs, [output], name=output, **attributes))
        return output

    current = spec.name
    if spec.datatype != "FP16" or work != TensorProto.FLOAT16:
        current = step("Cast", [current], "cast", to=work)
    if spec.normalises:
        a, b = spec.coefficients()
        dtype = np.float16 if work == TensorProto.FLOAT16 else np.float32
        scale = _constant(graph, a.astype(dtype).reshape(shape), f"{spec.name}/batchserve/a", taken)
        shift = _constant(graph, b.astype(dtype).reshape(shape), f"{spec.name}/batchserve/b", taken)
        current = step("Mul", [current, scale], "scaled")
        current = step("Add", [current, shift], "normalised")
    return nodes, current


def _constant_shape(spec: InputFormat, dims: list[int], source: str) -> list[int]:
    """The shape that broadcasts per-channel constants along the channel axis."""
    if spec.channels == 1:
        return []
    rank = len(dims)
    axis = spec.channel_axis + rank if spec.channel_axis < 0 else spec.channel_axis
    if not 0 <= axis < rank:
        raise ModelLoadError(
            f"{source}: channel_axis {spec.channel_axis} of input {spec.name!r} is out of "
            f"range for its {rank} dimensions"
        )
    if dims[axis] != spec.channels:
        size = "a variable size" if dims[axis] < 0 else f"{dims[axis]} channels"
        raise ModelLoadError(
            f"{source}: input {spec.name!r} has {size} on axis {axis}, but mean/std give "
            f"{spec.channels} values (give one per channel, or one for all)"
        )
    return [spec.channels] + [1] * (rank - axis - 1)


def _casts_to_fp16(node: onnx.NodeProto) -> bool:
    from onnx import TensorProto

    return node.op_type == "Cast" and any(
        attr.name == "to" and attr.i == TensorProto.FLOAT16 for attr in node.attribute
    )


def _names(graph: onnx.GraphProto) -> set[str]:
    names = {value.name for value in graph.input} | {init.name for init in graph.initializer}
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
        names.add(node.name)
    return names


def _unique(base: str, taken: set[str]) -> str:
    name, n = base, 1
    while name in taken:
        n += 1
        name = f"{base}_{n}"
    taken.add(name)
    return name


def _constant(graph: onnx.GraphProto, array: np.ndarray, base: str, taken: set[str]) -> str:
    from onnx import numpy_helper

    name = _unique(base, taken)
    graph.initializer.append(numpy_helper.from_array(array, name))
    return name


def _rename_uses(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Every node that reads tensor `old` reads `new` instead."""
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
