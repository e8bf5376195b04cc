"""Property-based fuzzing of the V2 parsers: any input either decodes or is refused with a
400 (InvalidInput) or 413 (PayloadTooLarge: over the size limits) error."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batchserve.errors import InvalidInput, PayloadTooLarge
from batchserve.protocol import DecodeLimits, decode_request, encode_request

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=8), children, max_size=6)
    ),
    max_leaves=30,
)
datatypes = st.sampled_from(
    ["BOOL", "UINT8", "INT32", "INT64", "FP16", "FP32", "FP64", "BYTES", "FLOAT", "", 7]
)


def decodes_or_rejects(body: bytes, header_length: int | None = None) -> None:
    """Anything else (TypeError, IndexError, struct.error, ...) fails the test."""
    rejected: InvalidInput | PayloadTooLarge | None = None
    try:
        request = decode_request(body, header_length)
    except (InvalidInput, PayloadTooLarge) as err:
        rejected = err
    if rejected is not None:
        assert rejected.status in (400, 413)
        assert rejected.message
        return
    for array in request.inputs.values():
        assert isinstance(array, np.ndarray)


@pytest.mark.slow
@FUZZ
@given(st.binary(max_size=256))
def test_arbitrary_bytes(body: bytes) -> None:
    decodes_or_rejects(body)


@pytest.mark.slow
@FUZZ
@given(json_values)
def test_arbitrary_json_documents(document: object) -> None:
    decodes_or_rejects(json.dumps(document).encode())


@FUZZ
@given(
    name=st.text(max_size=5),
    shape=st.lists(st.integers(min_value=-2, max_value=5) | st.booleans(), max_size=4),
    datatype=datatypes,
    data=json_values,
)
@pytest.mark.slow
def test_arbitrary_tensors(name: str, shape: list[object], datatype: object, data: object) -> None:
    body = {"inputs": [{"name": name, "shape": shape, "datatype": datatype, "data": data}]}
    decodes_or_rejects(json.dumps(body).encode())


@FUZZ
@given(
    shape=st.lists(st.integers(min_value=0, max_value=4), max_size=3),
    datatype=datatypes,
    declared=st.integers(min_value=-3, max_value=80),
    blob=st.binary(max_size=80),
    header_length=st.integers(min_value=-5, max_value=400) | st.none(),
)
@pytest.mark.slow
def test_arbitrary_binary_requests(
    shape: list[int], datatype: object, declared: int, blob: bytes, header_length: int | None
) -> None:
    tensor = {"name": "x", "shape": shape, "datatype": datatype,
              "parameters": {"binary_data_size": declared}}  # fmt: skip
    header = json.dumps({"inputs": [tensor]}).encode()
    length = len(header) if header_length is None else header_length
    decodes_or_rejects(header + blob, length)


@pytest.mark.slow
@FUZZ
@given(st.lists(st.text(max_size=6), min_size=1, max_size=5), st.binary(max_size=40))
def test_bytes_tensors_with_corrupt_lengths(values: list[str], noise: bytes) -> None:
    blob = b"".join(struct.pack("<I", len(v.encode())) + v.encode() for v in values) + noise
    tensor = {"name": "s", "shape": [len(values)], "datatype": "BYTES",
              "parameters": {"binary_data_size": len(blob)}}  # fmt: skip
    header = json.dumps({"inputs": [tensor]}).encode()
    decodes_or_rejects(header + blob, len(header))


@FUZZ
@given(
    st.lists(st.floats(allow_nan=False, allow_infinity=False, width=32), min_size=1, max_size=20),
    st.booleans(),
)
@pytest.mark.slow
def test_valid_requests_round_trip(values: list[float], binary: bool) -> None:
    array = np.asarray(values, dtype=np.float32).reshape(1, -1)
    body, header_length = encode_request({"x": array}, binary=binary)
    decoded = decode_request(body, header_length)
    np.testing.assert_array_equal(decoded.inputs["x"], array)


def test_a_huge_declared_bytes_shape_is_refused_before_allocating() -> None:
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "s",
                    "shape": [10**12],
                    "datatype": "BYTES",
                    "parameters": {"binary_data_size": 8},
                }
            ]
        }
    ).encode()
    with pytest.raises(PayloadTooLarge, match="limit"):
        decode_request(header + b"\0" * 8, len(header))
    # Even with the element limit lifted, the BYTES decoder refuses before allocating.
    with pytest.raises(InvalidInput, match="need at least"):
        decode_request(header + b"\0" * 8, len(header), DecodeLimits(max_elements=10**13))


# Dimensions around every boundary: zero, the element limit, numpy's int64 byte count, uint64.
dimensions = (
    st.sampled_from([0, 0, 1, 2, 1 << 24, (1 << 24) + 1, 1 << 31, 1 << 61, 1 << 62])
    | st.sampled_from([(1 << 63) - 1, 1 << 63, (1 << 64) - 1, 1 << 64])
    | st.integers(min_value=0, max_value=1 << 64)
)
sized_shapes = st.lists(dimensions, max_size=4)
limits = st.sampled_from([DecodeLimits(), DecodeLimits(max_elements=1000)])


def within_limits(body: bytes, header_length: int | None, limits: DecodeLimits) -> None:
    """Decodes to tensors whose every dimension, and the product of the non-zero ones, is within
    the element limit; or is refused with 400 or 413 (anything else fails the test)."""
    rejected: InvalidInput | PayloadTooLarge | None = None
    try:
        request = decode_request(body, header_length, limits)
    except (InvalidInput, PayloadTooLarge) as err:
        rejected = err
    if rejected is not None:
        assert rejected.status in (400, 413)
        assert rejected.message
        return
    for array in request.inputs.values():
        extent = 1
        for dim in array.shape:
            extent *= dim or 1
        assert extent <= limits.max_elements


@pytest.mark.slow
@FUZZ
@given(shape=sized_shapes, datatype=datatypes, limits=limits)
def test_zero_and_huge_dimensions_in_json(
    shape: list[int], datatype: object, limits: DecodeLimits
) -> None:
    body = {"inputs": [{"name": "x", "shape": shape, "datatype": datatype, "data": []}]}
    within_limits(json.dumps(body).encode(), None, limits)


@pytest.mark.slow
@FUZZ
@given(shape=sized_shapes, datatype=datatypes, limits=limits, blob=st.binary(max_size=16))
def test_zero_and_huge_dimensions_in_binary(
    shape: list[int], datatype: object, limits: DecodeLimits, blob: bytes
) -> None:
    tensor = {"name": "x", "shape": shape, "datatype": datatype,
              "parameters": {"binary_data_size": len(blob)}}  # fmt: skip
    header = json.dumps({"inputs": [tensor]}).encode()
    within_limits(header + blob, len(header), limits)


def test_an_empty_tensor_with_a_dimension_over_the_limit_is_413() -> None:
    body = {"inputs": [{"name": "x", "shape": [20_000_000, 0], "datatype": "FP32", "data": []}]}
    with pytest.raises(PayloadTooLarge, match="no elements"):
        decode_request(json.dumps(body).encode())
