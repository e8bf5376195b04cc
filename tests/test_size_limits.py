"""Size limits a small request cannot escape: zero-sized dimensions, shapes no array can have,
and answers larger than the response limit (--max-response-mb), against a real server."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

from batchserve import Engine
from batchserve.errors import InferenceFailed, InvalidInput, PayloadTooLarge
from batchserve.handlers import HandlerConfig
from batchserve.handlers.base import RawRequest
from batchserve.protocol import HEADER_LENGTH, decode_request, encode_request

import models
from helpers import StartServer, StartServerProcess

HUGE = 9223372036854775807  # the largest int64


@pytest.fixture(scope="module")
def row_sums_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return models.row_sums(tmp_path_factory.mktemp("size_limits") / "row_sums.onnx")


@pytest.fixture(scope="module")
def column_sums_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return models.column_sums(tmp_path_factory.mktemp("size_limits") / "column_sums.onnx")


def _json_request(shape: list[int], outputs: list[str], data: list[Any] | None = None) -> bytes:
    tensor = {"name": "x", "shape": shape, "datatype": "FP32", "data": data or []}
    return json.dumps({"inputs": [tensor], "outputs": [{"name": n} for n in outputs]}).encode()


def _binary_request(shape: list[int], blob: bytes = b"") -> tuple[bytes, int]:
    tensor = {"name": "x", "shape": shape, "datatype": "FP32",
              "parameters": {"binary_data_size": len(blob)}}  # fmt: skip
    header = json.dumps({"inputs": [tensor], "outputs": [{"name": "total"}]}).encode()
    return header + blob, len(header)


async def _post(
    http: aiohttp.ClientSession, url: str, body: bytes, header_length: int | None = None
) -> tuple[int, bytes]:
    headers = {"Content-Type": "application/json"}
    if header_length is not None:
        headers = {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(header_length)}
    async with http.post(f"{url}/v2/models/sums/infer", data=body, headers=headers) as response:
        return response.status, await response.read()


async def _still_serves(http: aiohttp.ClientSession, url: str) -> None:
    status, body = await _post(http, url, _json_request([2, 3], ["total"], [1, 2, 3, 4, 5, 6]))
    assert status == 200, body
    assert json.loads(body)["outputs"][0]["data"] == [6.0, 15.0]


def _runs(engine: Engine) -> int:
    return engine.statistics().batcher.batches


async def test_zero_length_rows_over_the_element_limit_are_413_not_a_huge_answer(
    start_server: StartServer, http: aiohttp.ClientSession, row_sums_path: Path
) -> None:
    engine = Engine(row_sums_path, name="sums")
    server = await start_server(engine)
    # ~100 bytes that hold no element but ask for 20,000,000 sums (80 MB of JSON zeros).
    status, body = await _post(http, server.url, _json_request([20_000_000, 0], ["total"]))
    assert status == 413, body[:200]
    assert len(body) < 1000
    assert "20000000" in json.loads(body)["error"]
    status, body = await _post(http, server.url, *_binary_request([20_000_000, 0]))
    assert status == 413, body[:200]
    assert _runs(engine) == 0
    await _still_serves(http, server.url)


@pytest.mark.parametrize("shape", [[0, HUGE], [HUGE, 0], [0, 1 << 62, 4], [0, 1 << 64]])
async def test_a_shape_no_array_can_have_is_400_in_json_and_binary(
    start_server: StartServer, http: aiohttp.ClientSession, row_sums_path: Path, shape: list[int]
) -> None:
    server = await start_server(Engine(row_sums_path, name="sums"))
    status, body = await _post(http, server.url, _json_request(shape, ["total"]))
    assert status == 400, body[:200]
    assert "shape" in json.loads(body)["error"]
    status, body = await _post(http, server.url, *_binary_request(shape))
    assert status == 400, body[:200]
    await _still_serves(http, server.url)


async def test_rows_whose_outputs_exceed_the_response_limit_are_refused_before_running(
    start_server: StartServer, http: aiohttp.ClientSession, row_sums_path: Path
) -> None:
    engine = Engine(row_sums_path, name="sums")
    # The element limit alone would let 20,000,000 empty rows through.
    server = await start_server(engine, max_tensor_elements=10**9)
    for body, length in [
        (_json_request([20_000_000, 0], ["total"]), None),
        _binary_request([20_000_000, 0]),
        (_json_request([20_000_000, 0], ["same"]), None),  # `total` is computed all the same
    ]:
        status, answer = await _post(http, server.url, body, length)
        assert status == 413, answer[:200]
        assert "response limit" in json.loads(answer)["error"]
    assert _runs(engine) == 0  # refused from the outputs' declared shapes, before any run
    await _still_serves(http, server.url)


async def test_a_response_over_max_response_bytes_is_413(
    start_server: StartServer, http: aiohttp.ClientSession, row_sums_path: Path
) -> None:
    server = await start_server(Engine(row_sums_path, name="sums"), max_response_bytes=4096)
    # About 11 bytes per value as JSON text: 4,400 in all.
    values = np.random.default_rng(0).standard_normal((4, 100)).astype(np.float32)
    # `same` has a free dimension besides the batch: only its encoder can tell its size.
    status, body = await _post(
        http, server.url, _json_request([4, 100], ["same"], values.ravel().tolist())
    )
    assert status == 413, body[:200]
    assert "4096" in json.loads(body)["error"]
    # The same outputs as binary take 1,600 bytes: within the limit.
    request, length = encode_request({"x": values}, outputs=["same"], binary_outputs=True)
    status, body = await _post(http, server.url, request, length)
    assert status == 200
    # Small values are short text: 400 of them fit as JSON although the widest would not.
    small = np.arange(400, dtype=np.float32) % 10
    status, body = await _post(http, server.url, _json_request([4, 100], ["same"], small.tolist()))
    assert status == 200, body[:200]
    assert json.loads(body)["outputs"][0]["data"] == small.tolist()
    # Too many rows for `total` (4 bytes each) is refused before the model runs.
    status, body = await _post(http, server.url, _json_request([2000, 0], ["total"]))
    assert status == 413, body[:200]
    await _still_serves(http, server.url)


class Padder:
    """A handler for the `row_sums` model: a `text/plain` body `ROWS PAD` runs ROWS rows of
    ones and answers their sums plus PAD bytes of padding."""

    media_types = frozenset({"text/plain"})

    def preprocess(self, request: RawRequest) -> dict[str, np.ndarray]:
        rows = int(request.body.split()[0])
        return {"x": np.ones((rows, 2), np.float32)}

    def postprocess(self, outputs: Mapping[str, np.ndarray], request: RawRequest) -> Any:
        return {"totals": outputs["total"].tolist(), "pad": "x" * int(request.body.split()[1])}


async def test_handler_answers_are_held_to_the_response_limit(
    start_server: StartServer, http: aiohttp.ClientSession, row_sums_path: Path
) -> None:
    handler = HandlerConfig(f"{__name__}:Padder", workers=1)
    engine = Engine(row_sums_path, name="sums", handler=handler)
    server = await start_server(engine, max_response_bytes=4096)
    url = f"{server.url}/v2/models/sums/infer"

    async def post(text: str) -> tuple[int, Any]:
        async with http.post(url, data=text, headers={"Content-Type": "text/plain"}) as r:
            return r.status, await r.json()

    assert await post("3 0") == (200, {"totals": [2.0, 2.0, 2.0], "pad": ""})
    status, answer = await post("2000 0")  # the tensors the handler made: 8,000 bytes of sums
    assert status == 413, answer
    assert "response limit" in answer["error"]
    assert _runs(engine) == 1
    status, answer = await post("3 5000")  # the handler's own answer grows past the limit
    assert status == 413, answer
    assert "handler's answer" in answer["error"]
    assert await post("1 0") == (200, {"totals": [2.0], "pad": ""})


async def test_the_library_path_takes_a_response_limit(row_sums_path: Path) -> None:
    async with Engine(row_sums_path, name="sums") as engine:
        empty_rows = np.zeros((20_000_000, 0), dtype=np.float32)
        with pytest.raises(PayloadTooLarge, match="response limit of 1048576"):
            await engine.infer({"x": empty_rows}, max_output_bytes=1 << 20)
        assert _runs(engine) == 0
        outputs = await engine.infer({"x": np.ones((3, 2), np.float32)}, max_output_bytes=1 << 20)
        assert outputs["total"].tolist() == [2.0, 2.0, 2.0]


async def test_a_request_of_zero_rows_gets_no_rows_back(column_sums_path: Path) -> None:
    # The model sums over the batch axis: zero rows would come back as one value per column.
    async with Engine(column_sums_path, name="columns") as engine:
        with pytest.raises(InferenceFailed, match="0 rows"):
            await engine.infer({"x": np.zeros((0, 1000), np.float32)})
        outputs = await engine.infer({"x": np.ones((3, 3), np.float32)})
        assert outputs["total"].tolist() == [3.0, 3.0, 3.0]


def test_decoder_bounds_each_dimension_and_refuses_impossible_shapes() -> None:
    with pytest.raises(PayloadTooLarge, match="no elements"):
        decode_request(_json_request([20_000_000, 0], ["total"]))
    for shape in ([0, HUGE], [HUGE, 0, 0], [0, 1 << 61]):
        body, length = _binary_request(shape)
        with pytest.raises(InvalidInput, match="too large") as err:
            decode_request(body, length)
        assert err.value.status == 400


@pytest.mark.slow
async def test_the_serve_command_takes_max_response_mb(
    row_sums_path: Path, serve_process: StartServerProcess
) -> None:
    # 0.004 MiB: 4,194 bytes.
    server = serve_process(str(row_sums_path), "--name", "sums", "--max-response-mb", "0.004")
    try:
        async with aiohttp.ClientSession() as http:
            status, body = await _post(http, server.url, _json_request([2000, 0], ["total"]))
            assert status == 413, body[:200]
            assert "response limit of 4194" in json.loads(body)["error"]
            await _still_serves(http, server.url)
        assert server.stop() == 0
    finally:
        server.kill()
