"""Inputs sent as UINT8 or FP16: the cast-and-normalise prefix added to a model's graph, its
composition with the FP16 conversion, its cache, its configuration (flag, config.toml) and its
errors, and real servers answering UINT8 and FP16 images over HTTP (binary and JSON) and gRPC
like ONNX Runtime on the original FP32 model (real ONNX Runtime throughout)."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tritonclient.grpc.aio as aioclient
from onnx import TensorProto

from batchserve import BatchConfig, CacheConfig, Engine, RuntimeConfig, ServerConfig
from batchserve.app import Server, engine_factory
from batchserve.cli import build_parser
from batchserve.errors import ModelLoadError
from batchserve.examples import write_example
from batchserve.flags import settings_from_args
from batchserve.repository import ModelRepository
from batchserve.repository.config import parse_model_config
from batchserve.runtime import SessionBuilder
from batchserve.runtime.fp16 import convert_fp16
from batchserve.runtime.input_prefix import (
    InputFormat,
    add_prefixes,
    formats_key,
    parse_input_format,
)

from helpers import StartServer, StartServerProcess, run_cli, write_config
from models import tiny_image, two_inputs

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
# torchvision's normalisation of 0..255 pixels, as a user writes it.
IMAGENET = InputFormat("input", "UINT8", scale=1 / 255, mean=MEAN, std=STD)
IMAGENET_FLAG = "input=UINT8:scale=0.00392156862745098:mean=0.485/0.456/0.406:std=0.229/0.224/0.225"


@pytest.fixture(scope="module")
def image_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_image(tmp_path_factory.mktemp("image") / "tiny.onnx")


def pixels(rows: int = 2, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (rows, 3, 8, 8), dtype=np.uint8)


def normalised(x: np.ndarray) -> np.ndarray:
    """What a client would send as FP32 today: (x / 255 - mean) / std per channel."""
    mean = np.array(MEAN).reshape(3, 1, 1)
    std = np.array(STD).reshape(3, 1, 1)
    result: np.ndarray = ((x / 255.0 - mean) / std).astype(np.float32)
    return result


def reference(path: Path, x: np.ndarray) -> np.ndarray:
    """ONNX Runtime on the original FP32 model."""
    (logits,) = ort.InferenceSession(str(path)).run(None, {"input": x})
    result: np.ndarray = logits
    return result


def run(model: bytes, x: np.ndarray) -> np.ndarray:
    (logits,) = ort.InferenceSession(model).run(None, {"input": x})
    result: np.ndarray = logits
    return result


def ops(model: bytes) -> list[str]:
    return [node.op_type for node in onnx.load_from_string(model).graph.node]


def input_type(model: bytes) -> int:
    elem: int = onnx.load_from_string(model).graph.input[0].type.tensor_type.elem_type
    return elem


# -- the graph ------------------------------------------------------------------------------


def test_uint8_input_answers_like_the_fp32_model_on_normalised_pixels(image_path: Path) -> None:
    model = add_prefixes(image_path.read_bytes(), (IMAGENET,), "tiny")
    x = pixels()
    expected = reference(image_path, normalised(x))
    assert input_type(model) == TensorProto.UINT8
    assert ops(model)[:3] == ["Cast", "Mul", "Add"]
    np.testing.assert_allclose(run(model, x), expected, rtol=1e-5, atol=1e-5)
    # The tolerance is not vacuous: skipping mean and std gives other answers.
    assert not np.allclose(reference(image_path, (x / 255.0).astype(np.float32)), expected)


def test_mean_and_std_in_pixel_units_are_the_same(image_path: Path) -> None:
    pixel_units = InputFormat(
        "input", "UINT8", mean=tuple(m * 255 for m in MEAN), std=tuple(s * 255 for s in STD)
    )
    model = add_prefixes(image_path.read_bytes(), (pixel_units,), "tiny")
    x = pixels()
    np.testing.assert_allclose(
        run(model, x), reference(image_path, normalised(x)), rtol=1e-5, atol=1e-5
    )


def test_fp16_input_into_an_fp32_model_is_cast_to_fp32(image_path: Path) -> None:
    model = add_prefixes(image_path.read_bytes(), (InputFormat("input", "FP16"),), "tiny")
    x = np.random.default_rng(2).standard_normal((2, 3, 8, 8)).astype(np.float16)
    assert input_type(model) == TensorProto.FLOAT16
    assert ops(model)[0] == "Cast"
    np.testing.assert_allclose(
        run(model, x), reference(image_path, x.astype(np.float32)), atol=1e-5
    )


def test_fp16_input_into_an_fp16_model_needs_no_cast(image_path: Path) -> None:
    half = convert_fp16(image_path.read_bytes(), "tiny")
    assert ops(half)[0] == "Cast"  # the conversion's own cast of the FP32 input
    model = add_prefixes(half, (InputFormat("input", "FP16"),), "tiny")
    x = np.random.default_rng(2).standard_normal((2, 3, 8, 8)).astype(np.float16)
    assert input_type(model) == TensorProto.FLOAT16
    assert ops(model)[0] == "Conv"  # the input feeds the model directly
    np.testing.assert_allclose(
        run(model, x), reference(image_path, x.astype(np.float32)), atol=5e-3
    )


def test_uint8_into_an_fp16_model_casts_to_fp16_and_normalises_in_fp16(image_path: Path) -> None:
    half = convert_fp16(image_path.read_bytes(), "tiny")
    model = add_prefixes(half, (IMAGENET,), "tiny")
    graph = onnx.load_from_string(model).graph
    cast, mul, add = graph.node[:3]
    assert (cast.op_type, mul.op_type, add.op_type) == ("Cast", "Mul", "Add")
    assert cast.attribute[0].i == TensorProto.FLOAT16
    constants = {init.name: init.data_type for init in graph.initializer}
    assert constants[mul.input[1]] == constants[add.input[1]] == TensorProto.FLOAT16
    # No FP32 Cast of the input is left: the conversion's cast was replaced.
    assert sum(1 for node in graph.node if "input" in node.input) == 1
    x = pixels()
    np.testing.assert_allclose(run(model, x), reference(image_path, normalised(x)), atol=2e-2)


def test_a_variable_channel_axis_and_one_value_for_all_channels(tmp_path: Path) -> None:
    path = two_inputs(tmp_path / "two.onnx")  # `a` FP32 [batch, 3]: channels on axis -1
    spec = InputFormat("a", "UINT8", scale=0.5, mean=(1.0, 2.0, 3.0), std=(2.0,), channel_axis=-1)
    model = add_prefixes(path.read_bytes(), (spec,), "two")
    a = np.array([[10, 20, 30], [0, 255, 7]], dtype=np.uint8)
    b = np.zeros((2, 2), dtype=np.int64)
    total, _ = ort.InferenceSession(model).run(None, {"a": a, "b": b})
    expected = ((a * 0.5 - np.array([1.0, 2.0, 3.0])) / 2.0).sum(axis=1)
    np.testing.assert_allclose(total, expected, rtol=1e-6)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (InputFormat("image", "UINT8"), r"has no input 'image' \(its inputs: \['input'\]\)"),
        (
            InputFormat("input", "UINT8", mean=(1.0, 2.0, 3.0, 4.0)),
            r"input 'input' has 3 channels on axis 1, but mean/std give 4 values",
        ),
        (
            InputFormat("input", "UINT8", std=(1.0, 2.0), channel_axis=3),
            r"has 8 channels on axis 3, but mean/std give 2 values",
        ),
        (
            InputFormat("input", "UINT8", mean=(1.0, 2.0, 3.0), channel_axis=4),
            r"channel_axis 4 of input 'input' is out of range for its 4 dimensions",
        ),
    ],
)
def test_a_format_that_does_not_fit_the_model_fails_its_load(
    image_path: Path, tmp_path: Path, spec: InputFormat, message: str
) -> None:
    config = RuntimeConfig(input_formats=(spec,), build_cache_dir=str(tmp_path))
    with pytest.raises(ModelLoadError, match=message):
        SessionBuilder(image_path, config).load()


def test_only_fp32_inputs_take_a_format(tmp_path: Path) -> None:
    path = two_inputs(tmp_path / "two.onnx")
    config = RuntimeConfig(
        input_formats=(InputFormat("b", "UINT8"),), build_cache_dir=str(tmp_path)
    )
    with pytest.raises(ModelLoadError, match=r"input 'b' is INT64; only FP32 inputs can be sent"):
        SessionBuilder(path, config).load()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"datatype": "INT8"}, r"datatype must be one of UINT8, FP16, got 'INT8'"),
        ({"datatype": "FP32"}, r"datatype must be one of UINT8, FP16"),
        ({"datatype": "UINT8", "std": (0.5, 0.0, 1.0)}, r"std must not be 0"),
        ({"datatype": "UINT8", "scale": 0.0}, r"scale must be a finite number other than 0"),
        ({"datatype": "UINT8", "mean": ()}, r"mean must be one or more finite numbers"),
        (
            {"datatype": "UINT8", "mean": (1.0, 2.0), "std": (1.0, 2.0, 3.0)},
            r"mean has 2 values and std 3",
        ),
    ],
)
def test_an_invalid_format_is_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        InputFormat("input", **kwargs)


def test_a_format_given_twice_is_refused() -> None:
    with pytest.raises(ValueError, match=r"input format given more than once for \['input'\]"):
        RuntimeConfig(input_formats=(IMAGENET, InputFormat("input", "FP16")))


# -- the flag and config.toml ---------------------------------------------------------------


def test_the_flag_syntax() -> None:
    assert parse_input_format(IMAGENET_FLAG) == IMAGENET
    assert parse_input_format("x=fp16") == InputFormat("x", "FP16")
    assert parse_input_format("x=UINT8:channel_axis=-1:scale=2") == InputFormat(
        "x", "UINT8", scale=2.0, channel_axis=-1
    )
    # What the parser's default shows round-trips.
    assert parse_input_format(IMAGENET.describe()) == IMAGENET
    for bad, message in [
        ("UINT8", r"expected NAME=DATATYPE"),
        ("x=UINT8:offset=3", r"expected scale=, mean=, std= or channel_axis=, got 'offset=3'"),
        ("x=UINT8:mean=a/b", r"mean 'a/b' is not a number"),
        ("x=BOOL", r"datatype must be one of UINT8, FP16"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_input_format(bad)


def test_the_flag_from_the_command_line_and_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    flags = ["serve", "m.onnx", "--input-format", IMAGENET_FLAG, "--input-format", "b=FP16"]
    settings = settings_from_args(build_parser().parse_args(flags))
    assert settings.runtime.input_formats == (IMAGENET, InputFormat("b", "FP16"))
    assert (
        settings_from_args(build_parser().parse_args(["serve", "m.onnx"])).runtime.input_formats
        == ()
    )
    monkeypatch.setenv("BATCHSERVE_INPUT_FORMATS", f"{IMAGENET_FLAG},b=fp16")
    settings = settings_from_args(build_parser().parse_args(["serve", "m.onnx"]))
    assert settings.runtime.input_formats == (IMAGENET, InputFormat("b", "FP16"))


def test_config_toml_inputs_table() -> None:
    raw = {"inputs": {"input": {"datatype": "uint8", "scale": 1 / 255, "mean": list(MEAN),
                                "std": list(STD)}}}  # fmt: skip
    config = parse_model_config(raw, "m/config.toml")
    assert config.inputs == (IMAGENET,)
    assert config.runtime(RuntimeConfig()).input_formats == (IMAGENET,)
    assert parse_model_config({}).runtime(RuntimeConfig()).input_formats == ()


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"input": {"datatype": "INT8"}}, r"m/config.toml: input 'input': datatype must be one"),
        ({"input": {}}, r"input 'input': datatype must be one of UINT8, FP16"),
        ({"input": {"datatype": "UINT8", "mean": "0.5"}}, r"mean must be a number, got '0.5'"),
        ({"input": {"datatype": "UINT8", "axis": 1}}, r"unknown key\(s\) \['axis'\]"),
        ({"input": {"datatype": "UINT8", "channel_axis": 1.0}}, r"channel_axis must be an integer"),
        ({"input": "UINT8"}, r"inputs.input must be a table"),
    ],
)
def test_config_toml_inputs_errors(inputs: dict[str, Any], message: str) -> None:
    with pytest.raises(ModelLoadError, match=message):
        parse_model_config({"inputs": inputs}, "m/config.toml")


def test_the_flag_with_a_model_repository_is_a_usage_error(tmp_path: Path) -> None:
    result = run_cli("serve", "--model-repository", str(tmp_path), "--input-format", "x=UINT8")
    assert result.returncode == 2
    assert "[inputs.NAME] table in config.toml" in result.stderr


def test_a_bad_flag_is_a_usage_error(image_path: Path) -> None:
    result = run_cli("serve", str(image_path), "--input-format", "input=INT8")
    assert result.returncode == 2
    assert "datatype must be one of UINT8, FP16, got 'INT8'" in result.stderr


# -- the cache ------------------------------------------------------------------------------


def test_the_prefixed_model_is_cached_and_reused(
    image_path: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = RuntimeConfig(input_formats=(IMAGENET,), build_cache_dir=str(tmp_path))
    with caplog.at_level(logging.INFO, logger="batchserve.runtime"):
        builder = SessionBuilder(image_path, config)
        (session,), metadata = builder.load()
    cached = tmp_path / "inputs" / f"{builder.digest}-{formats_key((IMAGENET,))}.onnx"
    assert [r.getMessage() for r in caplog.records if "takes" in r.getMessage()] == [
        f"{image_path} takes input as UINT8 (cast and normalised in the graph), cached at {cached}"
    ]
    assert metadata.inputs[0].datatype == "UINT8"
    assert input_type(cached.read_bytes()) == TensorProto.UINT8
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="batchserve.runtime"):
        (again,), _ = SessionBuilder(image_path, config).load()  # a restart
    messages = [r.getMessage() for r in caplog.records]
    assert f"using the input formats of {image_path} cached at {cached}" in messages
    assert not any("takes" in message for message in messages)
    x = pixels()
    np.testing.assert_array_equal(
        session.run(None, {"input": x})[0], again.run(None, {"input": x})[0]
    )
    # Other formats, or FP16 weights, are other files.
    other = InputFormat("input", "UINT8", scale=1 / 255)
    SessionBuilder(
        image_path, RuntimeConfig(input_formats=(other,), build_cache_dir=str(tmp_path))
    ).load()
    half = RuntimeConfig(input_formats=(IMAGENET,), fp16=True, build_cache_dir=str(tmp_path))
    SessionBuilder(image_path, half).load()
    assert len(list((tmp_path / "inputs").glob("*.onnx"))) == 3


def test_uint8_through_io_binding(image_path: Path, tmp_path: Path) -> None:
    """Bound runs (CUDA's path, here on CPU) stage UINT8 rows in buffers of their own size."""
    config = RuntimeConfig(
        input_formats=(IMAGENET,), io_binding=True, build_cache_dir=str(tmp_path)
    )
    (session,), _ = SessionBuilder(image_path, config).load()
    for rows in (1, 3, 8):
        x = pixels(rows, seed=rows)
        np.testing.assert_allclose(
            session.run(None, {"input": x})[0],
            reference(image_path, normalised(x)),
            rtol=1e-5,
            atol=1e-5,
        )


def test_an_unwritable_cache_still_serves(image_path: Path, tmp_path: Path) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    config = RuntimeConfig(input_formats=(IMAGENET,), build_cache_dir=str(blocked))
    (session,), metadata = SessionBuilder(image_path, config).load()
    assert metadata.inputs[0].datatype == "UINT8"
    x = pixels()
    np.testing.assert_allclose(
        session.run(None, {"input": x})[0], reference(image_path, normalised(x)), atol=1e-5
    )


# -- served ---------------------------------------------------------------------------------


def binary_request(x: np.ndarray, datatype: str) -> tuple[bytes, dict[str, str]]:
    blob = np.ascontiguousarray(x).tobytes()
    header = json.dumps({"inputs": [{"name": "input", "shape": list(x.shape),
                                     "datatype": datatype,
                                     "parameters": {"binary_data_size": len(blob)}}],
                         "outputs": [{"name": "logits",
                                      "parameters": {"binary_data": True}}]})  # fmt: skip
    headers = {"Inference-Header-Content-Length": str(len(header))}
    return header.encode() + blob, headers


def binary_logits(body: bytes, header_length: int) -> np.ndarray:
    header = json.loads(body[:header_length])
    (output,) = header["outputs"]
    assert output["datatype"] == "FP32"
    return np.frombuffer(body[header_length:], dtype=np.float32).reshape(output["shape"])


async def http_answers(url: str, x: np.ndarray, datatype: str) -> tuple[np.ndarray, np.ndarray]:
    """The model's logits for `x` over binary tensors and over JSON."""
    infer = f"{url}/v2/models/tiny/infer"
    async with aiohttp.ClientSession() as client:
        body, headers = binary_request(x, datatype)
        async with client.post(infer, data=body, headers=headers) as response:
            assert response.status == 200, await response.text()
            length = int(response.headers["Inference-Header-Content-Length"])
            binary = binary_logits(await response.read(), length)
        tensor = {"name": "input", "shape": list(x.shape), "datatype": datatype,
                  "data": x.ravel().tolist()}  # fmt: skip
        async with client.post(infer, json={"inputs": [tensor]}) as response:
            assert response.status == 200, await response.text()
            (output,) = (await response.json())["outputs"]
            as_json = np.array(output["data"], dtype=np.float32).reshape(output["shape"])
    return binary, as_json


async def grpc_answer(port: int, x: np.ndarray, datatype: str) -> np.ndarray:
    async with aioclient.InferenceServerClient(f"127.0.0.1:{port}") as client:
        tensor = aioclient.InferInput("input", list(x.shape), datatype)
        tensor.set_data_from_numpy(x)
        result = await client.infer("tiny", [tensor])
        logits: np.ndarray = result.as_numpy("logits")
    return logits


async def test_a_server_answers_uint8_images_like_the_fp32_model(
    start_server: StartServer, image_path: Path, tmp_path: Path
) -> None:
    runtime = RuntimeConfig(input_formats=(IMAGENET,), build_cache_dir=str(tmp_path))
    server = await start_server(Engine(image_path, runtime=runtime, name="tiny"), grpc_port=0)
    url = f"http://127.0.0.1:{server.port}"
    x = pixels(3)
    expected = reference(image_path, normalised(x))
    binary, as_json = await http_answers(url, x, "UINT8")
    np.testing.assert_allclose(binary, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(as_json, expected, rtol=1e-5, atol=1e-5)
    assert server.grpc_port is not None
    np.testing.assert_allclose(
        await grpc_answer(server.grpc_port, x, "UINT8"), expected, rtol=1e-5, atol=1e-5
    )
    async with aiohttp.ClientSession() as client:
        async with client.get(f"{url}/v2/models/tiny") as response:
            (spec,) = (await response.json())["inputs"]
        assert spec == {"name": "input", "datatype": "UINT8", "shape": [-1, 3, 8, 8]}
        async with client.get(f"{url}/v2/models/tiny/config") as response:
            (config_input,) = (await response.json())["input"]
        assert config_input["data_type"] == "TYPE_UINT8"
        # The strict decoder holds clients to the new datatype.
        body, headers = binary_request(normalised(x), "FP32")
        async with client.post(f"{url}/v2/models/tiny/infer", data=body, headers=headers) as r:
            assert r.status == 400
            assert "UINT8" in (await r.json())["error"]


async def test_a_server_answers_fp16_input_into_an_fp16_model(
    start_server: StartServer, image_path: Path, tmp_path: Path
) -> None:
    spec = InputFormat("input", "FP16")
    runtime = RuntimeConfig(input_formats=(spec,), fp16=True, build_cache_dir=str(tmp_path))
    server = await start_server(Engine(image_path, runtime=runtime, name="tiny"), grpc_port=0)
    x = np.random.default_rng(3).standard_normal((2, 3, 8, 8)).astype(np.float16)
    expected = reference(image_path, x.astype(np.float32))
    binary, as_json = await http_answers(f"http://127.0.0.1:{server.port}", x, "FP16")
    np.testing.assert_allclose(binary, expected, atol=5e-3)
    np.testing.assert_allclose(as_json, expected, atol=5e-3)
    assert server.grpc_port is not None
    np.testing.assert_allclose(await grpc_answer(server.grpc_port, x, "FP16"), expected, atol=5e-3)


async def test_a_repository_model_takes_its_format_from_config_toml(
    image_path: Path, tmp_path: Path
) -> None:
    version = tmp_path / "repo" / "tiny" / "1"
    version.mkdir(parents=True)
    shutil.copyfile(image_path, version / "model.onnx")
    write_config(tmp_path / "repo", "tiny", '[inputs.input]\ndatatype = "UINT8"\n'
                 "mean = [123.675, 116.28, 103.53]\nstd = [58.395, 57.12, 57.375]\n")  # fmt: skip
    runtime = RuntimeConfig(build_cache_dir=str(tmp_path / "cache"))
    factory = engine_factory(BatchConfig(), runtime, CacheConfig())
    repository = ModelRepository.from_directory(tmp_path / "repo", factory)
    async with Server(repository, ServerConfig(port=0, grpc_port=None)) as server:
        x = pixels()
        binary, as_json = await http_answers(f"http://127.0.0.1:{server.port}", x, "UINT8")
    expected = reference(image_path, normalised(x))
    np.testing.assert_allclose(binary, expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(as_json, expected, rtol=1e-4, atol=1e-4)


def test_the_cli_serves_uint8_images(
    serve_process: StartServerProcess, image_path: Path, tmp_path: Path
) -> None:
    server = serve_process(str(image_path), "--name", "tiny", "--input-format", IMAGENET_FLAG,
                           "--build-cache-dir", str(tmp_path), grpc=True)  # fmt: skip
    x = pixels()
    expected = reference(image_path, normalised(x))
    binary, as_json = asyncio.run(http_answers(server.url, x, "UINT8"))
    np.testing.assert_allclose(binary, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(as_json, expected, rtol=1e-5, atol=1e-5)
    assert server.grpc_port is not None
    answer = asyncio.run(grpc_answer(server.grpc_port, x, "UINT8"))
    np.testing.assert_allclose(answer, expected, rtol=1e-5, atol=1e-5)


def test_the_resnet50_example_takes_uint8_images(tmp_path: Path) -> None:
    """The configuration docs/gpu.md gives for the example ResNet-50."""
    path = write_example("resnet50", tmp_path / "resnet50.onnx")
    spec = parse_input_format("input=UINT8:mean=123.675/116.28/103.53:std=58.395/57.12/57.375")
    config = RuntimeConfig(input_formats=(spec,), build_cache_dir=str(tmp_path))
    (session,), metadata = SessionBuilder(path, config).load()
    assert [(s.name, s.datatype, s.shape) for s in metadata.inputs] == [
        ("input", "UINT8", (-1, 3, 224, 224))
    ]
    x = np.random.default_rng(4).integers(0, 256, (1, 3, 224, 224), dtype=np.uint8)
    mean = np.array([123.675, 116.28, 103.53]).reshape(3, 1, 1)
    std = np.array([58.395, 57.12, 57.375]).reshape(3, 1, 1)
    expected = reference(path, ((x - mean) / std).astype(np.float32))
    np.testing.assert_allclose(session.run(None, {"input": x})[0], expected, rtol=1e-3, atol=1e-3)
