"""Handlers over HTTP: a JPEG or PNG posted to the infer URL of ResNet-50 with the built-in
image-classification handler, V2 requests with encoded images, errors, a user handler loaded
by `--handler` (real server on 127.0.0.1, real ONNX Runtime)."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path

import aiohttp
import numpy as np
import onnxruntime as ort
import pytest

from batchserve import BatchConfig, Engine, RuntimeConfig
from batchserve.examples import write_example
from batchserve.handlers import HandlerConfig

import models
from helpers import (
    StartServer,
    StartServerProcess,
    encode,
    photo,
    reference_preprocess,
    reference_top_k,
    with_jpeg_size,
)


@pytest.fixture(scope="module")
def resnet50(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_example("resnet50", tmp_path_factory.mktemp("resnet") / "resnet50.onnx")


@pytest.fixture
async def classifier(start_server: StartServer, resnet50: Path) -> str:
    engine = Engine(
        resnet50,
        BatchConfig(max_batch_size=8, max_latency_ms=20),
        RuntimeConfig(spin=False),
        name="resnet50",
        handler=HandlerConfig("image-classification", (("top_k", "3"),), workers=2),
    )
    server = await start_server(engine)
    return f"{server.url}/v2/models/resnet50"


@pytest.mark.slow
async def test_a_posted_jpeg_or_png_gets_labels_equal_to_a_direct_run(
    classifier: str, resnet50: Path, http: aiohttp.ClientSession
) -> None:
    session = ort.InferenceSession(str(resnet50), providers=["CPUExecutionProvider"])
    for data, media in ((encode(photo(640, 480, 1), "JPEG"), "image/jpeg"),
                        (encode(photo(300, 420, 2), "PNG"), "image/png")):  # fmt: skip
        async with http.post(
            f"{classifier}/infer", data=data, headers={"Content-Type": media}
        ) as r:
            assert r.status == 200, await r.text()
            answer = await r.json()
        (logits,) = session.run(["logits"], {"input": reference_preprocess(data)[None]})
        expected = reference_top_k(logits[0], 3)
        (labels,) = answer["predictions"]
        assert [p["index"] for p in labels] == [i for i, _ in expected]
        assert labels[0]["label"] == f"class_{expected[0][0]}"
        assert labels[0]["score"] == pytest.approx(expected[0][1], rel=1e-4)


@pytest.mark.slow
async def test_concurrent_image_posts_share_onnx_runtime_runs(
    classifier: str, http: aiohttp.ClientSession
) -> None:
    images = [encode(photo(320, 240, seed), "JPEG") for seed in range(8)]

    async def post(data: bytes) -> int:
        async with http.post(
            f"{classifier}/infer", data=data, headers={"Content-Type": "image/jpeg"}
        ) as r:
            await r.read()
            return r.status

    assert await asyncio.gather(*(post(d) for d in images)) == [200] * 8
    async with http.get(f"{classifier}/stats") as r:
        stats = (await r.json())["model_stats"][0]
    assert stats["request_count"] == 8
    assert stats["execution_count"] < 8  # preprocessed requests from several clients batched


@pytest.mark.slow
async def test_v2_requests_with_encoded_images_go_through_the_handler(
    classifier: str, http: aiohttp.ClientSession
) -> None:
    images = [encode(photo(200, 200, 3), "JPEG"), encode(photo(260, 200, 4), "PNG")]
    body = {"inputs": [{"name": "images", "shape": [2], "datatype": "BYTES",
                        "data": [base64.b64encode(i).decode() for i in images]}]}  # fmt: skip
    async with http.post(f"{classifier}/infer", json=body) as r:
        assert r.status == 200, await r.text()
        answer = await r.json()
    (output,) = answer["outputs"]
    assert output["name"] == "predictions"
    assert output["datatype"] == "BYTES"
    assert len(json.loads(output["data"][0])["predictions"]) == 2
    # The binary tensor extension (as tritonclient sends BYTES): raw JPEG bytes, not base64.
    header = json.dumps({"inputs": [{
        "name": "images", "shape": [1], "datatype": "BYTES",
        "parameters": {"binary_data_size": 4 + len(images[0])}}]}).encode()  # fmt: skip
    blob = len(images[0]).to_bytes(4, "little") + images[0]
    async with http.post(
        f"{classifier}/infer",
        data=header + blob,
        headers={"Inference-Header-Content-Length": str(len(header))},
    ) as r:
        assert r.status == 200, await r.text()
        (output,) = (await r.json())["outputs"]
        assert len(json.loads(output["data"][0])["predictions"]) == 1
    # A V2 request with the model's own tensor still goes straight to the model.
    x = np.zeros((1, 3, 224, 224), np.float32)
    tensor = {"name": "input", "shape": [1, 3, 224, 224], "datatype": "FP32",
              "data": x.ravel().tolist()}  # fmt: skip
    async with http.post(f"{classifier}/infer", json={"inputs": [tensor]}) as r:
        assert r.status == 200
        assert (await r.json())["outputs"][0]["name"] == "logits"


@pytest.mark.slow
async def test_bad_images_get_clean_json_errors(
    classifier: str, http: aiohttp.ClientSession
) -> None:
    jpeg = encode(photo(64, 64, 5), "JPEG")
    cases = [
        (b"\xff\xd8 not really a jpeg", "image/jpeg", 400),
        (with_jpeg_size(jpeg, 30000, 30000), "image/jpeg", 413),  # a decompression bomb
        (b"GIF89a...", "image/gif", 415),
    ]
    for data, media, status in cases:
        async with http.post(
            f"{classifier}/infer", data=data, headers={"Content-Type": media}
        ) as r:
            assert r.status == status, (media, await r.text())
            assert (await r.json())["error"]
    async with http.get(f"{classifier}/ready") as r:
        assert r.status == 200  # still serving


@pytest.mark.slow
async def test_a_user_handler_in_a_temporary_module_is_loaded_by_the_command(
    tmp_path: Path, serve_process: StartServerProcess
) -> None:
    model = models.scaled(tmp_path / "scaled.onnx", 3.0)

    (tmp_path / "doubling.py").write_text(
        "import numpy as np\n"
        "class Doubler:\n"
        "    media_types = frozenset({'text/csv'})\n"
        "    def preprocess(self, request):\n"
        "        values = [float(v) for v in request.body.decode().split(',')]\n"
        "        return {'x': np.array([values], dtype=np.float32)}\n"
        "    def postprocess(self, outputs, request):\n"
        "        return {'sum': float(outputs['y'].sum() * 2)}\n"
    )
    import os

    path = f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    server = serve_process(
        str(model), "--name", "scaled", "--handler", "doubling:Doubler", env={"PYTHONPATH": path}
    )
    try:
        async with aiohttp.ClientSession() as http, http.post(
            f"{server.url}/v2/models/scaled/infer", data=b"1,2,3,4.5",
            headers={"Content-Type": "text/csv"},
        ) as r:  # fmt: skip
            assert r.status == 200, await r.text()
            assert await r.json() == {"sum": 63.0}  # (1 + 2 + 3 + 4.5) * 3 * 2
        assert server.stop() == 0
    finally:
        server.kill()
