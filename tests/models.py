"""Small ONNX models built for the tests with the onnx helper API (seeded, no downloads)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = [helper.make_opsetid("", 17)]

# V2 datatype -> ONNX element type, for the echo model.
ECHO_TYPES = {
    "BOOL": TensorProto.BOOL,
    "UINT8": TensorProto.UINT8,
    "UINT16": TensorProto.UINT16,
    "UINT32": TensorProto.UINT32,
    "UINT64": TensorProto.UINT64,
    "INT8": TensorProto.INT8,
    "INT16": TensorProto.INT16,
    "INT32": TensorProto.INT32,
    "INT64": TensorProto.INT64,
    "FP16": TensorProto.FLOAT16,
    "FP32": TensorProto.FLOAT,
    "FP64": TensorProto.DOUBLE,
    "BYTES": TensorProto.STRING,
}


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=OPSET)
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def echo(path: Path, types: Iterable[str] = ECHO_TYPES) -> Path:
    """One Identity per datatype: input `x_<TYPE>` [batch, 2] -> output `y_<TYPE>`."""
    nodes, inputs, outputs = [], [], []
    for name in types:
        elem = ECHO_TYPES[name]
        inputs.append(helper.make_tensor_value_info(f"x_{name}", elem, ["batch", 2]))
        outputs.append(helper.make_tensor_value_info(f"y_{name}", elem, ["batch", 2]))
        nodes.append(helper.make_node("Identity", [f"x_{name}"], [f"y_{name}"]))
    return _save(helper.make_graph(nodes, "echo", inputs, outputs), path)


def two_inputs(path: Path) -> Path:
    """`a` FP32 [batch,3] and `b` INT64 [batch,2] -> `sum` FP32 [batch] and `b_twice` INT64."""
    two = numpy_helper.from_array(np.array(2, dtype=np.int64), "two")
    axes = numpy_helper.from_array(np.array([1], dtype=np.int64), "axes")
    nodes = [
        helper.make_node("ReduceSum", ["a", "axes"], ["sum"], keepdims=0),
        helper.make_node("Mul", ["b", "two"], ["b_twice"]),
    ]
    graph = helper.make_graph(
        nodes,
        "two_inputs",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["batch", 3]),
            helper.make_tensor_value_info("b", TensorProto.INT64, ["batch", 2]),
        ],
        [
            helper.make_tensor_value_info("sum", TensorProto.FLOAT, ["batch"]),
            helper.make_tensor_value_info("b_twice", TensorProto.INT64, ["batch", 2]),
        ],
        [two, axes],
    )
    return _save(graph, path)


def fixed(path: Path) -> Path:
    """No batch dimension: `x` FP32 [2,4] -> `y` = 2x."""
    two = numpy_helper.from_array(np.array(2.0, dtype=np.float32), "two")
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "two"], ["y"])],
        "fixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        [two],
    )
    return _save(graph, path)


def variable(path: Path) -> Path:
    """`x` FP32 [batch, n] with n free -> `y` = x * 3 (same shape): groups by n."""
    three = numpy_helper.from_array(np.array(3.0, dtype=np.float32), "three")
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "three"], ["y"])],
        "variable",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "n"])],
        [three],
    )
    return _save(graph, path)


def slow(
    path: Path, width: int = 1024, layers: int = 8, seed: int = 0, *, summed: bool = False
) -> Path:
    """`x` FP32 [batch, width] -> `y`: dense layers, slow enough to keep a session busy; with
    `summed`, `y` is each row's sum, [batch] (a big run with a small answer: answers then
    arrive in the order the runs finish, however long a large one would take to send)."""
    rng = np.random.default_rng(seed)
    nodes, weights, prev = [], [], "x"
    for i in range(layers):
        w = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
        weights.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"]))
        out = "y" if i == layers - 1 and not summed else f"t{i}"
        nodes.append(helper.make_node("Tanh", [f"m{i}"], [out]))
        prev = out
    shape: list[str | int] = ["batch", width]
    if summed:
        weights.append(numpy_helper.from_array(np.array([1], dtype=np.int64), "axes"))
        nodes.append(helper.make_node("ReduceSum", [prev, "axes"], ["y"], keepdims=0))
        shape = ["batch"]
    graph = helper.make_graph(
        nodes,
        "slow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
        weights,
    )
    return _save(graph, path)


def gather(path: Path) -> Path:
    """`index` INT64 [batch, 1] -> `value` = table[index]; an index outside 0..4 fails the run."""
    table = numpy_helper.from_array(np.arange(5, dtype=np.float32) * 10, "table")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "index"], ["value"], axis=0)],
        "gather",
        [helper.make_tensor_value_info("index", TensorProto.INT64, ["batch", 1])],
        [helper.make_tensor_value_info("value", TensorProto.FLOAT, ["batch", 1])],
        [table],
    )
    return _save(graph, path)


def scaled(path: Path, factor: float) -> Path:
    """`x` FP32 [batch, 4] -> `y` = x * factor: each version of a model says which it is."""
    k = numpy_helper.from_array(np.array(factor, dtype=np.float32), "k")
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "k"], ["y"])],
        "scaled",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [k],
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    return _save(graph, path)


def row_sums(path: Path) -> Path:
    """`x` FP32 [batch, length], both free -> `same` = x + 0 [batch, length] and `total` =
    ReduceSum(x, axis 1) [batch]: a row of zero length still gives one output value."""
    zero = numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero")
    axes = numpy_helper.from_array(np.array([1], dtype=np.int64), "axes")
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["x", "zero"], ["same"]),
            helper.make_node("ReduceSum", ["x", "axes"], ["total"], keepdims=0),
        ],
        "row_sums",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "length"])],
        [
            helper.make_tensor_value_info("same", TensorProto.FLOAT, ["batch", "length"]),
            helper.make_tensor_value_info("total", TensorProto.FLOAT, ["batch"]),
        ],
        [zero, axes],
    )
    return _save(graph, path)


def column_sums(path: Path) -> Path:
    """`x` FP32 [batch, length] -> `total` declared [batch] but summed over axis 0: one value
    per column, whatever the rows (a model whose output does not follow the batch dimension)."""
    axes = numpy_helper.from_array(np.array([0], dtype=np.int64), "axes")
    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["x", "axes"], ["total"], keepdims=0)],
        "column_sums",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "length"])],
        [helper.make_tensor_value_info("total", TensorProto.FLOAT, ["batch"])],
        [axes],
    )
    return _save(graph, path)


def logical_not(path: Path) -> Path:
    """`x` BOOL [batch, n] -> `y` = Not(x)."""
    graph = helper.make_graph(
        [helper.make_node("Not", ["x"], ["y"])],
        "logical_not",
        [helper.make_tensor_value_info("x", TensorProto.BOOL, ["batch", "n"])],
        [helper.make_tensor_value_info("y", TensorProto.BOOL, ["batch", "n"])],
    )
    return _save(graph, path)


def tiny_image(path: Path, size: int = 8, seed: int = 0) -> Path:
    """`input` FP32 [batch, 3, size, size] -> `logits` FP32 [batch, 4]: a 3x3 Conv, Relu,
    global average pool and Flatten, a ResNet's first and last steps in miniature."""
    rng = np.random.default_rng(seed)
    weight = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    bias = numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b")
    nodes = [
        helper.make_node("Conv", ["input", "w", "b"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["relu"]),
        helper.make_node("GlobalAveragePool", ["relu"], ["pool"]),
        helper.make_node("Flatten", ["pool"], ["logits"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_image",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])],
        [weight, bias],
    )
    return _save(graph, path)
