"""BYTES inputs from the library API: every numpy form of text reaches the model as text."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from batchserve import CacheConfig, Engine
from batchserve.errors import InvalidInput

TEXT = [["a", "é"]]


def feeds(engine: Engine, text: np.ndarray) -> dict[str, np.ndarray]:
    """The echo model's inputs: zeros for every numeric input, `text` for x_BYTES."""
    inputs = {
        spec.name: np.zeros((1, 2), spec.dtype)
        for spec in engine.metadata.inputs
        if spec.datatype != "BYTES"
    }
    return {**inputs, "x_BYTES": text}


FORMS = {
    "object str": np.array(TEXT, dtype=object),
    "object bytes": np.array([[v.encode() for v in row] for row in TEXT], dtype=object),
    "object mixed": np.array([["a", "é".encode()]], dtype=object),
    "object numpy str": np.array([[np.str_(v) for v in row] for row in TEXT], dtype=object),
    "U": np.array(TEXT),
    "S": np.array([[v.encode() for v in row] for row in TEXT]),
}


@pytest.mark.parametrize("form", list(FORMS))
async def test_bytes_inputs_in_every_numpy_form_reach_the_model_as_text(
    echo_path: Path, form: str
) -> None:
    async with Engine(echo_path) as engine:
        outputs = await engine.infer(feeds(engine, FORMS[form]))
    answer = outputs["y_BYTES"]
    assert answer.tolist() == TEXT
    assert all(type(v) is str for v in answer.flat)


async def test_bytes_and_text_requests_share_one_right_answer_in_the_cache(
    echo_path: Path,
) -> None:
    # Once, the bytes form reached the model as "b'a'" and was cached under the key of "a".
    async with Engine(echo_path, cache=CacheConfig(size_mb=8)) as engine:
        from_bytes = await engine.infer(feeds(engine, FORMS["object bytes"]))
        from_text = await engine.infer(feeds(engine, FORMS["object str"]))
        from_fixed = await engine.infer(feeds(engine, FORMS["S"]))
        stats = engine.statistics()
    for outputs in (from_bytes, from_text, from_fixed):
        assert outputs["y_BYTES"].tolist() == TEXT
    assert stats.batcher.requests == 1  # equal requests, whatever their form: one computation
    assert stats.cache is not None
    assert stats.cache.local.hits == 2


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (np.array([[b"a", b"\xff"]]), "element 1 is not UTF-8"),
        (np.array([[b"a", b"\xc3"]], dtype=object), "element 1 is not UTF-8"),
        (np.array([["a", 3]], dtype=object), "element 1 is int, expected str or UTF-8 bytes"),
        (np.array([[None, "a"]], dtype=object), "element 0 is NoneType"),
    ],
)
async def test_bytes_inputs_that_are_not_text_are_refused(
    echo_path: Path, text: np.ndarray, reason: str
) -> None:
    async with Engine(echo_path, cache=CacheConfig(size_mb=8)) as engine:
        with pytest.raises(InvalidInput, match=reason) as refused:
            await engine.infer(feeds(engine, text))
        assert engine.statistics().batcher.requests == 0
    assert refused.value.status == 400
