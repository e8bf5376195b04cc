"""The Open Inference Protocol over real HTTP on loopback, against real ONNX Runtime sessions."""

from __future__ import annotations

import asyncio
import io
import json
import struct
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import onnxruntime as ort
import pytest

from batchserve import BatchConfig, CacheConfig, Engine
from batchserve.http import STATE
from batchserve.queue import BatcherStatistics

from helpers import StartServer, wait_until
from models import ECHO_TYPES

V2_DTYPES = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}


def infer_body(x: np.ndarray, **extra: Any) -> dict[str, Any]:
    tensor = {
        "name": "input",
        "shape": list(x.shape),
        "datatype": "FP32",
        "data": x.ravel().tolist(),
    }
    return {"inputs": [tensor], **extra}


def binary_body(tensors: dict[str, tuple[str, np.ndarray]], **extra: Any) -> tuple[bytes, int]:
    header: dict[str, Any] = {"inputs": [], **extra}
    blobs = []
    for name, (datatype, array) in tensors.items():
        if datatype == "BYTES":
            blob = b"".join(struct.pack("<I", len(s.encode())) + s.encode() for s in array.flat)
        else:
            blob = np.ascontiguousarray(array).tobytes()
        header["inputs"].append(
            {
                "name": name,
                "shape": list(array.shape),
                "datatype": datatype,
                "parameters": {"binary_data_size": len(blob)},
            }
        )
        blobs.append(blob)
    raw = json.dumps(header).encode()
    return raw + b"".join(blobs), len(raw)


def split_binary_response(body: bytes, header_length: int) -> dict[str, np.ndarray]:
    header = json.loads(body[:header_length])
    offset, result = header_length, {}
    for output in header["outputs"]:
        size = output["parameters"]["binary_data_size"]
        raw = body[offset : offset + size]
        offset += size
        if output["datatype"] == "BYTES":
            values, pos = [], 0
            while pos < len(raw):
                (n,) = struct.unpack_from("<I", raw, pos)
                values.append(raw[pos + 4 : pos + 4 + n].decode())
                pos += 4 + n
            result[output["name"]] = np.array(values, dtype=object).reshape(output["shape"])
        else:
            dtype = V2_DTYPES[output["datatype"]]
            result[output["name"]] = np.frombuffer(raw, dtype=dtype).reshape(output["shape"])
    assert offset == len(body)
    return result


async def post(
    http: aiohttp.ClientSession, url: str, body: Any, **kwargs: Any
) -> tuple[int, dict[str, Any]]:
    async with http.post(url, json=body, **kwargs) as response:
        assert response.content_type == "application/json"
        return response.status, await response.json()


@pytest.fixture
async def mlp_server(start_server: StartServer, mlp_path: Path) -> str:
    server = await start_server(Engine(mlp_path, name="mlp"), max_body_bytes=256 * 1024)
    return server.url


async def test_health_and_server_metadata(mlp_server: str, http: aiohttp.ClientSession) -> None:
    async with http.get(f"{mlp_server}/v2") as r:
        meta = await r.json()
    assert meta["name"] == "batchserve"
    assert "binary_tensor_data" in meta["extensions"]
    async with http.get(f"{mlp_server}/v2/health/live") as r:
        assert r.status == 200
    async with http.get(f"{mlp_server}/v2/health/ready") as r:
        assert r.status == 200


async def test_model_metadata_and_readiness(mlp_server: str, http: aiohttp.ClientSession) -> None:
    for path in ("/v2/models/mlp", "/v2/models/mlp/versions/1"):
        async with http.get(mlp_server + path) as r:
            assert r.status == 200
            meta = await r.json()
        assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]
        assert meta["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}]
        assert meta["versions"] == ["1"]
        async with http.get(mlp_server + path + "/ready") as r:
            assert r.status == 200


@pytest.mark.parametrize(
    ("method", "path", "status", "message"),
    [
        ("GET", "/v2/models/nope", 404, "unknown model 'nope'"),
        ("GET", "/v2/models/mlp/versions/7", 404, "no version '7'"),
        ("GET", "/v2/models/nope/ready", 404, "unknown model"),
        ("POST", "/v2/models/nope/infer", 404, "unknown model"),
        ("POST", "/v2/models/mlp/versions/2/infer", 404, "no version '2'"),
        ("GET", "/v3/anything", 404, "no endpoint GET /v3/anything"),
        ("DELETE", "/v2/models/mlp/infer", 405, "DELETE is not allowed on /v2/models/mlp/infer"),
        ("POST", "/v2/health/live", 405, "use GET, HEAD"),
    ],
)
async def test_unknown_models_versions_and_paths_are_json_404(
    mlp_server: str, http: aiohttp.ClientSession, method: str, path: str, status: int, message: str
) -> None:
    async with http.request(method, mlp_server + path, json={"inputs": []}) as r:
        assert r.status == status
        assert message in (await r.json())["error"]
        if status == 405:
            assert r.headers["Allow"] in ("POST", "GET, HEAD")


async def test_json_infer_matches_onnxruntime_and_echoes_id(
    mlp_server: str, http: aiohttp.ClientSession, mlp_path: Path
) -> None:
    x = np.random.default_rng(5).standard_normal((3, 64)).astype(np.float32)
    body = infer_body(x, id="req-42", parameters={"tenant": "a"})
    status, answer = await post(http, f"{mlp_server}/v2/models/mlp/infer", body)
    assert status == 200
    assert answer["id"] == "req-42"
    assert answer["model_name"] == "mlp"
    assert answer["model_version"] == "1"
    assert answer["parameters"] == {"tenant": "a"}
    (output,) = answer["outputs"]
    assert output["name"] == "probabilities"
    assert output["datatype"] == "FP32"
    assert output["shape"] == [3, 10]
    expected = ort.InferenceSession(str(mlp_path)).run(None, {"input": x})[0]
    np.testing.assert_allclose(np.array(output["data"]).reshape(3, 10), expected, rtol=1e-5)


async def test_nested_data_is_accepted(mlp_server: str, http: aiohttp.ClientSession) -> None:
    x = np.ones((2, 64), dtype=np.float32)
    body = {"inputs": [{"name": "input", "shape": [2, 64], "datatype": "FP32", "data": x.tolist()}]}
    status, answer = await post(http, f"{mlp_server}/v2/models/mlp/infer", body)
    assert status == 200
    assert answer["outputs"][0]["shape"] == [2, 10]


async def test_concurrent_http_clients_never_get_mixed_answers(
    mlp_server: str, http: aiohttp.ClientSession, mlp_path: Path
) -> None:
    rng = np.random.default_rng(6)
    inputs = [
        rng.standard_normal((int(rng.integers(1, 6)), 64)).astype(np.float32) for _ in range(300)
    ]
    url = f"{mlp_server}/v2/models/mlp/infer"
    answers = await asyncio.gather(
        *(post(http, url, infer_body(x, id=str(i))) for i, x in enumerate(inputs))
    )
    session = ort.InferenceSession(str(mlp_path))
    for i, (x, (status, answer)) in enumerate(zip(inputs, answers, strict=True)):
        assert status == 200
        assert answer["id"] == str(i)
        got = np.array(answer["outputs"][0]["data"], dtype=np.float32).reshape(-1, 10)
        np.testing.assert_allclose(got, session.run(None, {"input": x})[0], rtol=1e-5, atol=1e-6)
    async with http.get(f"{mlp_server}/v2/models/mlp/stats") as r:
        stats = (await r.json())["model_stats"][0]
    assert stats["request_count"] == 300
    assert stats["execution_count"] < 300


@pytest.mark.parametrize("binary_output", [True, False])
async def test_every_datatype_round_trips_through_the_binary_extension(
    start_server: StartServer, echo_path: Path, http: aiohttp.ClientSession, binary_output: bool
) -> None:
    server = await start_server(Engine(echo_path, name="echo"))
    rng = np.random.default_rng(7)
    tensors: dict[str, tuple[str, np.ndarray]] = {}
    for datatype in ECHO_TYPES:
        if datatype == "BYTES":
            array = np.array([["a", "héllo"], ["", "xyz"], ["1", "2"]], dtype=object)
        else:
            array = (rng.random((3, 2)) * 100).astype(V2_DTYPES[datatype])
        tensors[f"x_{datatype}"] = (datatype, array)
    body, header_length = binary_body(
        tensors, parameters={"binary_data_output": True} if binary_output else {}
    )
    headers = {"Inference-Header-Content-Length": str(header_length)}
    async with http.post(f"{server.url}/v2/models/echo/infer", data=body, headers=headers) as r:
        assert r.status == 200, await r.text()
        raw = await r.read()
        if binary_output:
            outputs = split_binary_response(raw, int(r.headers["Inference-Header-Content-Length"]))
        else:
            assert "Inference-Header-Content-Length" not in r.headers
            outputs = {o["name"]: np.array(o["data"]) for o in json.loads(raw)["outputs"]}
    for datatype, (_, array) in ((d, tensors[f"x_{d}"]) for d in ECHO_TYPES):
        got = outputs[f"y_{datatype}"].reshape(array.shape)
        if datatype == "BYTES":
            assert got.tolist() == array.tolist()
        else:
            np.testing.assert_array_equal(got.astype(array.dtype), array)


async def test_every_datatype_round_trips_through_json(
    start_server: StartServer, echo_path: Path, http: aiohttp.ClientSession
) -> None:
    server = await start_server(Engine(echo_path, name="echo"))
    inputs = []
    for datatype in ECHO_TYPES:
        if datatype == "BYTES":
            data: list[Any] = ["a", "b", "c", "d"]
        elif datatype == "BOOL":
            data = [True, False, False, True]
        else:
            data = [1, 2, 3, 4]
        inputs.append(
            {"name": f"x_{datatype}", "shape": [2, 2], "datatype": datatype, "data": data}
        )
    status, answer = await post(http, f"{server.url}/v2/models/echo/infer", {"inputs": inputs})
    assert status == 200, answer
    by_name = {o["name"]: o for o in answer["outputs"]}
    for tensor in inputs:
        output = by_name["y_" + tensor["datatype"]]
        assert output["datatype"] == tensor["datatype"]
        assert output["shape"] == [2, 2]
        assert output["data"] == tensor["data"]


async def test_requested_outputs_and_per_output_binary_flag(
    start_server: StartServer, two_inputs_path: Path, http: aiohttp.ClientSession
) -> None:
    server = await start_server(Engine(two_inputs_path, name="two"))
    body = {
        "inputs": [
            {"name": "a", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]},
            {"name": "b", "shape": [1, 2], "datatype": "INT64", "data": [5, 6]},
        ],
        "outputs": [{"name": "b_twice", "parameters": {"binary_data": True}}, {"name": "sum"}],
    }
    async with http.post(f"{server.url}/v2/models/two/infer", json=body) as r:
        assert r.status == 200
        header_length = int(r.headers["Inference-Header-Content-Length"])
        raw = await r.read()
    header = json.loads(raw[:header_length])
    assert [o["name"] for o in header["outputs"]] == ["b_twice", "sum"]
    assert header["outputs"][1]["data"] == [6.0]
    np.testing.assert_array_equal(np.frombuffer(raw[header_length:], np.int64), [10, 12])


def _input(**changes: Any) -> dict[str, Any]:
    tensor = {"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0.5] * 64}
    tensor.update(changes)
    return {"inputs": [tensor]}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "malformed JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b'{"inputs": []}', "'inputs' must be a non-empty list"),
        (json.dumps(_input(name="other")).encode(), "expects inputs ['input']"),
        (json.dumps(_input(datatype="FP64")).encode(), "has datatype FP64, the model expects FP32"),
        (json.dumps(_input(datatype="FLOAT")).encode(), "unknown datatype 'FLOAT'"),
        (json.dumps(_input(shape=[1, 32], data=[0.5] * 32)).encode(), "shape [1, 32]"),
        (json.dumps(_input(shape=[1, 65])).encode(), "needs 65 elements, data has 64"),
        (json.dumps(_input(data=["x"] * 64)).encode(), "data does not fit FP32"),
        (json.dumps(_input(shape=[1, -64])).encode(), "non-negative integers"),
    ],
)
async def test_malformed_requests_get_400_with_a_reason(
    mlp_server: str, http: aiohttp.ClientSession, body: bytes, message: str
) -> None:
    async with http.post(f"{mlp_server}/v2/models/mlp/infer", data=body) as r:
        assert r.status == 400
        assert message in (await r.json())["error"]


@pytest.mark.parametrize(
    ("declared", "extra", "header_length", "message"),
    [
        (256, b"", None, "only 0 binary bytes remain"),
        (1024, b"", None, "needs 256 bytes, binary_data_size is 1024"),
        (256, b"xx", None, "2 bytes of binary data follow"),
        (256, b"", 10**9, "Inference-Header-Content-Length is 1000000000"),
        (256, b"", "abc", "must be an integer"),
    ],
)
async def test_bad_binary_lengths_get_400(
    mlp_server: str,
    http: aiohttp.ClientSession,
    declared: int,
    extra: bytes,
    header_length: int | str | None,
    message: str,
) -> None:
    x = np.zeros((1, 64), dtype=np.float32)
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": [1, 64],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": declared},
                }
            ]
        }
    ).encode()
    blob = x.tobytes() if declared <= 256 and message != "only 0 binary bytes remain" else b""
    if declared == 1024:
        blob = b"\0" * 1024
    body = header + blob + extra
    length = len(header) if header_length is None else header_length
    headers = {"Inference-Header-Content-Length": str(length)}
    async with http.post(f"{mlp_server}/v2/models/mlp/infer", data=body, headers=headers) as r:
        assert r.status == 400
        assert message in (await r.json())["error"]


async def test_body_over_the_limit_gets_413(mlp_server: str, http: aiohttp.ClientSession) -> None:
    big = np.zeros((1200, 64), dtype=np.float32)  # ~300 KB of JSON, limit is 256 KiB
    status, answer = await post(http, f"{mlp_server}/v2/models/mlp/infer", infer_body(big))
    assert status == 413
    assert "exceeds" in answer["error"]

    async def chunks() -> Any:  # no Content-Length: the limit applies while reading
        for _ in range(40):
            yield b" " * 8192

    async with http.post(f"{mlp_server}/v2/models/mlp/infer", data=chunks()) as r:
        assert r.status == 413
        assert "error" in await r.json()


async def test_not_accepting_gives_503(
    start_server: StartServer, mlp_path: Path, http: aiohttp.ClientSession
) -> None:
    server = await start_server(Engine(mlp_path, name="mlp"))
    server.app[STATE].accepting = False  # what SIGTERM does first
    async with http.get(f"{server.url}/v2/health/ready") as r:
        assert r.status == 503
    status, answer = await post(
        http, f"{server.url}/v2/models/mlp/infer", infer_body(np.ones((1, 64), np.float32))
    )
    assert status == 503
    assert "shutting down" in answer["error"]


async def test_a_failing_run_gives_500_with_the_reason(
    start_server: StartServer, gather_path: Path, http: aiohttp.ClientSession
) -> None:
    server = await start_server(Engine(gather_path, name="gather"))
    url = f"{server.url}/v2/models/gather/infer"

    def body(index: int) -> dict[str, Any]:
        return {
            "inputs": [{"name": "index", "shape": [1, 1], "datatype": "INT64", "data": [index]}]
        }

    status, answer = await post(http, url, body(99))
    assert status == 500
    assert "out of data bounds" in answer["error"]
    status, answer = await post(http, url, body(3))
    assert status == 200
    assert answer["outputs"][0]["data"] == [30.0]


@pytest.mark.slow
async def test_client_disconnect_withdraws_queued_work(
    start_server: StartServer, slow_path: Path, http: aiohttp.ClientSession
) -> None:
    engine = Engine(slow_path, BatchConfig(max_batch_size=8192), name="slow")
    server = await start_server(engine)
    url = f"{server.url}/v2/models/slow/infer"

    def body(rows: int) -> io.BytesIO:
        raw, _ = binary_body({"x": ("FP32", np.zeros((rows, 1024), np.float32))})
        return io.BytesIO(raw)

    def headers(rows: int) -> dict[str, str]:
        _, length = binary_body({"x": ("FP32", np.zeros((rows, 1024), np.float32))})
        return {"Inference-Header-Content-Length": str(length)}

    busy = asyncio.create_task(_status(http, url, body(4096), headers(4096)))

    def stats() -> BatcherStatistics:
        return engine.statistics().batcher

    # the big request occupies the only session (a run of about a second)
    await wait_until(lambda: stats().in_flight_batches == 1, "the big request running")
    gone = asyncio.create_task(_status(http, url, body(2), headers(2)))
    await wait_until(lambda: stats().queued_rows == 2, "the small request queued")
    gone.cancel()  # the client goes away while its request waits
    await wait_until(lambda: stats().cancelled == 1, "the server to withdraw it")
    assert await busy == 200
    assert stats().cancelled == 1
    assert stats().rows == 4096  # the withdrawn rows never reached a session


async def _status(
    http: aiohttp.ClientSession, url: str, body: io.BytesIO, headers: dict[str, str]
) -> int:
    async with http.post(url, data=body, headers=headers) as r:
        await r.read()
        return r.status


async def test_a_zero_row_request_never_spoils_the_batch_it_arrives_with(
    start_server: StartServer, mlp_path: Path, http: aiohttp.ClientSession
) -> None:
    engine = Engine(mlp_path, BatchConfig(max_batch_size=64, max_latency_ms=20), name="mlp")
    server = await start_server(engine)
    rng = np.random.default_rng(5)
    rows = [0 if i % 5 == 0 else 1 + i % 3 for i in range(40)]
    inputs = [rng.standard_normal((n, 64)).astype(np.float32) for n in rows]
    answers = await asyncio.gather(
        *(post(http, f"{server.url}/v2/models/mlp/infer", infer_body(x)) for x in inputs)
    )
    session = ort.InferenceSession(str(mlp_path), providers=["CPUExecutionProvider"])
    for x, (status, answer) in zip(inputs, answers, strict=True):
        assert status == 200, answer
        output = answer["outputs"][0]
        assert output["shape"] == [x.shape[0], 10]
        if x.shape[0]:
            expected = session.run(None, {"input": x})[0]
            got = np.asarray(output["data"], np.float32).reshape(output["shape"])
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    batcher = engine.statistics().batcher
    assert batcher.batches < batcher.requests  # the others did share runs


async def test_a_cache_hit_lists_outputs_in_the_order_asked(
    start_server: StartServer, two_inputs_path: Path, http: aiohttp.ClientSession
) -> None:
    engine = Engine(two_inputs_path, name="two", cache=CacheConfig(size_mb=8))
    server = await start_server(engine)
    inputs = [
        {"name": "a", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]},
        {"name": "b", "shape": [1, 2], "datatype": "INT64", "data": [5, 6]},
    ]
    url = f"{server.url}/v2/models/two/infer"
    for order in (["b_twice", "sum"], ["sum", "b_twice"]):
        body = {"inputs": inputs, "outputs": [{"name": n} for n in order]}
        status, answer = await post(http, url, body)
        assert status == 200
        assert [o["name"] for o in answer["outputs"]] == order
    cache = engine.statistics().cache
    assert cache is not None
    assert cache.local.hits == 1  # the second was answered from the cache


async def test_json_over_its_own_limit_gets_413_and_binary_still_works(
    start_server: StartServer, mlp_path: Path, http: aiohttp.ClientSession
) -> None:
    server = await start_server(Engine(mlp_path, name="mlp"), max_json_bytes=64 * 1024)
    x = np.random.default_rng(1).standard_normal((200, 64)).astype(np.float32)  # ~250 KB JSON
    url = f"{server.url}/v2/models/mlp/infer"
    status, answer = await post(http, url, infer_body(x))
    assert status == 413
    assert "binary tensor extension" in answer["error"]
    body, header_length = binary_body({"input": ("FP32", x)})  # 51 KB of tensor, small JSON
    headers = {"Inference-Header-Content-Length": str(header_length)}
    async with http.post(url, data=body, headers=headers) as r:
        assert r.status == 200
        assert json.loads(await r.read())["outputs"][0]["shape"] == [200, 10]


async def test_refusals_of_a_known_model_are_counted_under_its_name(
    start_server: StartServer, mlp_path: Path, http: aiohttp.ClientSession
) -> None:
    server = await start_server(Engine(mlp_path, name="mlp"), api_key="k")
    body = infer_body(np.ones((1, 64), np.float32))
    status, _ = await post(http, f"{server.url}/v2/models/mlp/infer", body)
    assert status == 401
    status, _ = await post(http, f"{server.url}/v2/models/nope/infer", body)
    assert status == 401
    async with http.get(f"{server.url}/metrics") as r:
        text = await r.text()
    for model in ("mlp", "_unknown"):
        sample = f'batchserve_requests_total{{model="{model}",protocol="http",status_class="4xx"}}'
        assert f"{sample} 1.0" in text
