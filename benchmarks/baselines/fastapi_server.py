"""Naive FastAPI + ONNX Runtime server: the baseline, on purpose.

This is the server most tutorials write, kept that way deliberately so that
``benchmarks/compare.py`` can measure how far a purpose-built server gets
beyond it. It is NOT an example of how to write a model server:

* one ``onnxruntime.InferenceSession`` (CPU provider, default session options);
* one ``session.run`` per HTTP request, no batching, no queueing, no backpressure;
* the body is validated by a pydantic model with one ``float`` object per element;
* ``--mode sync``: the endpoint is a plain ``def``, so FastAPI runs it in its
  threadpool; ``--mode async``: the endpoint is ``async def`` and calls
  ``session.run`` inline, blocking the event loop for the whole inference.

It speaks the same KServe V2 / Open Inference Protocol JSON subset as the real
server, so one load script drives both::

    POST /v2/models/{name}/infer
    {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [...]}]}
    -> {"model_name": "...", "outputs": [{"name": "probabilities", "shape": [1, 10],
        "datatype": "FP32", "data": [...]}]}
    GET /v2/health/ready -> 200

Usage::

    python benchmarks/baselines/fastapi_server.py MODEL.onnx --mode sync \\
        --host 127.0.0.1 --port 8000

The only deviation from the typical tutorial is that uvicorn's access log is
switched off, so that the comparison does not measure logging.
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np
import onnxruntime as ort
import uvicorn
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

NUMPY_TO_V2 = {
    "tensor(float)": ("FP32", np.float32),
    "tensor(double)": ("FP64", np.float64),
    "tensor(int64)": ("INT64", np.int64),
    "tensor(int32)": ("INT32", np.int32),
}


class InputTensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list[float]


class InferenceRequest(BaseModel):
    inputs: list[InputTensor]


class Model:
    """One InferenceSession; input/output names and dtypes read from it."""

    def __init__(self, path: str) -> None:
        self.session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        self.input_types = {i.name: NUMPY_TO_V2[i.type] for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.output_types = {o.name: NUMPY_TO_V2[o.type][0] for o in self.session.get_outputs()}

    def infer(self, model_name: str, request: InferenceRequest) -> dict[str, Any]:
        feeds: dict[str, np.ndarray] = {}
        for tensor in request.inputs:
            if tensor.name not in self.input_types:
                raise HTTPException(status_code=400, detail=f"unknown input {tensor.name!r}")
            dtype = self.input_types[tensor.name][1]
            feeds[tensor.name] = np.asarray(tensor.data, dtype=dtype).reshape(tensor.shape)
        results = self.session.run(self.output_names, feeds)
        return {
            "model_name": model_name,
            "outputs": [
                {
                    "name": name,
                    "shape": list(value.shape),
                    "datatype": self.output_types[name],
                    "data": value.ravel().tolist(),
                }
                for name, value in zip(self.output_names, results, strict=True)
            ],
        }


def create_app(model: Model, mode: str) -> FastAPI:
    app = FastAPI(title="fastapi-baseline")

    @app.get("/v2/health/ready")
    def ready() -> dict[str, bool]:
        return {"ready": True}

    @app.get("/v2/models/{model_name}")
    def metadata(model_name: str) -> dict[str, Any]:
        def spec(node: Any, datatype: str) -> dict[str, Any]:
            shape = [d if isinstance(d, int) else -1 for d in node.shape]
            return {"name": node.name, "datatype": datatype, "shape": shape}

        session = model.session
        return {
            "name": model_name,
            "versions": ["1"],
            "platform": "onnxruntime_onnx",
            "inputs": [spec(i, model.input_types[i.name][0]) for i in session.get_inputs()],
            "outputs": [spec(o, model.output_types[o.name]) for o in session.get_outputs()],
        }

    if mode == "sync":

        @app.post("/v2/models/{model_name}/infer")
        def infer_sync(model_name: str, request: InferenceRequest) -> dict[str, Any]:
            return model.infer(model_name, request)

    else:

        @app.post("/v2/models/{model_name}/infer")
        async def infer_async(model_name: str, request: InferenceRequest) -> dict[str, Any]:
            return model.infer(model_name, request)

    return app


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="path to an ONNX model")
    parser.add_argument("--mode", choices=["sync", "async"], default="sync")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    app = create_app(Model(args.model), args.mode)
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()
