"""KServe's Python gRPC client (`kserve.InferenceGRPCClient`) against a real server process: health,
every datatype as typed contents and as raw contents, answers equal to ONNX Runtime's, the
request id echoed, NOT_FOUND for an unknown model and UNAUTHENTICATED without the API key.

The client runs in a child process (tests/kserve_client.py): kserve's protobuf stubs and
tritonclient's, which this process has loaded, declare the same package and cannot share one."""

from __future__ import annotations

import base64
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import orjson
import pytest

from batchserve.examples import write_example

from helpers import StartServerProcess
from models import ECHO_TYPES, echo

# Found, not imported: importing it here would clash with tritonclient's stubs.
if importlib.util.find_spec("kserve") is None:
    if os.environ.get("BATCHSERVE_REQUIRE_DEPLOY"):
        pytest.fail("kserve is required here (BATCHSERVE_REQUIRE_DEPLOY is set)", pytrace=False)
    pytest.skip("kserve is not installed (pip install '.[deploy]')", allow_module_level=True)

pytestmark = pytest.mark.slow  # server processes
CLIENT = Path(__file__).with_name("kserve_client.py")
KEY = "kserve-client-key"
NUMPY = {"BOOL": "bool", "UINT8": "uint8", "UINT16": "uint16", "UINT32": "uint32",
         "UINT64": "uint64", "INT8": "int8", "INT16": "int16", "INT32": "int32",
         "INT64": "int64", "FP16": "float16", "FP32": "float32", "FP64": "float64"}  # fmt: skip


def run_client(job: dict[str, Any]) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, str(CLIENT)], input=orjson.dumps(job), capture_output=True, timeout=120
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    answer: dict[str, Any] = orjson.loads(done.stdout)
    return answer


# The protocol's typed `contents` have no field for FP16: it travels as raw contents only.
TYPED = [t for t in ECHO_TYPES if t != "FP16"]


def tensor(name: str, datatype: str, rows: int, seed: int) -> tuple[dict[str, Any], list[Any]]:
    """The JSON spec of an input [rows, 2] of `datatype` and its values as the client prints
    them back (floats; BYTES as base64)."""
    rng = np.random.default_rng(seed)
    if datatype == "BYTES":
        # UTF-8 text: kserve's client sends typed BYTES only as text.
        letters = np.frombuffer(b"abcdefghij0123456789 -_", np.uint8)
        items = [bytes(rng.choice(letters, int(rng.integers(0, 9)))) for _ in range(rows * 2)]
        data = [base64.b64encode(v).decode() for v in items]
        return {"name": name, "datatype": datatype, "shape": [rows, 2], "data": data}, data
    dtype = np.dtype(NUMPY[datatype])
    if dtype.kind == "b":
        values = rng.integers(0, 2, rows * 2).astype(bool)
    elif dtype.kind in "iu":
        info = np.iinfo(dtype)
        values = rng.integers(info.min, info.max, rows * 2, dtype=dtype, endpoint=True)
    else:
        values = rng.standard_normal(rows * 2).astype(dtype)
    spec = {"name": name, "datatype": datatype, "shape": [rows, 2], "dtype": dtype.name,
            "data": values.tolist()}  # fmt: skip
    return spec, values.astype(np.float64).tolist()


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("kserve-repository")
    for name in ("echo", "echo_typed", "mlp"):
        (root / name / "1").mkdir(parents=True)
    echo(root / "echo" / "1" / "model.onnx")
    echo(root / "echo_typed" / "1" / "model.onnx", TYPED)
    write_example("mlp", root / "mlp" / "1" / "model.onnx")
    return root


@pytest.mark.parametrize(
    ("model", "binary", "types"), [("echo", True, list(ECHO_TYPES)), ("echo_typed", False, TYPED)]
)
def test_kserve_grpc_client_gets_every_datatype_back(
    serve_process: StartServerProcess,
    repository: Path,
    model: str,
    binary: bool,
    types: list[str],
) -> None:
    server = serve_process("--model-repository", str(repository), grpc=True)
    calls, expected = [], []
    for rows in (1, 3):
        made = [tensor(f"x_{t}", t, rows, seed) for seed, t in enumerate(types, start=rows)]
        calls.append({"model": model, "binary": binary, "inputs": [spec for spec, _ in made],
                      "id": f"{model}-{rows}"})  # fmt: skip
        expected.append(
            {t: ([rows, 2], values) for t, (_, values) in zip(types, made, strict=True)}
        )
    answers = run_client({"url": f"127.0.0.1:{server.grpc_port}", "model": model, "calls": calls})
    assert answers["live"]
    assert answers["ready"]
    assert answers["model_ready"]
    for call, answer, want in zip(calls, answers["calls"], expected, strict=True):
        assert answer["code"] == "OK", (call["id"], answer)
        assert answer["id"] == call["id"]
        assert answer["model"] == model
        for datatype, (shape, values) in want.items():
            out = answer["outputs"][f"y_{datatype}"]
            assert (out["datatype"], out["shape"]) == (datatype, shape), (call["id"], datatype)
            assert out["data"] == values, (call["id"], datatype)


def test_kserve_grpc_client_answers_equal_onnx_runtime_and_errors_keep_their_codes(
    serve_process: StartServerProcess, repository: Path
) -> None:
    server = serve_process(
        "--model-repository", str(repository), grpc=True, env={"BATCHSERVE_API_KEY": KEY}
    )
    rng = np.random.default_rng(7)
    xs = [rng.standard_normal((rows, 64)).astype(np.float32) for rows in (1, 3, 8)]

    def mlp_call(x: np.ndarray, binary: bool, **extra: Any) -> dict[str, Any]:
        spec = {"name": "input", "datatype": "FP32", "shape": list(x.shape), "dtype": "float32",
                "data": x.ravel().tolist()}  # fmt: skip
        return {"model": "mlp", "binary": binary, "inputs": [spec], **extra}

    bearer = {"authorization": f"Bearer {KEY}"}
    calls = [mlp_call(x, binary, **bearer) for x in xs for binary in (False, True)]
    calls.append(mlp_call(xs[0], True))  # no API key
    calls.append(mlp_call(xs[0], True, authorization="Bearer wrong"))
    calls.append({**mlp_call(xs[0], True, **bearer), "model": "nope"})
    job = {"url": f"127.0.0.1:{server.grpc_port}", "model": "mlp", "calls": calls, **bearer}
    answers = run_client(job)
    assert answers["live"]
    assert answers["ready"]
    assert answers["model_ready"]

    session = ort.InferenceSession(str(repository / "mlp" / "1" / "model.onnx"))
    name = session.get_outputs()[0].name
    for x, answer in zip([x for x in xs for _ in (0, 1)], answers["calls"][:-3], strict=True):
        assert answer["code"] == "OK", answer
        got = np.array(answer["outputs"][name]["data"], dtype=np.float32)
        want = np.asarray(session.run(None, {"input": x})[0], dtype=np.float32)
        assert answer["outputs"][name]["shape"] == list(want.shape)
        np.testing.assert_allclose(got.reshape(want.shape), want, rtol=1e-5, atol=1e-6)
    no_key, wrong_key, unknown = answers["calls"][-3:]
    assert no_key["code"] == wrong_key["code"] == "UNAUTHENTICATED", (no_key, wrong_key)
    assert unknown["code"] == "NOT_FOUND", unknown
    assert "nope" in unknown["message"], unknown
