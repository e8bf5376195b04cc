"""Tests for batchserve.examples: the example ONNX models used by tests and benchmarks."""

from __future__ import annotations

import pathlib
import sys
from typing import TYPE_CHECKING

import numpy as np
import pytest

if TYPE_CHECKING:
    import onnxruntime

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from batchserve.examples import (  # noqa: E402
    EXAMPLE_MODELS,
    BertConfig,
    build_bert,
    build_example,
    write_example,
)

# Trainable parameters of torchvision.models.resnet50(): conv/fc weights, fc bias and
# BatchNormalization gamma/beta. The ONNX graph also stores the BN running statistics.
TORCHVISION_RESNET50_PARAMS = 25_557_032
RESNET50_BN_CHANNELS = 26_560  # sum of the channel counts of its 53 BatchNormalization layers

MLP_SHAPES = {"mlp": (64, 10), "wide-mlp": (1024, 1000)}
FLOAT_INPUT_MODELS = ("mlp", "wide-mlp", "resnet50")

# bert-base-uncased's parameters (BertModel with its pooler: 109,482,240) plus a 768 x 2
# classifier with bias.
BERT_BASE_PARAMS = 109_482_240 + 768 * 2 + 2
SMALL_BERT = BertConfig(layers=2, hidden=64, heads=4, ffn=128, vocab=500, seq=16)


@pytest.fixture(scope="module")
def built() -> dict[str, bytes]:
    """Each model is built once per module (wide-mlp and resnet50 are ~100 MB each)."""
    return {}


def _model(built: dict[str, bytes], name: str) -> bytes:
    if name not in built:
        built[name] = build_example(name)
    return built[name]


def _session(data: bytes) -> onnxruntime.InferenceSession:
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"])


def _initializer_sizes(data: bytes) -> dict[str, int]:
    model = onnx.load_from_string(data)
    return {t.name: int(np.prod(t.dims)) for t in model.graph.initializer}


def test_example_models_list() -> None:
    assert EXAMPLE_MODELS == ("mlp", "wide-mlp", "resnet50", "bert-base")


def test_unknown_name_raises_value_error_listing_choices() -> None:
    with pytest.raises(ValueError, match="unknown example model 'nope'") as info:
        build_example("nope")
    for name in EXAMPLE_MODELS:
        assert name in str(info.value)


@pytest.mark.slow
@pytest.mark.parametrize("name", FLOAT_INPUT_MODELS)
def test_model_metadata(built: dict[str, bytes], name: str) -> None:
    model = onnx.load_from_string(_model(built, name))
    assert model.ir_version == 8
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 17)]
    (inp,) = model.graph.input
    assert inp.name == "input"
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert inp.type.tensor_type.shape.dim[0].dim_param == "batch"
    assert all(t.data_type == onnx.TensorProto.FLOAT for t in model.graph.initializer)


@pytest.mark.parametrize("name", ["mlp", "wide-mlp"])
@pytest.mark.parametrize("batch", [1, 5])
def test_mlp_runs(built: dict[str, bytes], name: str, batch: int) -> None:
    n_in, n_out = MLP_SHAPES[name]
    sess = _session(_model(built, name))
    assert [(i.name, i.shape, i.type) for i in sess.get_inputs()] == [
        ("input", ["batch", n_in], "tensor(float)")
    ]
    assert [(o.name, o.shape) for o in sess.get_outputs()] == [("probabilities", ["batch", n_out])]

    x = np.random.default_rng(123).standard_normal((batch, n_in), dtype=np.float32)
    (probs,) = sess.run(["probabilities"], {"input": x})
    assert probs.shape == (batch, n_out)
    assert probs.dtype == np.float32
    assert np.all(probs >= 0)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


def test_mlp_passes_full_check() -> None:
    onnx.checker.check_model(onnx.load_from_string(build_example("mlp")), full_check=True)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mlp", "wide-mlp"])
def test_deterministic_per_seed(built: dict[str, bytes], name: str) -> None:
    default = _model(built, name)
    assert build_example(name, seed=0) == default
    assert build_example(name, seed=1) != default


def test_mlp_parameter_count(built: dict[str, bytes]) -> None:
    expected = (64 * 128 + 128) + (128 * 64 + 64) + (64 * 10 + 10)
    assert sum(_initializer_sizes(_model(built, "mlp")).values()) == expected


def test_write_example_creates_parent_dirs(tmp_path: pathlib.Path) -> None:
    target = tmp_path / "nested" / "dir" / "mlp.onnx"
    result = write_example("mlp", str(target), seed=3)
    assert result == target
    assert target.read_bytes() == build_example("mlp", seed=3)


def test_resnet50_metadata(built: dict[str, bytes]) -> None:
    sess = _session(_model(built, "resnet50"))
    assert [(i.name, i.shape, i.type) for i in sess.get_inputs()] == [
        ("input", ["batch", 3, 224, 224], "tensor(float)")
    ]
    assert [(o.name, o.shape, o.type) for o in sess.get_outputs()] == [
        ("logits", ["batch", 1000], "tensor(float)")
    ]


def test_resnet50_parameter_count(built: dict[str, bytes]) -> None:
    sizes = _initializer_sizes(_model(built, "resnet50"))
    total = sum(sizes.values())
    assert 25_000_000 < total < 26_000_000
    running = {k: v for k, v in sizes.items() if k.endswith((".running_mean", ".running_var"))}
    assert len(running) == 2 * 53
    assert sum(running.values()) == 2 * RESNET50_BN_CHANNELS
    assert total - sum(running.values()) == TORCHVISION_RESNET50_PARAMS


def test_resnet50_graph_layout(built: dict[str, bytes]) -> None:
    model = onnx.load_from_string(_model(built, "resnet50"))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Conv") == 53
    assert ops.count("BatchNormalization") == 53
    assert ops.count("Add") == 16
    strided_3x3 = [
        n.name
        for n in model.graph.node
        if n.op_type == "Conv"
        and list(next(a for a in n.attribute if a.name == "strides").ints) == [2, 2]
        and list(next(a for a in n.attribute if a.name == "kernel_shape").ints) == [3, 3]
    ]
    # v1.5: the stride sits on the 3x3 conv of the first bottleneck of stages 2-4.
    assert strided_3x3 == ["layer2.0.conv2", "layer3.0.conv2", "layer4.0.conv2"]


def test_resnet50_runs_batch_1(built: dict[str, bytes]) -> None:
    sess = _session(_model(built, "resnet50"))
    x = np.random.default_rng(7).standard_normal((1, 3, 224, 224), dtype=np.float32)
    (logits,) = sess.run(["logits"], {"input": x})
    assert logits.shape == (1, 1000)
    assert logits.dtype == np.float32
    assert np.all(np.isfinite(logits))


def test_missing_onnx_raises_runtime_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnx", None)  # makes `import onnx` raise ImportError
    with pytest.raises(RuntimeError, match=r"pip install 'batchserve\[examples\]'"):
        build_example("mlp")


# ---------------------------------------------------------------------------- BERT


@pytest.fixture(scope="module")
def small_bert() -> bytes:
    return build_bert(SMALL_BERT, seed=5)


def _tokens(rows: int, config: BertConfig, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, config.vocab, (rows, config.seq), dtype=np.int64)
    return {"input_ids": ids, "attention_mask": np.ones((rows, config.seq), dtype=np.int64)}


def _float_weights(data: bytes) -> int:
    """Float initializers with at least one axis: the weights (scalar constants excluded)."""
    model = onnx.load_from_string(data)
    return sum(
        int(np.prod(t.dims))
        for t in model.graph.initializer
        if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) > 0
    )


def test_bert_base_config_is_bert_base_sized() -> None:
    config = BertConfig()
    assert (config.layers, config.hidden, config.heads, config.ffn) == (12, 12 * 64, 12, 3072)
    assert (config.vocab, config.seq) == (30522, 128)
    assert config.parameter_count() == BERT_BASE_PARAMS


def test_bert_parameter_count_matches_the_built_graph(small_bert: bytes) -> None:
    assert _float_weights(small_bert) == SMALL_BERT.parameter_count()


def test_small_bert_signature_and_opset(small_bert: bytes) -> None:
    model = onnx.load_from_string(small_bert)
    assert model.ir_version == 8
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 17)]
    sess = _session(small_bert)
    assert [(i.name, i.shape, i.type) for i in sess.get_inputs()] == [
        ("input_ids", ["batch", 16], "tensor(int64)"),
        ("attention_mask", ["batch", 16], "tensor(int64)"),
    ]
    assert [(o.name, o.shape, o.type) for o in sess.get_outputs()] == [
        ("logits", ["batch", 2], "tensor(float)")
    ]
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("LayerNormalization") == 1 + 2 * SMALL_BERT.layers
    assert ops.count("Softmax") == SMALL_BERT.layers
    assert ops.count("Erf") == SMALL_BERT.layers


@pytest.mark.parametrize("rows", [1, 3])
def test_small_bert_runs(small_bert: bytes, rows: int) -> None:
    (logits,) = _session(small_bert).run(["logits"], _tokens(rows, SMALL_BERT))
    assert logits.shape == (rows, 2)
    assert logits.dtype == np.float32
    assert np.all(np.isfinite(logits))


def test_small_bert_rows_are_independent(small_bert: bytes) -> None:
    sess = _session(small_bert)
    feed = _tokens(4, SMALL_BERT, seed=1)
    (together,) = sess.run(["logits"], feed)
    for row in range(4):
        (alone,) = sess.run(["logits"], {k: v[row : row + 1] for k, v in feed.items()})
        np.testing.assert_allclose(alone[0], together[row], rtol=1e-4, atol=1e-5)


def test_small_bert_attention_mask_hides_padding(small_bert: bytes) -> None:
    sess = _session(small_bert)
    feed = _tokens(1, SMALL_BERT, seed=2)
    feed["attention_mask"][0, 10:] = 0
    (base,) = sess.run(["logits"], feed)
    padded = {k: v.copy() for k, v in feed.items()}
    padded["input_ids"][0, 12] = (padded["input_ids"][0, 12] + 1) % SMALL_BERT.vocab
    attended = {k: v.copy() for k, v in feed.items()}
    attended["input_ids"][0, 3] = (attended["input_ids"][0, 3] + 1) % SMALL_BERT.vocab
    # [CLS] only sees what the mask lets through: a changed padding token leaves it (almost)
    # unchanged (exp(-10000) is 0 in float32), a changed attended token moves it.
    np.testing.assert_allclose(sess.run(["logits"], padded)[0], base, rtol=1e-5, atol=1e-6)
    assert not np.allclose(sess.run(["logits"], attended)[0], base, rtol=1e-5, atol=1e-6)


def test_bert_deterministic_per_seed(small_bert: bytes) -> None:
    assert build_bert(SMALL_BERT, seed=5) == small_bert
    assert build_bert(SMALL_BERT, seed=6) != small_bert


@pytest.mark.parametrize(
    "changes",
    [{"hidden": 100, "heads": 12}, {"seq": 0}, {"seq": 513}, {"layers": 0}, {"type_vocab": 0}],
)
def test_bert_config_rejects_bad_shapes(changes: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="must"):
        BertConfig(**changes)


@pytest.mark.slow
def test_bert_base_is_built_by_name(built: dict[str, bytes]) -> None:
    data = _model(built, "bert-base")  # about 6 s: 110 M weights drawn and serialized
    model = onnx.load_from_string(data)
    assert model.graph.name == "bert-base"
    assert _float_weights(data) == BERT_BASE_PARAMS
    dims = {i.name: i.type.tensor_type.shape.dim for i in model.graph.input}
    shapes = {name: [d.dim_param or d.dim_value for d in dim] for name, dim in dims.items()}
    assert shapes == {"input_ids": ["batch", 128], "attention_mask": ["batch", 128]}
