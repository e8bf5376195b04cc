"""What to send: request bodies built from the model's metadata or from a file, encoded once."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from batchserve.bench.transport import encode_post
from batchserve.datatypes import V2_TO_NUMPY
from batchserve.protocol import HEADER_LENGTH, encode_request


@dataclass(frozen=True, slots=True)
class Body:
    data: bytes
    headers: dict[str, str]
    raw: bytes  # the whole HTTP request, ready to write


@dataclass(frozen=True, slots=True)
class Workload:
    """Pre-encoded request bodies, so encoding never costs during a run; `order` maps the
    n-th request to a body (round-robin when empty)."""

    url: str
    bodies: tuple[Body, ...]
    rows_per_request: int
    order: tuple[int, ...] = ()

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
) -> Workload:
    """Random inputs shaped by `metadata` (variable dims → `rows` for the first, 1 otherwise),
    or the arrays of `input_file` (.npy for a single input, .npz or JSON name → data).

    With `unique_fraction` > 0, that share of requests carries inputs seen nowhere else in the
    first `unique_pool` of them, and the rest repeat one of the `variants` bodies at random: a
    cache's hit ratio is then about 1 - unique_fraction. `headers` go on every request."""
    path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"
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
    url = base_url.rstrip("/") + path
    extra = dict(headers or {})
    bodies = tuple(_encode(url, sample, binary, extra) for sample in samples)
    first = next(iter(samples[0].values()))
    return Workload(url, bodies, int(first.shape[0]) if first.ndim else 1, order)


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


def _encode(url: str, inputs: dict[str, np.ndarray], binary: bool, extra: dict[str, str]) -> Body:
    data, header_length = encode_request(inputs, binary=binary, binary_outputs=binary)
    headers = {**extra, "Content-Type": "application/json"}
    if header_length is not None:
        headers["Content-Type"] = "application/octet-stream"
        headers[HEADER_LENGTH] = str(header_length)
    return Body(data, headers, encode_post(url, data, headers))
