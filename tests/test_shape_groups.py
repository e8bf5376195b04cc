"""A client sending ever-new input shapes cannot make the queue track unboundedly many groups."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np

from batchserve import BatchConfig, Engine
from batchserve.errors import Overloaded


async def test_distinct_shapes_past_the_cap_get_overloaded(variable_path: Path) -> None:
    config = BatchConfig(max_batch_size=8, max_shape_groups=4)
    async with Engine(variable_path, config) as engine:
        # Submitted in one loop iteration: all queue before the first dispatch, each with its
        # own width, so each opens a shape group of its own.
        results = await asyncio.gather(
            *(engine.infer({"x": np.ones((1, n), dtype=np.float32)}) for n in range(1, 11)),
            return_exceptions=True,
        )
        # A shape already waiting joins its group; a new one is refused while four wait.
        widths = (5, 6, 7, 8, 5, 5, 9)
        joined = await asyncio.gather(
            *(engine.infer({"x": np.full((1, n), 2.0, dtype=np.float32)}) for n in widths),
            return_exceptions=True,
        )
        stats = engine.statistics().batcher
    for n, result in enumerate(results, start=1):
        if n <= 4:
            assert isinstance(result, dict)
            np.testing.assert_array_equal(result["y"], np.full((1, n), 3.0))
        else:
            assert isinstance(result, Overloaded)
            assert "distinct input shapes" in str(result)
    for n, result in zip(widths[:-1], joined[:-1], strict=True):
        assert isinstance(result, dict)
        np.testing.assert_array_equal(result["y"], np.full((1, n), 6.0))
    assert isinstance(joined[-1], Overloaded)
    assert stats.rejected == 7
    assert stats.shape_groups == 0
