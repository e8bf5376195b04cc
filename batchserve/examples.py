"""Builders for example ONNX models used by the tests and benchmarks.

batchserve has to be exercised against real ONNX graphs, but the test and benchmark
machines cannot download model zoos and must not depend on torch. This module builds
the graphs directly with the ``onnx`` helper API instead:

* ``mlp`` -- a tiny 64 -> 128 -> 64 -> 10 classifier, cheap enough for unit tests;
* ``wide-mlp`` -- a 1024 -> 4096 -> 4096 -> 1000 classifier (~25M parameters) whose
  cost is dominated by large GEMMs, i.e. it benefits a lot from batching;
* ``resnet50`` -- the torchvision ResNet-50 v1.5 architecture (25,557,032 trainable
  parameters plus BatchNormalization running statistics), a realistic CNN workload.

The weights are random (drawn from ``numpy.random.default_rng(seed)``), so the outputs
mean nothing; for a given seed the serialized bytes are identical on every call. All
models are float32, opset 17, IR version 8 (loadable by onnxruntime >= 1.17), and have a
dynamic leading batch dimension named ``"batch"``.

``onnx`` is an optional dependency (``pip install 'batchserve[examples]'``); it is only
imported when a model is built, so importing this module never fails.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    import onnx

__all__ = ["EXAMPLE_MODELS", "build_example", "write_example"]

EXAMPLE_MODELS: tuple[str, ...] = ("mlp", "wide-mlp", "resnet50")

OPSET = 17
IR_VERSION = 8
BATCH_DIM = "batch"

_MISSING_ONNX = "the example models need the 'onnx' package: pip install 'batchserve[examples]'"


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401
    except ImportError as exc:
        raise RuntimeError(_MISSING_ONNX) from exc


class _GraphBuilder:
    """Accumulates nodes and initializers; draws weights from one seeded generator."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def param(self, name: str, value: npt.NDArray[np.float32]) -> str:
        from onnx import numpy_helper

        self.initializers.append(numpy_helper.from_array(value, name=name))
        return name

    def normal(self, name: str, shape: Sequence[int], std: float, mean: float = 0.0) -> str:
        value = self.rng.standard_normal(size=tuple(shape), dtype=np.float32)
        value *= np.float32(std)
        value += np.float32(mean)
        return self.param(name, value)

    def constant(self, name: str, shape: Sequence[int], value: float) -> str:
        return self.param(name, np.full(tuple(shape), value, dtype=np.float32))

    def node(self, op: str, inputs: Sequence[str], output: str, **attrs: Any) -> str:
        from onnx import helper

        self.nodes.append(helper.make_node(op, list(inputs), [output], name=output, **attrs))
        return output

    def finish(
        self,
        graph_name: str,
        inputs: Sequence[tuple[str, Sequence[int | str]]],
        outputs: Sequence[tuple[str, Sequence[int | str]]],
    ) -> bytes:
        import onnx
        from onnx import TensorProto, helper

        graph = helper.make_graph(
            self.nodes,
            graph_name,
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(s)) for n, s in inputs],
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(s)) for n, s in outputs],
            initializer=self.initializers,
        )
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET)],
            ir_version=IR_VERSION,
            producer_name="batchserve.examples",
            doc_string=f"batchserve example model {graph_name!r}; random weights, not trained.",
        )
        data: bytes = model.SerializeToString()
        onnx.checker.check_model(data, full_check=True)  # full_check also runs shape inference
        return data


# --------------------------------------------------------------------------- MLPs


def _gemm(g: _GraphBuilder, x: str, name: str, fan_in: int, fan_out: int) -> str:
    """Fully connected layer, PyTorch weight layout ``[out, in]`` (Gemm with transB=1)."""
    w = g.normal(f"{name}.weight", (fan_out, fan_in), std=(2.0 / fan_in) ** 0.5)
    b = g.normal(f"{name}.bias", (fan_out,), std=0.01)
    return g.node("Gemm", [x, w, b], name, transB=1)


def _mlp(seed: int, name: str, widths: Sequence[int]) -> bytes:
    """``widths[0]`` inputs -> hidden Relu layers -> ``widths[-1]`` softmax probabilities."""
    g = _GraphBuilder(seed)
    x = "input"
    n_layers = len(widths) - 1
    for i in range(n_layers):
        x = _gemm(g, x, f"fc{i + 1}", widths[i], widths[i + 1])
        if i < n_layers - 1:
            x = g.node("Relu", [x], f"relu{i + 1}")
    g.node("Softmax", [x], "probabilities", axis=-1)
    return g.finish(
        name,
        inputs=[("input", (BATCH_DIM, widths[0]))],
        outputs=[("probabilities", (BATCH_DIM, widths[-1]))],
    )


def _build_mlp(seed: int) -> bytes:
    return _mlp(seed, "mlp", (64, 128, 64, 10))


def _build_wide_mlp(seed: int) -> bytes:
    return _mlp(seed, "wide-mlp", (1024, 4096, 4096, 1000))


# ---------------------------------------------------------------------- ResNet-50

_RESNET50_STAGES: tuple[tuple[int, int, int], ...] = (
    # (bottleneck width, number of blocks, stride of the first block)
    (64, 3, 1),
    (128, 4, 2),
    (256, 6, 2),
    (512, 3, 2),
)
_EXPANSION = 4


def _conv_bn(
    g: _GraphBuilder,
    x: str,
    conv: str,
    bn: str,
    cin: int,
    cout: int,
    kernel: int,
    stride: int = 1,
    relu: bool = True,
) -> str:
    """Conv (no bias, He-normal) -> BatchNormalization -> optional Relu."""
    w = g.normal(
        f"{conv}.weight", (cout, cin, kernel, kernel), std=(2.0 / (cin * kernel**2)) ** 0.5
    )
    pad = kernel // 2
    y = g.node(
        "Conv",
        [x, w],
        conv,
        kernel_shape=[kernel, kernel],
        strides=[stride, stride],
        pads=[pad, pad, pad, pad],
    )
    scale = g.normal(f"{bn}.weight", (cout,), std=0.05, mean=1.0)
    bias = g.normal(f"{bn}.bias", (cout,), std=0.05)
    mean = g.constant(f"{bn}.running_mean", (cout,), 0.0)
    var = g.constant(f"{bn}.running_var", (cout,), 1.0)
    y = g.node("BatchNormalization", [y, scale, bias, mean, var], bn, epsilon=1e-5)
    return g.node("Relu", [y], f"{bn}.relu") if relu else y


def _bottleneck(g: _GraphBuilder, x: str, name: str, cin: int, width: int, stride: int) -> str:
    """ResNet v1.5 bottleneck: 1x1 -> 3x3 (carries the stride) -> 1x1 (x4), plus shortcut."""
    cout = width * _EXPANSION
    y = _conv_bn(g, x, f"{name}.conv1", f"{name}.bn1", cin, width, 1)
    y = _conv_bn(g, y, f"{name}.conv2", f"{name}.bn2", width, width, 3, stride)
    y = _conv_bn(g, y, f"{name}.conv3", f"{name}.bn3", width, cout, 1, relu=False)
    if stride != 1 or cin != cout:
        shortcut = _conv_bn(
            g, x, f"{name}.downsample.0", f"{name}.downsample.1", cin, cout, 1, stride, relu=False
        )
    else:
        shortcut = x
    y = g.node("Add", [y, shortcut], f"{name}.add")
    return g.node("Relu", [y], f"{name}.relu")


def _stage(
    g: _GraphBuilder, x: str, name: str, cin: int, width: int, blocks: int, stride: int
) -> tuple[str, int]:
    """``blocks`` bottlenecks; only the first one strides/projects. Returns (output, channels)."""
    for i in range(blocks):
        x = _bottleneck(g, x, f"{name}.{i}", cin, width, stride if i == 0 else 1)
        cin = width * _EXPANSION
    return x, cin


def _build_resnet50(seed: int) -> bytes:
    g = _GraphBuilder(seed)
    x = _conv_bn(g, "input", "conv1", "bn1", 3, 64, 7, stride=2)
    x = g.node("MaxPool", [x], "maxpool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    channels = 64
    for i, (width, blocks, stride) in enumerate(_RESNET50_STAGES, start=1):
        x, channels = _stage(g, x, f"layer{i}", channels, width, blocks, stride)
    x = g.node("GlobalAveragePool", [x], "avgpool")
    x = g.node("Flatten", [x], "flatten", axis=1)
    w = g.normal("fc.weight", (1000, channels), std=(1.0 / channels) ** 0.5)
    b = g.normal("fc.bias", (1000,), std=0.01)
    g.node("Gemm", [x, w, b], "logits", transB=1)
    return g.finish(
        "resnet50",
        inputs=[("input", (BATCH_DIM, 3, 224, 224))],
        outputs=[("logits", (BATCH_DIM, 1000))],
    )


# ------------------------------------------------------------------------ public API

_BUILDERS: dict[str, Callable[[int], bytes]] = {
    "mlp": _build_mlp,
    "wide-mlp": _build_wide_mlp,
    "resnet50": _build_resnet50,
}


def build_example(name: str, *, seed: int = 0) -> bytes:
    """Build example model ``name`` (one of :data:`EXAMPLE_MODELS`); return the ModelProto bytes.

    Raises ``ValueError`` for an unknown name and ``RuntimeError`` if ``onnx`` is missing.
    """
    builder = _BUILDERS.get(name)
    if builder is None:
        raise ValueError(
            f"unknown example model {name!r}; choose one of: {', '.join(EXAMPLE_MODELS)}"
        )
    _require_onnx()
    return builder(seed)


def write_example(name: str, path: str | os.PathLike[str], *, seed: int = 0) -> pathlib.Path:
    """Build example model ``name`` and write it to ``path`` (parent dirs are created)."""
    data = build_example(name, seed=seed)
    out = pathlib.Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(data)
    return out
