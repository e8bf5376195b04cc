"""What a model takes and returns, read from the ONNX Runtime session, and input validation."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from math import prod
from typing import Any, NoReturn

import numpy as np

from batchserve.datatypes import ORT_TO_V2, V2_TO_NUMPY, v2_name
from batchserve.errors import InvalidInput, PayloadTooLarge, UnsupportedInput


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One model input or output; -1 marks a variable dimension."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    @property
    def dtype(self) -> np.dtype[np.generic]:
        return V2_TO_NUMPY[self.datatype]

    @classmethod
    def from_ort(cls, node: Any) -> TensorSpec:
        datatype = ORT_TO_V2.get(node.type)
        if datatype is None:
            raise UnsupportedInput(f"tensor {node.name!r} has unsupported type {node.type}")
        shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in node.shape)
        return cls(node.name, datatype, shape)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass(frozen=True, slots=True)
class ModelMetadata:
    """Inputs and outputs of a model and whether its first dimension is a batch dimension."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    batched: bool
    input_names: tuple[str, ...] = field(init=False)
    output_names: tuple[str, ...] = field(init=False)
    _all_outputs: list[int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # Computed once: validation runs on every request.
        object.__setattr__(self, "input_names", tuple(t.name for t in self.inputs))
        object.__setattr__(self, "output_names", tuple(t.name for t in self.outputs))
        object.__setattr__(self, "_all_outputs", list(range(len(self.outputs))))

    @classmethod
    def from_session(cls, session: Any) -> ModelMetadata:
        inputs = tuple(TensorSpec.from_ort(n) for n in session.get_inputs())
        outputs = tuple(TensorSpec.from_ort(n) for n in session.get_outputs())
        # Batching needs every input and output to start with a variable dimension.
        batched = all(len(t.shape) > 0 and t.shape[0] == -1 for t in inputs + outputs)
        return cls(inputs, outputs, batched)

    def validate(self, feeds: Mapping[str, np.ndarray]) -> tuple[list[np.ndarray], int]:
        """Check names, dtypes and shapes; return the arrays in model order and their row count.
        BYTES inputs come back as object arrays of str, what ONNX Runtime takes (see `_as_text`)."""
        specs = self.inputs
        if len(feeds) != len(specs):
            self._names_error(feeds)
        arrays: list[np.ndarray] = []
        rows = -1
        for spec in specs:
            array = feeds.get(spec.name)
            if array is None:
                self._names_error(feeds)
            _check_tensor(spec, array)
            if spec.datatype == "BYTES":
                array = _as_text(spec.name, array)
            if self.batched:
                if rows < 0:
                    rows = array.shape[0]
                elif array.shape[0] != rows:
                    raise InvalidInput(
                        f"all inputs must have the same batch size: {spec.name!r} has "
                        f"{array.shape[0]} rows, expected {rows}"
                    )
            arrays.append(array)
        return arrays, rows if rows >= 0 else 1  # unbatched: one request is one run

    def _names_error(self, feeds: Mapping[str, np.ndarray]) -> NoReturn:
        expected = sorted(self.input_names)
        got = sorted(feeds)
        missing = [n for n in expected if n not in feeds]
        unknown = [n for n in got if n not in expected]
        raise InvalidInput(
            f"model expects inputs {expected}, got {got}"
            + (f"; missing {missing}" if missing else "")
            + (f"; unknown {unknown}" if unknown else "")
        )

    def select_outputs(self, requested: Sequence[str] | None) -> list[int]:
        """Indexes of the requested outputs (all when None), or 400 for an unknown name."""
        if not requested:
            return self._all_outputs
        names = self.output_names
        indexes = []
        for name in requested:
            try:
                indexes.append(names.index(name))
            except ValueError:
                raise InvalidInput(
                    f"unknown output {name!r}; the model has outputs {list(names)}"
                ) from None
        return indexes

    def output_bytes(self, rows: int) -> int:
        """The least memory a run of `rows` rows allocates for the outputs (all of them: a run
        computes every output), from their declared shapes. Only outputs whose dimensions are
        all fixed but the batch one count: a free dimension may be 0, and an estimate above
        what the run allocates would refuse requests that fit."""
        total = 0
        for spec in self.outputs:
            dims = spec.shape[1:] if self.batched else spec.shape
            if -1 not in dims:
                total += (rows if self.batched else 1) * prod(dims) * spec.dtype.itemsize
        return total

    def check_output_bytes(self, rows: int, limit: int) -> None:
        """PayloadTooLarge (413) before running when the outputs for `rows` rows would already
        take more than `limit` bytes: a tiny request (`[20000000, 0]`, no elements) can ask
        for a huge answer."""
        estimate = self.output_bytes(rows)
        if estimate > limit:
            raise PayloadTooLarge(
                f"{rows} rows would make at least {estimate} bytes of outputs, over the "
                f"response limit of {limit}; send fewer rows per request"
            )


def _check_tensor(spec: TensorSpec, array: np.ndarray) -> None:
    expected = spec.dtype
    if array.dtype != expected and not (expected.kind == "O" and array.dtype.kind in "OUS"):
        raise InvalidInput(
            f"input {spec.name!r} has datatype {_v2(array.dtype)}, "
            f"the model expects {spec.datatype}"
        )
    shape, want = array.shape, spec.shape
    if shape == want or (want and want[0] == -1 and shape[1:] == want[1:] and shape):
        return  # the common case: only the batch dimension varies
    if len(shape) != len(spec.shape) or any(
        want != -1 and got != want for got, want in zip(shape, spec.shape, strict=True)
    ):
        raise InvalidInput(
            f"input {spec.name!r} has shape {list(shape)}, the model expects "
            f"{list(spec.shape)} (-1 = any size)"
        )


def _as_text(name: str, array: np.ndarray) -> np.ndarray:
    """A BYTES input as an object array of str. ONNX Runtime takes only str elements: it reads
    an `S` array's buffer as garbage and turns a bytes object into its repr ("b'a'"). So `U`
    arrays become str, bytes (`S` arrays, bytes objects) are decoded as UTF-8, and anything
    else is refused. An `S` array has already lost its elements' trailing NUL bytes (numpy's
    fixed-width strings strip them)."""
    if array.dtype.kind == "U":
        return array.astype(object)
    if array.dtype.kind == "O" and all(type(v) is str for v in array.flat):
        return array  # the common case: what the V2 decoder builds
    text = np.empty(array.shape, dtype=object)
    flat = text.reshape(-1)
    for i, value in enumerate(array.flat):
        if isinstance(value, bytes):
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidInput(
                    f"input {name!r}: BYTES element {i} is not UTF-8 (the model takes text)"
                ) from None
        elif not isinstance(value, str):
            raise InvalidInput(
                f"input {name!r}: BYTES element {i} is {type(value).__name__}, "
                "expected str or UTF-8 bytes"
            )
        flat[i] = str(value)
    return text


def _v2(dtype: np.dtype[Any]) -> str:
    try:
        return v2_name(dtype)
    except ValueError:
        return str(dtype)
