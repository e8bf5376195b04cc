"""An off-the-shelf Open Inference Protocol client (tritonclient[http]) works unchanged."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as httpclient

from batchserve import Engine

from helpers import StartServer


def drive(url: str, x: np.ndarray, binary: bool) -> tuple[bool, dict[str, object], np.ndarray]:
    client = httpclient.InferenceServerClient(url=url, concurrency=1)
    try:
        ready = client.is_server_ready() and client.is_model_ready("mlp")
        metadata = client.get_model_metadata("mlp")
        tensor = httpclient.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x, binary_data=binary)
        wanted = httpclient.InferRequestedOutput("probabilities", binary_data=binary)
        result = client.infer("mlp", [tensor], outputs=[wanted], request_id="t-1")
        assert result.get_response()["id"] == "t-1"
        return ready, metadata, result.as_numpy("probabilities")
    finally:
        client.close()


@pytest.mark.parametrize("binary", [True, False])
async def test_tritonclient_reads_metadata_and_infers(
    start_server: StartServer, mlp_path: Path, binary: bool
) -> None:
    server = await start_server(Engine(mlp_path, name="mlp"))
    x = np.random.default_rng(8).standard_normal((4, 64)).astype(np.float32)
    url = server.url.removeprefix("http://")
    ready, metadata, output = await asyncio.to_thread(drive, url, x, binary)
    assert ready
    assert metadata["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]
    expected = ort.InferenceSession(str(mlp_path)).run(None, {"input": x})[0]
    np.testing.assert_allclose(output, expected, rtol=1e-5, atol=1e-6)
