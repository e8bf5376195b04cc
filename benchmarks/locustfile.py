"""A Locust user for Open Inference Protocol (KServe V2) servers, for teams that already use Locust.

    pip install locust          # not a batchserve dependency
    locust -f benchmarks/locustfile.py --host http://127.0.0.1:8000 --headless -u 64 -r 64 -t 30s

Environment:
    BATCHSERVE_MODEL=mlp        the model to load (default mlp)
    BATCHSERVE_BINARY=1         send the inputs with the binary tensor extension (default JSON)

The model's metadata is read once (GET /v2/models/{model}); one request of random inputs of the
right shapes and datatypes (variable dimensions -> 1) is encoded once and posted by every user
to /v2/models/{model}/infer; any answer but 200 counts as a failure.

Locust is a closed-loop tool (each user waits for its answer before sending again), and its
Python users cost more per request than a small server does: for open-loop latency at a fixed
rate, and for rates above a few thousand requests per second, use `batchserve bench`.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from typing import Any

import numpy as np
from locust import FastHttpUser, task

from batchserve.datatypes import V2_TO_NUMPY
from batchserve.protocol import HEADER_LENGTH, encode_request

MODEL = os.environ.get("BATCHSERVE_MODEL", "mlp")
BINARY = os.environ.get("BATCHSERVE_BINARY", "") not in ("", "0", "false", "no")
INFER_PATH = f"/v2/models/{MODEL}/infer"

_requests: dict[str, tuple[bytes, dict[str, str]]] = {}  # host -> (body, headers), built once


def random_inputs(metadata: dict[str, Any], seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {}
    for spec in metadata["inputs"]:
        shape = [d if d >= 0 else 1 for d in spec["shape"]]
        if spec["datatype"] == "BYTES":
            arrays[spec["name"]] = np.full(shape, "x", dtype=object)
            continue
        dtype = V2_TO_NUMPY[spec["datatype"]]
        if dtype.kind in "biu":  # indices and ids: 0 is valid for nearly every model
            arrays[spec["name"]] = np.zeros(shape, dtype=dtype)
        else:
            arrays[spec["name"]] = rng.standard_normal(shape).astype(dtype)
    return arrays


def build_request(host: str) -> tuple[bytes, dict[str, str]]:
    url = f"{host.rstrip('/')}/v2/models/{MODEL}"
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            metadata = json.loads(response.read())
    except urllib.error.HTTPError as err:
        raise RuntimeError(f"GET {url} answered {err.code} (set BATCHSERVE_MODEL?)") from None
    body, header_length = encode_request(
        random_inputs(metadata), binary=BINARY, binary_outputs=BINARY
    )
    if header_length is None:
        return body, {"Content-Type": "application/json"}
    return body, {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(header_length)}


class InferUser(FastHttpUser):
    """Posts the same pre-encoded inference request back to back."""

    def on_start(self) -> None:
        host = self.host or ""
        if host not in _requests:
            _requests[host] = build_request(host)
        self.body, self.headers = _requests[host]

    @task
    def infer(self) -> None:
        with self.client.post(
            INFER_PATH, data=self.body, headers=self.headers, catch_response=True, name="infer"
        ) as response:
            if response.status_code != 200:
                response.failure(f"{response.status_code}: {(response.text or '')[:200]}")
            else:
                response.success()
