"""Micro-benchmarks of the server's hot paths, each checked for a correct result.

    .venv/bin/python -m pytest benchmarks/micro --benchmark-only -p no:cacheprovider

Groups: json (V2 JSON tensors), binary (the binary tensor extension), batching (assembling and
splitting a batch), queue (submit -> await round trips through a Batcher on a no-op runner),
cache (the response-cache key digest). Sizes: "small" is a 1x64 FP32 tensor, "image" is a
1x3x224x224 FP32 tensor (150,528 floats).

Without --benchmark-only (or --benchmark-enable) the conftest disables timing, so a plain
`pytest benchmarks/micro` runs every benchmark body once, checks, and finishes in seconds.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import numpy as np
import orjson
import pytest
import uvloop

from batchserve.cache import cache_key
from batchserve.clock import MonotonicClock
from batchserve.protocol import InferRequest, decode_request, encode_request, encode_response
from batchserve.queue import Batcher, BatchPolicy, Pending

SHAPES = {"small": (1, 64), "image": (1, 3, 224, 224)}
# Few, bounded rounds for the slow (image-sized) cases keep the whole run well under a minute.
ROUNDS = {"small": 200, "image": 30}
SIZES = list(SHAPES)

MODEL, VERSION = "bench", "1"


def tensor(size: str, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal(SHAPES[size], dtype=np.float32)


def run(benchmark: Any, size: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Auto-calibrated for the small case; a fixed, bounded number of rounds for the image."""
    if size == "small":
        return benchmark(fn, *args, **kwargs)
    return benchmark.pedantic(
        fn, args=args, kwargs=kwargs, rounds=ROUNDS[size], iterations=1, warmup_rounds=1
    )


def split_binary(body: bytes, header_length: int | None) -> tuple[dict[str, Any], bytes]:
    assert header_length is not None
    return orjson.loads(body[:header_length]), body[header_length:]


# -- json ------------------------------------------------------------------------------------


@pytest.mark.benchmark(group="json")
@pytest.mark.parametrize("size", SIZES)
def test_json_decode_request(benchmark: Any, size: str) -> None:
    array = tensor(size)
    body, header_length = encode_request({"input": array})
    assert header_length is None
    request = run(benchmark, size, decode_request, body, None)
    decoded = request.inputs["input"]
    assert decoded.dtype == np.float32
    assert np.array_equal(decoded, array)


@pytest.mark.benchmark(group="json")
@pytest.mark.parametrize("size", SIZES)
def test_json_encode_response(benchmark: Any, size: str) -> None:
    array = tensor(size)
    request = InferRequest({"input": array}, id="r1")
    body, header_length = run(
        benchmark, size, encode_response, MODEL, VERSION, request, {"output": array}
    )
    assert header_length is None
    output = orjson.loads(body)["outputs"][0]
    assert output["shape"] == list(array.shape)
    assert np.array_equal(np.asarray(output["data"], dtype=np.float32), array.reshape(-1))


@pytest.mark.benchmark(group="json")
@pytest.mark.parametrize("size", SIZES)
def test_json_encode_request(benchmark: Any, size: str) -> None:
    array = tensor(size)
    body, header_length = run(benchmark, size, encode_request, {"input": array})
    assert header_length is None
    assert np.array_equal(decode_request(body).inputs["input"], array)


# -- binary ----------------------------------------------------------------------------------


@pytest.mark.benchmark(group="binary")
@pytest.mark.parametrize("size", SIZES)
def test_binary_decode_request(benchmark: Any, size: str) -> None:
    array = tensor(size)
    body, header_length = encode_request({"input": array}, binary=True)
    assert header_length is not None
    request = run(benchmark, size, decode_request, body, header_length)
    decoded = request.inputs["input"]
    assert decoded.shape == array.shape
    assert np.array_equal(decoded, array)


@pytest.mark.benchmark(group="binary")
@pytest.mark.parametrize("size", SIZES)
def test_binary_encode_response(benchmark: Any, size: str) -> None:
    array = tensor(size)
    request = InferRequest({"input": array}, binary_outputs=frozenset())  # all outputs binary
    body, header_length = run(
        benchmark, size, encode_response, MODEL, VERSION, request, {"output": array}
    )
    header, blob = split_binary(body, header_length)
    output = header["outputs"][0]
    assert output["parameters"]["binary_data_size"] == array.nbytes == len(blob)
    assert blob == array.tobytes()


@pytest.mark.benchmark(group="binary")
@pytest.mark.parametrize("size", SIZES)
def test_binary_encode_request(benchmark: Any, size: str) -> None:
    array = tensor(size)
    body, header_length = run(benchmark, size, encode_request, {"input": array}, binary=True)
    header, blob = split_binary(body, header_length)
    assert header["inputs"][0]["shape"] == list(array.shape)
    assert blob == array.tobytes()


# -- batching --------------------------------------------------------------------------------

BATCH = 32


class NeverRuns:
    """A runner for a Batcher that is only used for its split (nothing is ever dispatched)."""

    idle = 1
    size = 1

    def try_run(self, arrays: list[np.ndarray], done: Callable[..., None]) -> bool:
        raise AssertionError("not dispatched in this benchmark")


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """A loop to create futures on (never run); closed so no ResourceWarning escapes."""
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def pending_rows(
    loop: asyncio.AbstractEventLoop, size: str, count: int = BATCH
) -> tuple[list[Pending], list[np.ndarray]]:
    rows = [tensor(size, seed=i) for i in range(count)]
    signature = (rows[0].shape[1:],)
    now = time.monotonic()
    return [Pending([r], 1, signature, loop.create_future(), now) for r in rows], rows


@pytest.mark.benchmark(group="batching")
@pytest.mark.parametrize("size", SIZES)
def test_batch_assemble_32_rows(benchmark: Any, loop: asyncio.AbstractEventLoop, size: str) -> None:
    batch, rows = pending_rows(loop, size)
    arrays = run(benchmark, size, Batcher._assemble, batch)
    assert len(arrays) == 1
    assert arrays[0].shape == (BATCH, *SHAPES[size][1:])
    assert np.array_equal(arrays[0], np.concatenate(rows))


@pytest.mark.benchmark(group="batching")
@pytest.mark.parametrize("size", SIZES)
def test_batch_split_32_rows(benchmark: Any, loop: asyncio.AbstractEventLoop, size: str) -> None:
    batcher = Batcher(NeverRuns(), BatchPolicy(BATCH, 0.0), MonotonicClock(), max_queue_rows=BATCH)
    _, rows = pending_rows(loop, size)
    outputs = [np.concatenate(rows)]
    signature = (rows[0].shape[1:],)
    batches: list[list[Pending]] = []

    def fresh() -> tuple[tuple[list[Pending], int, list[np.ndarray]], dict[str, Any]]:
        # New futures each round: a resolved future would make _split skip set_result.
        now = time.monotonic()
        batch = [Pending([r], 1, signature, loop.create_future(), now) for r in rows]
        batches.append(batch)
        return (batch, BATCH, outputs), {}

    benchmark.pedantic(
        batcher._split, setup=fresh, rounds=ROUNDS["small"] * 2, iterations=1, warmup_rounds=1
    )
    for batch in batches:
        for item, row in zip(batch, rows, strict=True):
            (result,) = item.future.result()
            assert result.shape == row.shape
            assert np.array_equal(result, row)


# -- queue -----------------------------------------------------------------------------------

REQUESTS = 2000
QUEUE_ROUNDS = 15


class EchoRunner:
    """A no-op session pool: `size` sessions, each run answers its inputs on the next loop turn.

    A session stays busy until its answer is delivered, as with a real pool, so the batcher
    sees a loaded pool and the queue fills behind it.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.running = 0
        self.runs = 0

    @property
    def idle(self) -> int:
        return self.size - self.running

    def try_run(self, arrays: list[np.ndarray], done: Callable[..., None]) -> bool:
        if self.running >= self.size:
            return False
        self.running += 1
        self.runs += 1
        asyncio.get_running_loop().call_soon(self._finish, arrays, done)
        return True

    def _finish(self, arrays: list[np.ndarray], done: Callable[..., None]) -> None:
        self.running -= 1
        done(arrays)


def request_rows() -> list[list[np.ndarray]]:
    return [[np.full((1, 64), i, dtype=np.float32)] for i in range(REQUESTS)]


async def through_batcher(
    requests: list[list[np.ndarray]], batched: bool
) -> tuple[list[list[np.ndarray]], float, int, int]:
    """REQUESTS concurrent handlers, each submit -> await its rows (as Engine.infer does)."""
    runner = EchoRunner(size=2)
    policy = BatchPolicy(max_rows=BATCH, max_latency_s=0.0)
    async with Batcher(
        runner, policy, MonotonicClock(), max_queue_rows=REQUESTS, batched=batched
    ) as batcher:

        async def handle(arrays: list[np.ndarray]) -> list[np.ndarray]:
            item = batcher.submit(arrays, 1, ((64,),))
            return await item.future

        start = time.perf_counter()
        results = await asyncio.gather(*[handle(r) for r in requests])
        elapsed = time.perf_counter() - start
    return results, elapsed, runner.runs, batcher.statistics().batches


async def bare_futures(
    requests: list[list[np.ndarray]], batched: bool
) -> tuple[list[list[np.ndarray]], float, int, int]:
    """The baseline: the same handlers awaiting a future resolved on the next loop turn."""
    loop = asyncio.get_running_loop()

    async def handle(arrays: list[np.ndarray]) -> list[np.ndarray]:
        future: asyncio.Future[list[np.ndarray]] = loop.create_future()
        loop.call_soon(future.set_result, arrays)
        return await future

    start = time.perf_counter()
    results = await asyncio.gather(*[handle(r) for r in requests])
    return results, time.perf_counter() - start, REQUESTS, 0


RUNNERS: dict[str, Callable[[Coroutine[Any, Any, Any]], Any]] = {
    "asyncio": asyncio.run,
    "uvloop": uvloop.run,
}


@pytest.mark.benchmark(group="queue")
@pytest.mark.parametrize("loop_kind", list(RUNNERS))
@pytest.mark.parametrize(
    ("path", "batched"),
    [("batcher", True), ("batcher", False), ("bare_future", False)],
    ids=["batcher-32rows", "batcher-unbatched", "baseline-bare-future"],
)
def test_queue_2000_round_trips(benchmark: Any, loop_kind: str, path: str, batched: bool) -> None:
    requests = request_rows()
    body = through_batcher if path == "batcher" else bare_futures
    in_loop: list[float] = []

    def one_round() -> tuple[list[list[np.ndarray]], float, int, int]:
        outcome = RUNNERS[loop_kind](body(requests, batched))
        in_loop.append(outcome[1])
        return outcome

    results, _, runs, batches = benchmark.pedantic(
        one_round, rounds=QUEUE_ROUNDS, iterations=1, warmup_rounds=1
    )
    assert len(results) == REQUESTS
    for i, (out,) in enumerate(results):
        assert out.shape == (1, 64)
        assert (out == i).all()
    if path == "batcher":
        expected = -(-REQUESTS // BATCH) if batched else REQUESTS
        assert runs == batches == expected
    benchmark.extra_info["requests_per_round"] = REQUESTS
    benchmark.extra_info["runs_per_round"] = runs
    # Inside the loop only: no loop start-up or shutdown (in_loop[0] is the warm-up round).
    measured = in_loop[1:] or in_loop
    benchmark.extra_info["us_per_request_in_loop"] = round(
        sum(measured) / len(measured) / REQUESTS * 1e6, 3
    )
    benchmark.extra_info["us_per_request_in_loop_min"] = round(min(measured) / REQUESTS * 1e6, 3)
    if benchmark.stats is not None:  # None when timing is disabled
        mean = benchmark.stats.stats.mean
        benchmark.extra_info["us_per_request"] = round(mean / REQUESTS * 1e6, 3)


# -- cache -----------------------------------------------------------------------------------


@pytest.mark.benchmark(group="cache")
@pytest.mark.parametrize("size", SIZES)
def test_cache_key_digest(benchmark: Any, size: str) -> None:
    array = tensor(size)
    inputs = {"input": array}
    key = run(benchmark, size, cache_key, MODEL, VERSION, inputs, ["output"])
    assert isinstance(key, bytes)
    assert len(key) == 32
    assert key == cache_key(MODEL, VERSION, {"input": array.copy()}, ["output"])
    changed = array.copy()
    changed.flat[-1] += 1.0
    assert key != cache_key(MODEL, VERSION, {"input": changed}, ["output"])
    assert key != cache_key(MODEL, "2", inputs, ["output"])
