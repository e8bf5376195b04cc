"""What to send: request bodies built from the model's metadata or from a file, encoded once."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np

from batchserve.bench.transport import encode_post
from batchserve.datatypes import V2_TO_NUMPY, v2_name
from batchserve.protocol import HEADER_LENGTH, encode_request
from batchserve.protocol.v2 import to_binary

# HTTP/1.1 with V2 JSON (or binary) bodies; gRPC ModelInfer calls; gRPC ModelStreamInfer streams.
Protocol = Literal["http", "grpc", "grpc-stream"]
PROTOCOLS: tuple[Protocol, ...] = get_args(Protocol)


@dataclass(frozen=True, slots=True)
class Body:
    data: bytes
    headers: dict[str, str]
    raw: bytes  # what is sent: the whole HTTP request, or the serialized ModelInferRequest


@dataclass(frozen=True, slots=True)
class Workload:
    """Pre-encoded request bodies, so encoding never costs during a run; `order` maps the
    n-th request to a body (round-robin when empty). `url` is the server's for gRPC (where
    `headers` are every call's metadata), the infer endpoint's for HTTP."""

    url: str
    bodies: tuple[Body, ...]
    rows_per_request: int
    order: tuple[int, ...] = ()
    protocol: Protocol = "http"
    headers: tuple[tuple[str, str], ...] = ()

    def body(self, index: int) -> Body:
        if self.order:
            return self.bodies[self.order[index % len(self.order)]]
        return self.bodies[index % len(self.bodies)]


def build_workload(
    base_url: str,
    model: str,
    metadata: dict[str, Any],
    *,
    binary: bool = False,
    rows: int = 1,
    variants: int = 16,
    input_file: str | None = None,
    seed: int = 0,
    version: str | None = None,
    unique_fraction: float = 0.0,
    unique_pool: int = 10_000,
    headers: Mapping[str, str] | None = None,
    protocol: Protocol = "http",
    parameters: Mapping[str, Any] | None = None,
) -> Workload:
    """Random inputs shaped by `metadata` (variable dims → `rows` for the first, 1 otherwise),
    or the arrays of `input_file` (.npy for a single input, .npz or JSON name → data).

    With `unique_fraction` > 0, that share of requests carries inputs seen nowhere else in the
    first `unique_pool` of them, and the rest repeat one of the `variants` bodies at random: a
    cache's hit ratio is then about 1 - unique_fraction. `headers` go on every request (gRPC:
    as metadata, `base_url` then being the gRPC server's; gRPC tensors are always raw bytes),
    and so do the V2 request `parameters` (`priority`, `timeout`)."""
    if input_file:
        samples = [load_inputs(input_file, metadata)]
    else:
        rng = np.random.default_rng(seed)
        samples = [random_inputs(metadata, rows, rng) for _ in range(max(1, variants))]
    order: tuple[int, ...] = ()
    if unique_fraction > 0 and not input_file:
        if not 0 < unique_fraction <= 1:
            raise ValueError("unique_fraction must be in (0, 1]")
        rng = np.random.default_rng(seed + 1)
        repeated = len(samples)
        samples += [random_inputs(metadata, rows, rng) for _ in range(unique_pool)]
        length = int(unique_pool / unique_fraction)
        draws, picks = rng.random(length), rng.integers(0, repeated, length)
        fresh = repeated + np.cumsum(draws < unique_fraction) % unique_pool
        order = tuple(np.where(draws < unique_fraction, fresh, picks).tolist())
    first = next(iter(samples[0].values()))
    rows_per_request = int(first.shape[0]) if first.ndim else 1
    extra = dict(headers or {})
    if protocol != "http":
        from batchserve.bench.grpc_client import call_metadata

        bodies = tuple(_encode_grpc(model, version, sample, parameters) for sample in samples)
        pairs = call_metadata(extra)
        return Workload(base_url, bodies, rows_per_request, order, protocol, pairs)
    path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"
    url = base_url.rstrip("/") + path
    bodies = tuple(_encode(url, sample, binary, extra, parameters) for sample in samples)
    return Workload(url, bodies, rows_per_request, order)


def random_inputs(
    metadata: dict[str, Any], rows: int, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    arrays = {}
    for spec in metadata["inputs"]:
        shape = [d if d >= 0 else 1 for d in spec["shape"]]
        if shape and spec["shape"][0] < 0:
            shape[0] = rows
        arrays[spec["name"]] = _random(spec["datatype"], shape, rng)
    return arrays


def _random(datatype: str, shape: list[int], rng: np.random.Generator) -> np.ndarray:
    if datatype == "BYTES":
        return np.full(shape, "x", dtype=object)
    dtype = V2_TO_NUMPY[datatype]
    if dtype.kind in "biu":
        return np.zeros(shape, dtype=dtype)  # indices and ids: 0 is valid for nearly every model
    return rng.standard_normal(shape).astype(dtype)


def load_inputs(path: str, metadata: dict[str, Any]) -> dict[str, np.ndarray]:
    file = Path(path)
    names = [spec["name"] for spec in metadata["inputs"]]
    if file.suffix == ".npy":
        if len(names) != 1:
            raise ValueError(f"a .npy file feeds one input; the model has {names}")
        return {names[0]: np.load(file, allow_pickle=False)}
    if file.suffix == ".npz":
        with np.load(file, allow_pickle=False) as archive:
            return {name: archive[name] for name in names}
    raw = json.loads(file.read_text())
    dtypes = {spec["name"]: V2_TO_NUMPY[spec["datatype"]] for spec in metadata["inputs"]}
    return {name: np.asarray(raw[name], dtype=dtypes[name]) for name in names}


def _encode(
    url: str,
    inputs: dict[str, np.ndarray],
    binary: bool,
    extra: dict[str, str],
    parameters: Mapping[str, Any] | None = None,
) -> Body:
    data, header_length = encode_request(
        inputs, binary=binary, binary_outputs=binary, parameters=parameters
    )
    headers = {**extra, "Content-Type": "application/json"}
    if header_length is not None:
        headers["Content-Type"] = "application/octet-stream"
        headers[HEADER_LENGTH] = str(header_length)
    return Body(data, headers, encode_post(url, data, headers))


def _encode_grpc(
    model: str,
    version: str | None,
    inputs: dict[str, np.ndarray],
    parameters: Mapping[str, Any] | None = None,
) -> Body:
    """A serialized ModelInferRequest with raw tensor contents, asking for every output."""
    from tritonclient.grpc import service_pb2

    request = service_pb2.ModelInferRequest(model_name=model, model_version=version or "")
    for key, value in (parameters or {}).items():
        field = request.parameters[key]
        if isinstance(value, bool):
            field.bool_param = value
        elif isinstance(value, int):
            field.int64_param = value
        elif isinstance(value, float):
            field.double_param = value
        else:
            field.string_param = str(value)
    for name, array in inputs.items():
        request.inputs.add(name=name, datatype=v2_name(array.dtype), shape=array.shape)
        request.raw_input_contents.append(to_binary(array))
    data: bytes = request.SerializeToString()
    return Body(data, {}, data)
