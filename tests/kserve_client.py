"""KServe's own gRPC client (`kserve.InferenceGRPCClient`) against a batchserve server, run as a
child process by tests/test_kserve_client.py: kserve's generated stubs declare the same protobuf
package (`inference`) as tritonclient's, which the test process has loaded, and one process
cannot hold both. Reads a JSON job on stdin, prints one JSON answer per call on stdout."""

from __future__ import annotations

import asyncio
import base64
import sys
from typing import Any

import grpc
import numpy as np
import orjson
from kserve import InferenceGRPCClient, InferInput, InferRequest


def _array(spec: dict[str, Any]) -> np.ndarray:
    if spec["datatype"] == "BYTES":
        items = [base64.b64decode(v) for v in spec["data"]]
        return np.array(items, dtype=np.object_).reshape(spec["shape"])
    return np.array(spec["data"], dtype=spec["dtype"]).reshape(spec["shape"])


def _plain(array: np.ndarray) -> list[Any]:
    if array.dtype.kind in "OSU":
        return [base64.b64encode(v if isinstance(v, bytes) else str(v).encode()).decode()
                for v in array.flat]  # fmt: skip
    return array.astype(np.float64).ravel().tolist()


async def _call(client: InferenceGRPCClient, call: dict[str, Any]) -> dict[str, Any]:
    inputs = []
    for spec in call["inputs"]:
        tensor = InferInput(spec["name"], spec["shape"], spec["datatype"])
        tensor.set_data_from_numpy(_array(spec), binary_data=call["binary"])
        inputs.append(tensor)
    request = InferRequest(call["model"], inputs, request_id=call.get("id"))
    headers = [("authorization", call["authorization"])] if "authorization" in call else None
    try:
        response = await client.infer(request, headers=headers)
    except grpc.aio.AioRpcError as err:
        return {"code": err.code().name, "message": err.details()}
    outputs = {o.name: {"datatype": o.datatype, "shape": list(o.shape),
                        "data": _plain(o.as_numpy())} for o in response.outputs}  # fmt: skip
    return {"code": "OK", "id": response.id, "model": response.model_name, "outputs": outputs}


async def main() -> None:
    job = orjson.loads(sys.stdin.buffer.read())
    client = InferenceGRPCClient(job["url"], timeout=60, retries=0)
    try:
        # ServerLive and ServerReady are public; ModelReady carries the job's credentials.
        key = [("authorization", job["authorization"])] if "authorization" in job else None
        answers: dict[str, Any] = {
            "live": await client.is_server_live(),
            "ready": await client.is_server_ready(),
            "model_ready": await client.is_model_ready(job["model"], headers=key),
        }
        answers["calls"] = [await _call(client, call) for call in job["calls"]]
    finally:
        await client.close()
    sys.stdout.buffer.write(orjson.dumps(answers))


if __name__ == "__main__":
    asyncio.run(main())
