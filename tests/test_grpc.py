"""The Open Inference Protocol over gRPC against real servers on 127.0.0.1 ephemeral ports:
tritonclient.grpc (sync, asyncio, streaming), raw stubs for every status code, every
datatype, the health service, and gRPC sharing the engines, batching, metrics and access log
with HTTP (real ONNX Runtime throughout)."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from onnx import helper
from tritonclient.grpc import service_pb2, service_pb2_grpc

from batchserve import BatchConfig, CacheConfig, Engine, RuntimeConfig, ServerConfig
from batchserve.app import Server, engine_factory
from batchserve.datatypes import V2_TO_NUMPY
from batchserve.examples import write_example
from batchserve.handlers import HandlerConfig
from batchserve.http import STATE
from batchserve.repository import ModelRepository

from helpers import (
    StartServer,
    StartServerProcess,
    X,
    add_version,
    encode,
    photo,
    wait_until,
    write_config,
)
from models import ECHO_TYPES, OPSET

Code = grpc.StatusCode
pb = service_pb2


# -------------------------------------------------------------------------------- helpers


@pytest.fixture
async def mlp(start_server: StartServer, mlp_path: Path) -> Server:
    return await start_server(Engine(mlp_path, name="mlp"), grpc_port=0)


@pytest.fixture
async def channel() -> AsyncIterator[Any]:
    """A grpc.aio channel factory; every channel it opened is closed at the end of the test."""
    opened: list[Any] = []

    def open_channel(server: Server) -> Any:
        options = [("grpc.max_receive_message_length", -1)]  # as tritonclient's
        opened.append(grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}", options))
        return opened[-1]

    yield open_channel
    for each in opened:
        await each.close()


def stub(channel: Any) -> service_pb2_grpc.GRPCInferenceServiceStub:
    return service_pb2_grpc.GRPCInferenceServiceStub(channel)


def reference(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"input": x})[0])


def raw_request(model: str, tensors: dict[str, np.ndarray], **fields: Any) -> Any:
    """A ModelInferRequest with every tensor as raw contents (as tritonclient sends them)."""
    request = pb.ModelInferRequest(model_name=model, **fields)
    for name, array in tensors.items():
        datatype = "BYTES" if array.dtype.kind == "O" else _v2(array.dtype)
        request.inputs.add(name=name, datatype=datatype, shape=array.shape)
        request.raw_input_contents.append(_raw(array))
    return request


def _v2(dtype: np.dtype[Any]) -> str:
    return next(name for name, known in V2_TO_NUMPY.items() if known == dtype)


def _raw(array: np.ndarray) -> bytes:
    if array.dtype.kind != "O":
        return np.ascontiguousarray(array, array.dtype.newbyteorder("<")).tobytes()
    items = [v if isinstance(v, bytes) else str(v).encode() for v in array.flat]
    return b"".join(len(v).to_bytes(4, "little") + v for v in items)


def x64(rows: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, 64)).astype(np.float32)


def output(response: Any, name: str) -> np.ndarray:
    """An output of a ModelInferResponse, read from its raw contents."""
    index = [o.name for o in response.outputs].index(name)
    tensor = response.outputs[index]
    dtype = V2_TO_NUMPY[tensor.datatype]
    data = response.raw_output_contents[index]
    return np.frombuffer(data, dtype.newbyteorder("<")).reshape(list(tensor.shape))


async def refused(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


def trailing(error: grpc.aio.AioRpcError) -> dict[str, str]:
    return {key: value for key, value in error.trailing_metadata() or ()}


# -------------------------------------------------------------------------------- tritonclient


def drive_sync(url: str, x: np.ndarray) -> dict[str, Any]:
    client = grpcclient.InferenceServerClient(url)
    try:
        tensor = grpcclient.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        wanted = grpcclient.InferRequestedOutput("probabilities")
        result = client.infer("mlp", [tensor], outputs=[wanted], request_id="s-1")
        return {
            "live": client.is_server_live(),
            "ready": client.is_server_ready() and client.is_model_ready("mlp"),
            "server": client.get_server_metadata(as_json=True),
            "metadata": client.get_model_metadata("mlp", as_json=True),
            "id": result.get_response().id,
            "output": result.as_numpy("probabilities"),
        }
    finally:
        client.close()


async def test_tritonclient_grpc_reads_metadata_and_infers(mlp: Server, mlp_path: Path) -> None:
    x = x64(5, seed=1)
    answer = await asyncio.to_thread(drive_sync, f"127.0.0.1:{mlp.grpc_port}", x)
    assert answer["live"]
    assert answer["ready"]
    assert answer["server"]["name"] == "batchserve"
    assert "model_repository" in answer["server"]["extensions"]
    metadata = answer["metadata"]
    assert metadata["platform"] == "onnxruntime_onnx"
    assert metadata["inputs"] == [{"name": "input", "datatype": "FP32", "shape": ["-1", "64"]}]
    assert metadata["outputs"][0]["name"] == "probabilities"
    assert answer["id"] == "s-1"
    np.testing.assert_allclose(answer["output"], reference(mlp_path, x), rtol=1e-5, atol=1e-6)


async def test_tritonclient_grpc_aio_infers(mlp: Server, mlp_path: Path) -> None:
    x = x64(3, seed=2)
    async with aioclient.InferenceServerClient(f"127.0.0.1:{mlp.grpc_port}") as client:
        assert await client.is_server_ready()
        tensor = aioclient.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        result = await client.infer("mlp", [tensor], request_id="a-1")
    assert result.get_response().id == "a-1"
    got = result.as_numpy("probabilities")
    np.testing.assert_allclose(got, reference(mlp_path, x), rtol=1e-5, atol=1e-6)


async def test_requested_outputs_come_in_the_order_asked(
    start_server: StartServer, two_inputs_path: Path, channel: Any
) -> None:
    server = await start_server(Engine(two_inputs_path, name="two"), grpc_port=0)
    tensors = {"a": np.ones((2, 3), np.float32), "b": np.array([[1, 2], [3, 4]], np.int64)}
    request = raw_request("two", tensors)
    request.outputs.add(name="b_twice")
    response = await stub(channel(server)).ModelInfer(request)
    assert [o.name for o in response.outputs] == ["b_twice"]
    np.testing.assert_array_equal(output(response, "b_twice"), tensors["b"] * 2)
    both = raw_request("two", tensors)
    both.outputs.add(name="b_twice")
    both.outputs.add(name="sum")
    response = await stub(channel(server)).ModelInfer(both)
    assert [o.name for o in response.outputs] == ["b_twice", "sum"]
    np.testing.assert_array_equal(output(response, "sum"), [3.0, 3.0])


# -------------------------------------------------------------------------------- streaming


def stream_sync(url: str, inputs: Sequence[np.ndarray]) -> dict[str, Any]:
    """Every input on one stream (request id = its index); answers (or errors) by id."""
    answers: dict[str, Any] = {}
    errors: list[str] = []
    lock, done = threading.Lock(), threading.Event()

    def callback(result: Any, error: Any) -> None:
        with lock:
            if error is not None:
                errors.append(str(error))
            else:
                answers[result.get_response().id] = result.as_numpy("probabilities")
            if len(answers) + len(errors) == len(inputs):
                done.set()

    client = grpcclient.InferenceServerClient(url)
    try:
        client.start_stream(callback)
        for index, x in enumerate(inputs):
            tensor = grpcclient.InferInput("input", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x)
            client.async_stream_infer("mlp", [tensor], request_id=str(index))
        assert done.wait(60), f"{len(answers) + len(errors)} of {len(inputs)} answers"
        client.stop_stream()
    finally:
        client.close()
    return {"answers": answers, "errors": errors}


async def test_a_stream_answers_every_request_with_its_id(mlp: Server, mlp_path: Path) -> None:
    rng = np.random.default_rng(3)
    inputs = [x64(int(rows), seed=i) for i, rows in enumerate(rng.integers(1, 9, 120))]
    inputs.append(np.ones((1, 63), np.float32))  # a bad one: answered with an error, no end
    got = await asyncio.to_thread(stream_sync, f"127.0.0.1:{mlp.grpc_port}", inputs)
    assert len(got["errors"]) == 1
    assert "input" in got["errors"][0]
    assert sorted(got["answers"], key=int) == [str(i) for i in range(len(inputs) - 1)]
    for index, x in enumerate(inputs[:-1]):
        expected = reference(mlp_path, x)
        np.testing.assert_allclose(got["answers"][str(index)], expected, rtol=1e-5, atol=1e-6)


async def test_aio_stream_and_raw_stream_errors_carry_the_request_id(
    mlp: Server, channel: Any
) -> None:
    async def requests() -> AsyncIterator[Any]:
        yield raw_request("mlp", {"input": x64(2)}, id="good")
        yield raw_request("nope", {"input": x64(1)}, id="unknown-model")

    answers = [answer async for answer in stub(channel(mlp)).ModelStreamInfer(requests())]
    by_id = {a.infer_response.id: a for a in answers}
    assert set(by_id) == {"good", "unknown-model"}
    assert by_id["good"].error_message == ""
    assert output(by_id["good"].infer_response, "probabilities").shape == (2, 10)
    assert "unknown model 'nope'" in by_id["unknown-model"].error_message

    async with aioclient.InferenceServerClient(f"127.0.0.1:{mlp.grpc_port}") as client:

        async def inputs() -> AsyncIterator[dict[str, Any]]:
            for index in range(20):
                tensor = aioclient.InferInput("input", [1, 64], "FP32")
                tensor.set_data_from_numpy(x64(1, seed=index))
                yield {"model_name": "mlp", "inputs": [tensor], "request_id": f"r{index}"}

        ids = set()
        async for result, error in client.stream_infer(inputs()):
            assert error is None, error
            ids.add(result.get_response().id)
            if len(ids) == 20:
                break
    assert ids == {f"r{i}" for i in range(20)}


# -------------------------------------------------------------------------------- datatypes


def identity_model(path: Path, datatypes: Sequence[str]) -> Path:
    """One Identity per datatype: `x_<TYPE>` [batch, 2] -> `y_<TYPE>`."""
    nodes, inputs, outputs = [], [], []
    for name in datatypes:
        elem = ECHO_TYPES[name]
        inputs.append(helper.make_tensor_value_info(f"x_{name}", elem, ["batch", 2]))
        outputs.append(helper.make_tensor_value_info(f"y_{name}", elem, ["batch", 2]))
        nodes.append(helper.make_node("Identity", [f"x_{name}"], [f"y_{name}"]))
    model = helper.make_model(
        helper.make_graph(nodes, "identity", inputs, outputs), opset_imports=OPSET
    )
    model.ir_version = 8
    onnx.save(model, path)
    return path


def sample(datatype: str) -> np.ndarray:
    """Three rows of two values, the type's extremes among them."""
    if datatype == "BYTES":
        return np.array([[b"a", "héllo".encode()], [b"", b"xyz"], [b"1", b"2"]], dtype=object)
    dtype = V2_TO_NUMPY[datatype]
    if datatype == "BOOL":
        return np.array([[True, False], [False, False], [True, True]])
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return np.array([[info.min, info.max], [0, 1], [2, info.max - 1]], dtype)
    info_f = np.finfo(dtype)
    return np.array([[info_f.min, info_f.max], [np.inf, -0.0], [1.5, np.nan]], dtype)


_TYPED = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents",
    "INT32": "int_contents", "INT64": "int64_contents", "UINT8": "uint_contents",
    "UINT16": "uint_contents", "UINT32": "uint_contents", "UINT64": "uint64_contents",
    "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}  # fmt: skip


def typed_request(model: str, tensors: dict[str, np.ndarray]) -> Any:
    request = pb.ModelInferRequest(model_name=model)
    for name, array in tensors.items():
        datatype = name.removeprefix("x_")
        tensor = request.inputs.add(name=name, datatype=datatype, shape=array.shape)
        getattr(tensor.contents, _TYPED[datatype]).extend(array.ravel().tolist())
    return request


def check_echo(response: Any, tensors: dict[str, np.ndarray]) -> None:
    for name, array in tensors.items():
        datatype = name.removeprefix("x_")
        index = [o.name for o in response.outputs].index(f"y_{datatype}")
        assert response.outputs[index].datatype == datatype
        assert list(response.outputs[index].shape) == list(array.shape)
        if datatype == "BYTES":
            raw = response.raw_output_contents[index]
            got, at = [], 0
            while at < len(raw):
                size = int.from_bytes(raw[at : at + 4], "little")
                got.append(raw[at + 4 : at + 4 + size])
                at += 4 + size
            assert got == list(array.ravel()), datatype
        else:
            np.testing.assert_array_equal(output(response, f"y_{datatype}"), array, datatype)


async def test_every_datatype_round_trips_raw_and_typed(
    start_server: StartServer, tmp_path: Path, channel: Any
) -> None:
    typed = [name for name in ECHO_TYPES if name != "FP16"]  # FP16 has no typed field
    server = await start_server(
        Engine(identity_model(tmp_path / "all.onnx", list(ECHO_TYPES)), name="all"),
        Engine(identity_model(tmp_path / "typed.onnx", typed), name="typed"),
        grpc_port=0,
    )
    calls = stub(channel(server))
    everything = {f"x_{name}": sample(name) for name in ECHO_TYPES}
    check_echo(await calls.ModelInfer(raw_request("all", everything)), everything)
    tensors = {f"x_{name}": sample(name) for name in typed}
    check_echo(await calls.ModelInfer(typed_request("typed", tensors)), tensors)
    # tritonclient sends every datatype raw, BYTES as length-prefixed elements
    client = aioclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    try:
        inputs = []
        for name, array in everything.items():
            tensor = aioclient.InferInput(name, list(array.shape), name.removeprefix("x_"))
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        result = await client.infer("all", inputs)
    finally:
        await client.close()
    for name, array in everything.items():
        got = result.as_numpy(name.replace("x_", "y_"))
        if array.dtype.kind == "O":
            assert got.tolist() == array.tolist()
        else:
            np.testing.assert_array_equal(got, array)


async def test_typed_contents_are_checked_not_cast(
    start_server: StartServer, tmp_path: Path, channel: Any
) -> None:
    path = identity_model(tmp_path / "m.onnx", ["INT8", "FP16"])
    server = await start_server(Engine(path, name="m"), grpc_port=0)
    calls = stub(channel(server))
    request = pb.ModelInferRequest(model_name="m")
    tensor = request.inputs.add(name="x_INT8", datatype="INT8", shape=[1, 2])
    tensor.contents.int_contents.extend([1, 300])  # 300 is no INT8
    half = request.inputs.add(name="x_FP16", datatype="FP16", shape=[1, 2])
    half.contents.fp32_contents.extend([1.0, 2.0])
    error = await refused(calls.ModelInfer(request))
    assert error.code() == Code.INVALID_ARGUMENT
    assert "outside the range of INT8" in error.details()
    del request.inputs[0]
    error = await refused(calls.ModelInfer(request))
    assert error.code() == Code.INVALID_ARGUMENT
    assert "FP16 travels in raw_input_contents only" in error.details()


# -------------------------------------------------------------------------------- errors


async def test_bad_requests_are_invalid_argument_without_a_traceback(
    mlp: Server, channel: Any
) -> None:
    calls = stub(channel(mlp))
    bad_datatype = raw_request("mlp", {"input": x64(1)})
    bad_datatype.inputs[0].datatype = "FP99"
    bad_shape = raw_request("mlp", {"input": np.ones((1, 63), np.float32)})
    short = raw_request("mlp", {"input": x64(2)})
    short.raw_input_contents[0] = short.raw_input_contents[0][:-4]
    bfloat = raw_request("mlp", {"input": x64(1)})
    bfloat.inputs[0].datatype = "BF16"
    wrong_name = raw_request("mlp", {"nope": x64(1)})
    missing_raw = raw_request("mlp", {"input": x64(1)})
    missing_raw.inputs.add(name="other", datatype="FP32", shape=[1])
    no_inputs = pb.ModelInferRequest(model_name="mlp")
    twice = raw_request("mlp", {"input": x64(1)})
    twice.outputs.add(name="probabilities")
    twice.outputs.add(name="probabilities")
    timeout = raw_request("mlp", {"input": x64(1)})
    timeout.parameters["timeout"].string_param = "soon"
    for request, reason in [
        (bad_datatype, "unknown datatype 'FP99'"),
        (bad_shape, "input"),
        (short, "needs 512 bytes"),
        (bfloat, "unknown datatype 'BF16'"),
        (wrong_name, "nope"),
        (missing_raw, "raw contents come for every input or for none"),
        (no_inputs, "at least one input"),
        (twice, "requested twice"),
        (timeout, "parameters.timeout"),
    ]:
        error = await refused(calls.ModelInfer(request))
        assert error.code() == Code.INVALID_ARGUMENT, (reason, error)
        assert reason in error.details()
        assert "Traceback" not in error.details()


async def test_unknown_models_and_versions_are_not_found(mlp: Server, channel: Any) -> None:
    calls = stub(channel(mlp))
    error = await refused(calls.ModelInfer(raw_request("nope", {"input": x64(1)})))
    assert error.code() == Code.NOT_FOUND
    assert "unknown model 'nope'" in error.details()
    request = raw_request("mlp", {"input": x64(1)}, model_version="7")
    error = await refused(calls.ModelInfer(request))
    assert error.code() == Code.NOT_FOUND
    assert "no version '7'" in error.details()
    error = await refused(calls.ModelMetadata(pb.ModelMetadataRequest(name="nope")))
    assert error.code() == Code.NOT_FOUND
    error = await refused(calls.ModelReady(pb.ModelReadyRequest(name="mlp", version="7")))
    assert error.code() == Code.NOT_FOUND


async def test_over_the_limits_is_resource_exhausted_without_a_retry_hint(
    start_server: StartServer, mlp_path: Path, channel: Any
) -> None:
    server = await start_server(
        Engine(mlp_path, name="mlp"), grpc_port=0, max_tensor_elements=100,
        max_body_bytes=64 * 1024,
    )  # fmt: skip
    calls = stub(channel(server))
    error = await refused(calls.ModelInfer(raw_request("mlp", {"input": x64(2)})))
    assert error.code() == Code.RESOURCE_EXHAUSTED  # 128 elements, over 100
    assert "the limit is 100" in error.details()
    assert "retry-after" not in trailing(error)
    # A message over --max-body-mb is refused by gRPC itself, with the same code.
    big = raw_request("mlp", {"input": x64(1)})
    big.raw_input_contents[0] = bytes(128 * 1024)
    error = await refused(calls.ModelInfer(big))
    assert error.code() == Code.RESOURCE_EXHAUSTED
    # Still serving: a call within the limits
    response = await calls.ModelInfer(raw_request("mlp", {"input": x64(1)}))
    assert output(response, "probabilities").shape == (1, 10)


async def test_a_failed_run_is_internal_for_that_call_only(
    start_server: StartServer, gather_path: Path, channel: Any
) -> None:
    server = await start_server(Engine(gather_path, name="gather"), grpc_port=0)
    calls = stub(channel(server))
    error = await refused(
        calls.ModelInfer(raw_request("gather", {"index": np.array([[99]], np.int64)}))
    )
    assert error.code() == Code.INTERNAL
    assert "out of data bounds" in error.details()
    assert "Traceback" not in error.details()
    response = await calls.ModelInfer(raw_request("gather", {"index": np.array([[3]], np.int64)}))
    assert output(response, "value").tolist() == [[30.0]]


async def test_draining_is_unavailable_with_a_retry_hint_and_not_serving(
    mlp: Server, channel: Any
) -> None:
    calls = stub(channel(mlp))
    health = health_pb2_grpc.HealthStub(channel(mlp))
    check = health_pb2.HealthCheckRequest
    serving = health_pb2.HealthCheckResponse.SERVING
    assert (await health.Check(check())).status == serving
    assert (await health.Check(check(service="inference.GRPCInferenceService"))).status == serving
    assert (await calls.ServerReady(pb.ServerReadyRequest())).ready
    mlp.app[STATE].accepting = False  # what SIGTERM does first
    assert (await health.Check(check())).status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert not (await calls.ServerReady(pb.ServerReadyRequest())).ready
    assert (await calls.ServerLive(pb.ServerLiveRequest())).live
    error = await refused(calls.ModelInfer(raw_request("mlp", {"input": x64(1)})))
    assert error.code() == Code.UNAVAILABLE
    assert "shutting down" in error.details()
    assert trailing(error)["retry-after"] == "1"
    error = await refused(health.Check(check(service="no.such.Service")))
    assert error.code() == Code.NOT_FOUND


async def test_the_api_key_guards_every_rpc_but_health(
    start_server: StartServer, mlp_path: Path, channel: Any, http: aiohttp.ClientSession
) -> None:
    server = await start_server(Engine(mlp_path, name="mlp"), grpc_port=0, api_key="k")
    calls = stub(channel(server))
    request = raw_request("mlp", {"input": x64(1)})
    for metadata in [(), (("authorization", "Bearer wrong"),), (("authorization", "k"),)]:
        error = await refused(calls.ModelInfer(request, metadata=metadata))
        assert error.code() == Code.UNAUTHENTICATED
        assert "API key" in error.details()
    for rpc, message in [
        (calls.ModelReady, pb.ModelReadyRequest(name="mlp")),
        (calls.ModelMetadata, pb.ModelMetadataRequest(name="nope")),  # no probing names
        (calls.RepositoryIndex, pb.RepositoryIndexRequest()),
        (calls.ModelConfig, pb.ModelConfigRequest(name="mlp")),
    ]:
        assert (await refused(rpc(message))).code() == Code.UNAUTHENTICATED
    # No request sent on it: the refusal must come from the stream's start, and a message in
    # flight while the server ends the call can fail on the client's side first (INTERNAL).
    stream = calls.ModelStreamInfer(iter([]))
    assert (await refused(stream.read())).code() == Code.UNAUTHENTICATED
    key = (("authorization", "Bearer k"),)
    response = await calls.ModelInfer(request, metadata=key)
    assert output(response, "probabilities").shape == (1, 10)
    # Server liveness and readiness stay public, as HTTP's health endpoints: probes carry no key.
    assert (await calls.ServerLive(pb.ServerLiveRequest())).live
    assert (await calls.ServerReady(pb.ServerReadyRequest())).ready
    health = health_pb2_grpc.HealthStub(channel(server))
    status = (await health.Check(health_pb2.HealthCheckRequest())).status
    assert status == health_pb2.HealthCheckResponse.SERVING
    async with http.get(f"{server.url}/metrics") as r:  # refusals count under the model
        text = await r.text()
    assert 'batchserve_requests_total{model="mlp",protocol="grpc",status_class="4xx"} 3.0' in text
    assert 'batchserve_requests_total{model="mlp",protocol="grpc",status_class="2xx"} 1.0' in text


async def test_triton_extensions_it_lacks_are_unimplemented(mlp: Server, channel: Any) -> None:
    calls = stub(channel(mlp))
    error = await refused(calls.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest()))
    assert error.code() == Code.UNIMPLEMENTED
    error = await refused(calls.TraceSetting(pb.TraceSettingRequest()))
    assert error.code() == Code.UNIMPLEMENTED


# -------------------------------------------------------------------------------- queueing


def slow_request(rows: int, **fields: Any) -> Any:
    return raw_request("slow", {"x": np.zeros((rows, 1024), np.float32)}, **fields)


@pytest.fixture
async def slow(start_server: StartServer, slow_path: Path) -> tuple[Server, Engine]:
    engine = Engine(slow_path, BatchConfig(max_batch_size=4136, max_queue_rows=16), name="slow")
    return await start_server(engine, grpc_port=0, access_log=True), engine


async def busy(calls: Any, engine: Engine) -> asyncio.Future[Any]:
    """A big call that holds the only session (a run of about a second), once it runs."""
    task = asyncio.ensure_future(calls.ModelInfer(slow_request(4096)))
    await wait_until(lambda: engine.statistics().batcher.in_flight_batches == 1, "a big run")
    return task


@pytest.mark.slow
async def test_a_full_queue_is_resource_exhausted_with_a_retry_hint(
    slow: tuple[Server, Engine], channel: Any
) -> None:
    server, engine = slow
    calls = stub(channel(server))
    running = await busy(calls, engine)
    waiting = asyncio.ensure_future(calls.ModelInfer(slow_request(16)))
    await wait_until(lambda: engine.statistics().batcher.queued_rows == 16, "a full queue")
    error = await refused(calls.ModelInfer(slow_request(1)))
    assert error.code() == Code.RESOURCE_EXHAUSTED
    assert "queue full" in error.details()
    assert trailing(error)["retry-after"] == "1"
    assert output(await running, "y").shape == (4096, 1024)
    assert output(await waiting, "y").shape == (16, 1024)


@pytest.mark.slow
@pytest.mark.parametrize("deadline", ["parameters.timeout", "grpc"])
async def test_a_deadline_passed_in_the_queue_withdraws_the_call(
    slow: tuple[Server, Engine], channel: Any, deadline: str
) -> None:
    server, engine = slow
    calls = stub(channel(server))
    running = await busy(calls, engine)
    # Taking in the big call (16 MB) held the event loop: until its lag has settled, admission
    # counts that lag as the late call's wait and may refuse it (a clean-clone run saw 49 ms
    # against 80% of 50) instead of queueing it. The big run itself is in its session thread.
    lag = server.app[STATE].lag
    await wait_until(lambda: lag.smoothed_s < 0.02, "the event loop on time again")
    # A deadline far shorter than what is left of the big run (about a second on 2 cores):
    # it passes while the call waits in the queue, however fast the machine.
    if deadline == "grpc":
        late = calls.ModelInfer(slow_request(2), timeout=0.05)
    else:
        late = calls.ModelInfer(slow_request(2, parameters={"timeout": pb.InferParameter(
            int64_param=50_000)}))  # fmt: skip
    error = await refused(late)
    assert error.code() == Code.DEADLINE_EXCEEDED
    await running
    stats = engine.statistics().batcher
    assert stats.rows == 4096  # the late call's rows never reached a session
    assert stats.queued_rows == 0


@pytest.mark.slow
async def test_a_cancelled_call_withdraws_its_queued_work(
    slow: tuple[Server, Engine], channel: Any
) -> None:
    server, engine = slow
    calls = stub(channel(server))
    running = await busy(calls, engine)
    gone = calls.ModelInfer(slow_request(2))
    waiting = asyncio.ensure_future(gone)
    await wait_until(lambda: engine.statistics().batcher.queued_rows == 2, "the call queued")
    gone.cancel()  # the client goes away while its call waits
    await wait_until(lambda: engine.statistics().batcher.cancelled == 1, "the call withdrawn")
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await running
    assert engine.statistics().batcher.rows == 4096
    # A stream that goes away withdraws what it had queued too.
    stream = calls.ModelStreamInfer()
    await stream.write(slow_request(4096))
    await wait_until(lambda: engine.statistics().batcher.in_flight_batches == 1, "a big run")
    await stream.write(slow_request(3))
    await wait_until(lambda: engine.statistics().batcher.queued_rows == 3, "the rows queued")
    stream.cancel()  # its big run goes on; its queued call is withdrawn
    await wait_until(lambda: engine.statistics().batcher.cancelled == 2, "the call withdrawn")
    assert engine.statistics().batcher.queued_rows == 0


@pytest.mark.slow
async def test_batching_merges_grpc_and_http_calls_into_the_same_runs(
    slow: tuple[Server, Engine],
    channel: Any,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="batchserve.access")
    server, engine = slow
    calls = stub(channel(server))
    running = await busy(calls, engine)
    body = {"inputs": [{"name": "x", "shape": [1, 1024], "datatype": "FP32",
                        "data": [0.0] * 1024}]}  # fmt: skip

    async def post() -> int:
        async with http.post(f"{server.url}/v2/models/slow/infer", json=body) as r:
            await r.read()
            return r.status

    posts = [asyncio.create_task(post()) for _ in range(4)]
    rpcs = [asyncio.ensure_future(calls.ModelInfer(slow_request(1))) for _ in range(4)]
    await wait_until(lambda: engine.statistics().batcher.queued_rows == 8, "all eight queued")
    await running
    assert await asyncio.gather(*posts) == [200] * 4
    assert all(output(r, "y").shape == (1, 1024) for r in await asyncio.gather(*rpcs))
    stats = engine.statistics().batcher
    assert (stats.requests, stats.batches) == (9, 2)  # the big run, then all eight in one

    def lines() -> list[dict[str, Any]]:
        found = [r.getMessage() for r in caplog.records if r.name == "batchserve.access"]
        return [json.loads(line) for line in found]

    await wait_until(lambda: len(lines()) == 9, "nine access log lines")
    shared = {(line["protocol"], line["batch_rows"]) for line in lines() if line["batch_rows"] < 9}
    assert shared == {("http", 8), ("grpc", 8)}
    async with http.get(f"{server.url}/metrics") as r:
        text = await r.text()
    assert 'batchserve_requests_total{model="slow",protocol="grpc",status_class="2xx"} 5.0' in text
    assert 'batchserve_requests_total{model="slow",protocol="http",status_class="2xx"} 4.0' in text


async def test_hundreds_of_concurrent_calls_get_their_own_answers(
    start_server: StartServer, mlp_path: Path
) -> None:
    engine = Engine(mlp_path, BatchConfig(max_batch_size=64, max_latency_ms=5), name="mlp")
    server = await start_server(engine, grpc_port=0)
    rng = np.random.default_rng(11)
    inputs = [x64(int(rows), seed=i) for i, rows in enumerate(rng.integers(1, 17, 300))]
    async with aioclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}") as client:

        async def infer(index: int, x: np.ndarray) -> Any:
            tensor = aioclient.InferInput("input", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x)
            return await client.infer("mlp", [tensor], request_id=str(index))

        results = await asyncio.gather(*(infer(i, x) for i, x in enumerate(inputs)))
    session = ort.InferenceSession(str(mlp_path), providers=["CPUExecutionProvider"])
    for index, (x, result) in enumerate(zip(inputs, results, strict=True)):
        assert result.get_response().id == str(index)
        expected = session.run(None, {"input": x})[0]
        np.testing.assert_allclose(result.as_numpy("probabilities"), expected, rtol=1e-5, atol=1e-6)
    stats = engine.statistics().batcher
    assert stats.batches < stats.requests == 300


# -------------------------------------------------------------------------------- repository


@pytest.fixture
async def repository_server(tmp_path: Path) -> AsyncIterator[Server]:
    write_config(tmp_path, "alpha", "[version_policy]\nall = true\n")
    add_version(tmp_path, "alpha", "1", 1.0)
    add_version(tmp_path, "alpha", "2", 2.0)
    factory = engine_factory(BatchConfig(), RuntimeConfig(), CacheConfig())
    repository = ModelRepository.from_directory(tmp_path, factory)
    async with Server(repository, ServerConfig(port=0, grpc_port=0)) as server:
        yield server


async def test_repository_index_load_and_unload(repository_server: Server, channel: Any) -> None:
    calls = stub(channel(repository_server))
    index = await calls.RepositoryIndex(pb.RepositoryIndexRequest())
    assert [(m.name, m.version, m.state) for m in index.models] == [
        ("alpha", "1", "READY"),
        ("alpha", "2", "READY"),
    ]
    await calls.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="alpha"))
    index = await calls.RepositoryIndex(pb.RepositoryIndexRequest())
    assert {(m.state, m.reason) for m in index.models} == {("UNAVAILABLE", "unloaded")}
    assert not (await calls.RepositoryIndex(pb.RepositoryIndexRequest(ready=True))).models
    x = {"x": np.array(X, np.float32)}
    error = await refused(calls.ModelInfer(raw_request("alpha", x)))
    assert error.code() == Code.UNAVAILABLE
    await calls.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="alpha"))
    response = await calls.ModelInfer(raw_request("alpha", x))
    assert response.model_version == "2"
    np.testing.assert_array_equal(output(response, "y"), np.array(X) * 2)
    request = pb.RepositoryModelLoadRequest(model_name="nope")
    assert (await refused(calls.RepositoryModelLoad(request))).code() == Code.NOT_FOUND


async def test_model_config_and_statistics_in_triton_form(
    repository_server: Server, channel: Any
) -> None:
    calls = stub(channel(repository_server))
    x = {"x": np.array(X, np.float32)}
    await calls.ModelInfer(raw_request("alpha", x, model_version="1"))
    await calls.ModelInfer(raw_request("alpha", x, model_version="1"))
    config = (await calls.ModelConfig(pb.ModelConfigRequest(name="alpha"))).config
    assert (config.name, config.platform, config.max_batch_size) == (
        "alpha",
        "onnxruntime_onnx",
        64,
    )
    assert [(t.name, list(t.dims)) for t in config.input] == [("x", [4])]
    assert config.dynamic_batching.max_queue_delay_microseconds == 2000
    assert list(config.version_policy.specific.versions) == [1, 2]
    request = pb.ModelStatisticsRequest(name="alpha", version="1")
    (stats,) = (await calls.ModelStatistics(request)).model_stats
    assert (stats.name, stats.version, stats.inference_count) == ("alpha", "1", 2)
    assert stats.inference_stats.success.count == 2
    every = await calls.ModelStatistics(pb.ModelStatisticsRequest())
    assert sorted(s.version for s in every.model_stats) == ["1", "2"]
    error = await refused(calls.ModelConfig(pb.ModelConfigRequest(name="alpha", version="9")))
    assert error.code() == Code.NOT_FOUND


async def test_grpc_can_be_off(start_server: StartServer, mlp_path: Path) -> None:
    server = await start_server(Engine(mlp_path, name="mlp"))  # grpc_port None
    assert server.grpc is None
    with pytest.raises(RuntimeError, match="gRPC is off"):
        _ = server.grpc_port


# -------------------------------------------------------------------------------- handlers


@pytest.mark.slow
async def test_a_handler_model_takes_encoded_images_as_bytes(
    start_server: StartServer, tmp_path: Path
) -> None:
    resnet50 = write_example("resnet50", tmp_path / "resnet50.onnx")
    engine = Engine(
        resnet50,
        BatchConfig(max_batch_size=8),
        RuntimeConfig(spin=False),
        name="resnet50",
        handler=HandlerConfig("image-classification", (("top_k", "3"),), workers=1),
    )
    server = await start_server(engine, grpc_port=0)
    images = np.array([encode(photo(200, 200, 3), "JPEG"), encode(photo(260, 200, 4), "PNG")],
                      dtype=object)  # fmt: skip
    async with aioclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}") as client:
        tensor = aioclient.InferInput("images", [2], "BYTES")
        tensor.set_data_from_numpy(images)
        result = await client.infer("resnet50", [tensor])
    (answer,) = result.as_numpy("predictions")
    labels = json.loads(answer)["predictions"]
    assert len(labels) == 2
    assert [len(top) for top in labels] == [3, 3]


# -------------------------------------------------------------------------------- shutdown


@pytest.mark.slow
async def test_sigterm_drains_grpc_calls_and_streams_losing_none(
    serve_process: StartServerProcess, slow_path: Path, http: aiohttp.ClientSession
) -> None:
    server = serve_process(str(slow_path), "--name", "slow", "--max-batch-size", "4136", grpc=True)
    options = [("grpc.max_receive_message_length", -1)]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}", options) as channel:
        calls = stub(channel)

        def in_flight(count: int) -> Callable[[], Awaitable[bool]]:
            async def check() -> bool:
                async with http.get(f"{server.url}/metrics") as r:
                    return f"batchserve_in_flight_requests {count}.0" in await r.text()

            return check

        unary = [asyncio.ensure_future(calls.ModelInfer(slow_request(4096)))]
        await wait_until(in_flight(1), "a big call running")  # about a second
        unary += [asyncio.ensure_future(calls.ModelInfer(slow_request(8))) for _ in range(5)]
        stream = calls.ModelStreamInfer()
        for index in range(5):
            await stream.write(slow_request(8, id=f"s{index}"))
        # every call is being served when the signal lands
        await wait_until(in_flight(11), "eleven calls in flight")
        stopping = asyncio.ensure_future(asyncio.to_thread(server.stop))
        answers = await asyncio.gather(*unary)
        assert [output(a, "y").shape[0] for a in answers] == [4096] + [8] * 5
        streamed = [await stream.read() for _ in range(5)]
        assert sorted(a.infer_response.id for a in streamed) == [f"s{i}" for i in range(5)]
        assert all(a.error_message == "" for a in streamed)
        assert await stream.read() is grpc.aio.EOF  # closed after its last answer
        assert await stream.code() == Code.OK
        assert await stopping == 0
    assert "gRPC listening on 127.0.0.1:" in server.log
