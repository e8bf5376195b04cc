"""One request's bad input fails only that request, not the batch it was merged into.

The gather model fails a whole run when any index in it is out of range; real batching merges
concurrent requests into such runs."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from batchserve import BatchConfig, Engine
from batchserve.errors import InferenceFailed

from helpers import StartServer

MAX_ROWS = 16


def index(i: int) -> int:
    """Every tenth request asks for an index outside the model's 5-entry table."""
    return 7 + i if i % 10 == 3 else i % 5


async def test_bad_requests_fail_alone_and_innocent_ones_get_their_answers(
    gather_path: Path,
) -> None:
    requests = 400
    async with Engine(gather_path, BatchConfig(max_batch_size=MAX_ROWS)) as engine:
        # All submitted in one loop iteration: they queue together and are merged into runs.
        results = await asyncio.gather(
            *(
                engine.infer({"index": np.array([[index(i)]], dtype=np.int64)})
                for i in range(requests)
            ),
            return_exceptions=True,
        )
        stats = engine.statistics()
    bad = 0
    for i, result in enumerate(results):
        if index(i) > 4:
            bad += 1
            assert isinstance(result, InferenceFailed), result
            assert f"idx={index(i)}" in str(result)  # the runtime's reason, for this request
        else:
            assert isinstance(result, dict), result
            assert result["value"].tolist() == [[10.0 * index(i)]]
    assert bad == requests // 10
    assert max(stats.batcher.batch_sizes) == MAX_ROWS  # really merged
    assert stats.batcher.failed == bad
    # Bounded extra work: each bad request costs at most two runs per halving of its batch.
    assert stats.batcher.retry_runs <= 2 * bad * math.ceil(math.log2(MAX_ROWS))
    assert stats.pool.runs == stats.batcher.batches + stats.batcher.retry_runs
    assert stats.pool.replacements == 0  # bad inputs are not the session's fault


async def test_over_http_only_the_bad_requests_get_an_error(
    start_server: StartServer, gather_path: Path, http: aiohttp.ClientSession
) -> None:
    engine = Engine(gather_path, BatchConfig(max_batch_size=MAX_ROWS), name="gather")
    server = await start_server(engine)
    url = f"{server.url}/v2/models/gather/infer"

    async def post(i: int) -> tuple[int, dict[str, Any]]:
        body = {"inputs": [{"name": "index", "shape": [1, 1], "datatype": "INT64",
                            "data": [index(i)]}]}  # fmt: skip
        async with http.post(url, json=body) as response:
            return response.status, await response.json()

    answers = await asyncio.gather(*(post(i) for i in range(200)))
    for i, (status, answer) in enumerate(answers):
        if index(i) > 4:
            assert status == 500
            assert "out of data bounds" in answer["error"]
        else:
            assert status == 200, answer
            assert answer["outputs"][0]["data"] == [10.0 * index(i)]
    stats = engine.statistics()
    assert stats.pool.replacements == 0
    assert stats.batcher.failed == 20
