"""Datatype names of the Open Inference Protocol, ONNX Runtime and numpy, in one table."""

from __future__ import annotations

from typing import Final

import numpy as np

# BYTES tensors are numpy object arrays (ORT's string tensors hold str values).
V2_TO_NUMPY: Final[dict[str, np.dtype[np.generic]]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(np.object_),
}

NUMPY_TO_V2: Final[dict[np.dtype[np.generic], str]] = {v: k for k, v in V2_TO_NUMPY.items()}

ORT_TO_V2: Final[dict[str, str]] = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}


def v2_name(dtype: np.dtype[np.generic]) -> str:
    """The V2 datatype of a numpy dtype; unicode and bytes strings count as BYTES."""
    name = NUMPY_TO_V2.get(dtype)
    if name is not None:
        return name
    if dtype.kind in "USO":
        return "BYTES"
    raise ValueError(f"numpy dtype {dtype} has no Open Inference Protocol datatype")
