"""Builders for example ONNX models used by the tests and benchmarks.

batchserve has to be exercised against real ONNX graphs, but the test and benchmark
machines cannot download model zoos and must not depend on torch. This module builds
the graphs directly with the ``onnx`` helper API instead:

* ``mlp`` -- a tiny 64 -> 128 -> 64 -> 10 classifier, cheap enough for unit tests;
* ``wide-mlp`` -- a 1024 -> 4096 -> 4096 -> 1000 classifier (~25M parameters) whose
  cost is dominated by large GEMMs, i.e. it benefits a lot from batching;
* ``resnet50`` -- the torchvision ResNet-50 v1.5 architecture (25,557,032 trainable
  parameters plus BatchNormalization running statistics), a realistic CNN workload;
* ``bert-base`` -- a BERT-base-sized transformer encoder (12 layers, hidden 768, 12 heads,
  FFN 3072, vocabulary 30,522; 109,483,778 parameters) over a fixed sequence of 128 tokens,
  with a two-class head: inputs ``input_ids`` and ``attention_mask`` (INT64 ``[batch, 128]``),
  output ``logits`` (``[batch, 2]``), so a response stays small. :class:`BertConfig` and
  :func:`build_bert` build smaller variants of the same graph.

The weights are random (drawn from ``numpy.random.default_rng(seed)``), so the outputs
mean nothing; for a given seed the serialized bytes are identical on every call. All
models compute in float32 (the BERT inputs are INT64 token ids and mask), use opset 17, IR
version 8 (loadable by onnxruntime >= 1.17), and have a dynamic leading batch dimension named
``"batch"``.

``onnx`` is an optional dependency (``pip install 'batchserve[examples]'``); it is only
imported when a model is built, so importing this module never fails.
"""

from __future__ import annotations

import math
import os
import pathlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    import onnx

__all__ = ["EXAMPLE_MODELS", "BertConfig", "build_bert", "build_example", "write_example"]

EXAMPLE_MODELS: tuple[str, ...] = ("mlp", "wide-mlp", "resnet50", "bert-base")

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

    def param(self, name: str, value: npt.NDArray[np.float32] | npt.NDArray[np.int64]) -> str:
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

    def ints(self, name: str, values: Sequence[int] | int) -> str:
        """An INT64 initializer; a bare int gives a scalar (a Gather index that drops an axis)."""
        return self.param(name, np.asarray(values, dtype=np.int64))

    def node(self, op: str, inputs: Sequence[str], output: str, **attrs: Any) -> str:
        from onnx import helper

        self.nodes.append(helper.make_node(op, list(inputs), [output], name=output, **attrs))
        return output

    def finish(
        self,
        graph_name: str,
        inputs: Sequence[tuple[str, Sequence[int | str]]],
        outputs: Sequence[tuple[str, Sequence[int | str]]],
        dtypes: Mapping[str, int] | None = None,
    ) -> bytes:
        """``dtypes`` maps an input or output name to its TensorProto type (default FLOAT)."""
        import onnx
        from onnx import TensorProto, helper

        def info(name: str, shape: Sequence[int | str]) -> onnx.ValueInfoProto:
            dtype = (dtypes or {}).get(name, TensorProto.FLOAT)
            return helper.make_tensor_value_info(name, dtype, list(shape))

        graph = helper.make_graph(
            self.nodes,
            graph_name,
            [info(n, s) for n, s in inputs],
            [info(n, s) for n, s in outputs],
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


# -------------------------------------------------------------------- BERT encoder


@dataclass(frozen=True, slots=True)
class BertConfig:
    """Shape of a BERT encoder; the defaults are BERT-base (bert-base-uncased)."""

    layers: int = 12
    hidden: int = 768
    heads: int = 12
    ffn: int = 3072
    vocab: int = 30522
    seq: int = 128
    max_positions: int = 512
    type_vocab: int = 2
    labels: int = 2

    def __post_init__(self) -> None:
        if min(self.layers, self.hidden, self.heads, self.ffn, self.vocab, self.labels) < 1:
            raise ValueError("every BERT dimension must be >= 1")
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be a multiple of heads ({self.heads})")
        if not 1 <= self.seq <= self.max_positions:
            raise ValueError(f"seq must be in [1, max_positions={self.max_positions}]")
        if self.type_vocab < 1:
            raise ValueError("type_vocab must be >= 1")

    def parameter_count(self) -> int:
        """Float parameters of the built graph (embeddings, encoder, pooler, classifier)."""
        h, f = self.hidden, self.ffn
        embeddings = (self.vocab + self.max_positions + self.type_vocab) * h + 2 * h
        layer = 4 * (h * h + h) + (h * f + f) + (f * h + h) + 2 * 2 * h
        return embeddings + self.layers * layer + (h * h + h) + (h * self.labels + self.labels)


def _dense(g: _GraphBuilder, x: str, name: str, fan_in: int, fan_out: int) -> str:
    """``x @ W + b`` with ``W`` as ``[in, out]`` (how exporters lay out nn.Linear for MatMul)."""
    w = g.normal(f"{name}.weight", (fan_in, fan_out), std=0.02)  # BERT's initializer_range
    b = g.constant(f"{name}.bias", (fan_out,), 0.0)
    return g.node("Add", [g.node("MatMul", [x, w], f"{name}.matmul"), b], name)


def _layer_norm(g: _GraphBuilder, x: str, name: str, hidden: int) -> str:
    scale = g.constant(f"{name}.weight", (hidden,), 1.0)
    bias = g.constant(f"{name}.bias", (hidden,), 0.0)
    return g.node("LayerNormalization", [x, scale, bias], name, axis=-1, epsilon=1e-12)


def _bert_embeddings(g: _GraphBuilder, c: BertConfig) -> str:
    """Word + position + token type (all type 0: single-segment input) -> LayerNorm."""
    vocab = g.normal("word_embeddings", (c.vocab, c.hidden), 0.02)
    words = g.node("Gather", [vocab, "input_ids"], "embeddings.words")
    table = g.normal("position_embeddings", (c.max_positions, c.hidden), 0.02)
    positions = g.node("Gather", [table, g.ints("position_ids", range(c.seq))], "embeddings.pos")
    types = g.normal("token_type_embeddings", (c.type_vocab, c.hidden), 0.02)
    segment = g.node("Gather", [types, g.ints("token_type_id", 0)], "embeddings.type")
    x = g.node("Add", [words, positions], "embeddings.add1")
    x = g.node("Add", [x, segment], "embeddings.add2")
    return _layer_norm(g, x, "embeddings.norm", c.hidden)


def _mask_bias(g: _GraphBuilder) -> str:
    """attention_mask [B, S] (1 = token, 0 = padding) -> additive bias [B, 1, 1, S]:
    0 where attended, -10000 where masked, as BERT does (finite, so a fully masked row
    still gives a defined softmax)."""
    mask = g.node("Cast", ["attention_mask"], "mask.float", to=1)  # TensorProto.FLOAT
    inverted = g.node("Sub", [g.constant("mask.one", (), 1.0), mask], "mask.inverted")
    bias = g.node("Mul", [inverted, g.constant("mask.scale", (), -10000.0)], "mask.bias")
    return g.node("Unsqueeze", [bias, g.ints("mask.axes", [1, 2])], "mask.bias4d")


def _heads(g: _GraphBuilder, x: str, name: str, c: BertConfig, perm: Sequence[int]) -> str:
    """[B, S, H] -> [B, heads, S, d] (or [B, heads, d, S] for keys, by ``perm``)."""
    shape = g.ints(f"{name}.shape", [0, 0, c.heads, c.hidden // c.heads])
    split = g.node("Reshape", [x, shape], f"{name}.split")
    return g.node("Transpose", [split], f"{name}.heads", perm=list(perm))


def _attention(g: _GraphBuilder, x: str, name: str, bias: str, c: BertConfig) -> str:
    q = _heads(g, _dense(g, x, f"{name}.query", c.hidden, c.hidden), f"{name}.q", c, (0, 2, 1, 3))
    k = _heads(g, _dense(g, x, f"{name}.key", c.hidden, c.hidden), f"{name}.k", c, (0, 2, 3, 1))
    v = _heads(g, _dense(g, x, f"{name}.value", c.hidden, c.hidden), f"{name}.v", c, (0, 2, 1, 3))
    scores = g.node("MatMul", [q, k], f"{name}.scores")
    scale = g.constant(f"{name}.scale", (), 1.0 / math.sqrt(c.hidden // c.heads))
    scores = g.node("Mul", [scores, scale], f"{name}.scaled")
    scores = g.node("Add", [scores, bias], f"{name}.masked")
    probs = g.node("Softmax", [scores], f"{name}.probs", axis=-1)
    context = g.node("MatMul", [probs, v], f"{name}.context")
    context = g.node("Transpose", [context], f"{name}.context.t", perm=[0, 2, 1, 3])
    merge = g.ints(f"{name}.merge", [0, 0, c.hidden])
    merged = g.node("Reshape", [context, merge], f"{name}.merged")
    return _dense(g, merged, f"{name}.output", c.hidden, c.hidden)


def _gelu(g: _GraphBuilder, x: str, name: str) -> str:
    """Exact GELU, 0.5 x (1 + erf(x / sqrt 2)), from opset-13 ops (ORT fuses it into Gelu)."""
    scaled = g.node("Div", [x, g.constant(f"{name}.sqrt2", (), math.sqrt(2.0))], f"{name}.div")
    erf = g.node("Erf", [scaled], f"{name}.erf")
    erf = g.node("Add", [erf, g.constant(f"{name}.one", (), 1.0)], f"{name}.erf1")
    half = g.node("Mul", [x, g.constant(f"{name}.half", (), 0.5)], f"{name}.half.x")
    return g.node("Mul", [half, erf], name)


def _encoder_layer(g: _GraphBuilder, x: str, name: str, bias: str, c: BertConfig) -> str:
    attended = _attention(g, x, f"{name}.attention", bias, c)
    x = _layer_norm(g, g.node("Add", [attended, x], f"{name}.residual1"), f"{name}.norm1", c.hidden)
    y = _gelu(g, _dense(g, x, f"{name}.intermediate", c.hidden, c.ffn), f"{name}.gelu")
    y = _dense(g, y, f"{name}.output", c.ffn, c.hidden)
    return _layer_norm(g, g.node("Add", [y, x], f"{name}.residual2"), f"{name}.norm2", c.hidden)


def build_bert(config: BertConfig, *, seed: int = 0, name: str = "bert") -> bytes:
    """A BERT encoder with a classification head on the pooled [CLS] token."""
    g = _GraphBuilder(seed)
    x = _bert_embeddings(g, config)
    bias = _mask_bias(g)
    for i in range(config.layers):
        x = _encoder_layer(g, x, f"layer{i}", bias, config)
    # A scalar index drops the sequence axis: [B, S, H] -> [B, H], the [CLS] token.
    cls = g.node("Gather", [x, g.ints("cls_index", 0)], "cls", axis=1)
    dense = _dense(g, cls, "pooler.dense", config.hidden, config.hidden)
    pooled = g.node("Tanh", [dense], "pooler")
    _dense(g, pooled, "logits", config.hidden, config.labels)
    tokens: tuple[str | int, ...] = (BATCH_DIM, config.seq)
    return g.finish(
        name,
        inputs=[("input_ids", tokens), ("attention_mask", tokens)],
        outputs=[("logits", (BATCH_DIM, config.labels))],
        dtypes={"input_ids": 7, "attention_mask": 7},  # TensorProto.INT64
    )


def _build_bert_base(seed: int) -> bytes:
    return build_bert(BertConfig(), seed=seed, name="bert-base")


# ------------------------------------------------------------------------ public API

_BUILDERS: dict[str, Callable[[int], bytes]] = {
    "mlp": _build_mlp,
    "wide-mlp": _build_wide_mlp,
    "resnet50": _build_resnet50,
    "bert-base": _build_bert_base,
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
