"""The library API: `Engine` on real ONNX Runtime sessions, without HTTP."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import onnxruntime as ort
import orjson
import pytest

from batchserve import (
    BatchConfig,
    CacheConfig,
    Engine,
    InferenceFailed,
    InvalidInput,
    ModelLoadError,
    NotReady,
    Overloaded,
    RuntimeConfig,
)
from batchserve.call import Call
from batchserve.errors import UnsupportedMediaType
from batchserve.handlers import HandlerConfig

import models
from helpers import wait_until


def reference(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)  # type: ignore[no-any-return]


async def test_concurrent_requests_get_their_own_rows(mlp_path: Path) -> None:
    rng = np.random.default_rng(1)
    inputs = [
        rng.standard_normal((int(rng.integers(1, 9)), 64)).astype(np.float32) for _ in range(400)
    ]
    async with Engine(mlp_path, BatchConfig(max_batch_size=32)) as engine:
        results = await asyncio.gather(*(engine.infer({"input": x}) for x in inputs))
        stats = engine.statistics().batcher
    session = ort.InferenceSession(str(mlp_path), providers=["CPUExecutionProvider"])
    for x, result in zip(inputs, results, strict=True):
        assert result["probabilities"].shape == (x.shape[0], 10)
        np.testing.assert_allclose(
            result["probabilities"], session.run(None, {"input": x})[0], rtol=1e-5, atol=1e-6
        )
    # Batching really happened: far fewer runs than requests, none over the limit.
    assert stats.requests == 400
    assert stats.batches < 400 / 4
    assert max(stats.batch_sizes) <= 32
    assert stats.rows == sum(x.shape[0] for x in inputs)


async def test_multiple_inputs_and_output_selection(two_inputs_path: Path) -> None:
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.array([[1, 2], [3, 4]], dtype=np.int64)
    async with Engine(two_inputs_path) as engine:
        both = await engine.infer({"a": a, "b": b})
        only = await engine.infer({"a": a, "b": b}, outputs=["b_twice"])
        with pytest.raises(InvalidInput, match="unknown output 'nope'"):
            await engine.infer({"a": a, "b": b}, outputs=["nope"])
    np.testing.assert_array_equal(both["sum"], [3.0, 12.0])
    np.testing.assert_array_equal(both["b_twice"], b * 2)
    assert list(only) == ["b_twice"]


async def test_requests_with_different_shapes_are_grouped_not_failed(
    variable_path: Path,
) -> None:
    rng = np.random.default_rng(2)
    inputs = [
        rng.standard_normal((int(rng.integers(1, 4)), int(rng.choice([3, 5, 7])))).astype(
            np.float32
        )
        for _ in range(200)
    ]
    async with Engine(variable_path, BatchConfig(max_batch_size=16)) as engine:
        results = await asyncio.gather(*(engine.infer({"x": x}) for x in inputs))
        stats = engine.statistics().batcher
    for x, result in zip(inputs, results, strict=True):
        np.testing.assert_allclose(result["y"], x * 3, rtol=1e-6)
    assert stats.failed == 0
    assert stats.batches < 200


async def test_request_larger_than_max_batch_runs_alone(mlp_path: Path) -> None:
    x = np.random.default_rng(3).standard_normal((10, 64)).astype(np.float32)
    async with Engine(mlp_path, BatchConfig(max_batch_size=4)) as engine:
        result = await engine.infer({"input": x})
        stats = engine.statistics().batcher
    np.testing.assert_allclose(
        result["probabilities"], reference(mlp_path, {"input": x})[0], rtol=1e-5, atol=1e-6
    )
    assert stats.batch_sizes == {10: 1}


async def test_model_without_batch_dimension_runs_each_request_alone(fixed_path: Path) -> None:
    xs = [np.full((2, 4), i, dtype=np.float32) for i in range(20)]
    async with Engine(fixed_path) as engine:
        assert not engine.metadata.batched
        results = await asyncio.gather(*(engine.infer({"x": x}) for x in xs))
        stats = engine.statistics().batcher
        with pytest.raises(InvalidInput, match=r"expects \[2, 4\]"):
            await engine.infer({"x": np.zeros((1, 4), dtype=np.float32)})
    for x, result in zip(xs, results, strict=True):
        np.testing.assert_array_equal(result["y"], x * 2)
    assert stats.batches == 20


@pytest.mark.parametrize(
    ("feeds", "message"),
    [
        ({"wrong": np.zeros((1, 64), np.float32)}, r"expects inputs \['input'\]"),
        ({"input": np.zeros((1, 64), np.float64)}, "has datatype FP64, the model expects FP32"),
        ({"input": np.zeros((1, 63), np.float32)}, r"shape \[1, 63\]"),
        ({"input": np.zeros((64,), np.float32)}, r"shape \[64\]"),
        (
            {"input": np.zeros((1, 64), np.float32), "extra": np.zeros(1, np.float32)},
            r"unknown \['extra'\]",
        ),
    ],
)
async def test_invalid_inputs_are_rejected_before_queueing(
    mlp_path: Path, feeds: dict[str, np.ndarray], message: str
) -> None:
    async with Engine(mlp_path) as engine:
        with pytest.raises(InvalidInput, match=message):
            await engine.infer(feeds)
        assert engine.statistics().batcher.requests == 0


async def test_a_failing_run_fails_its_batch_and_the_engine_goes_on(gather_path: Path) -> None:
    async with Engine(gather_path) as engine:
        with pytest.raises(InferenceFailed, match="out of data bounds"):
            await engine.infer({"index": np.array([[9]], dtype=np.int64)})
        good = await engine.infer({"index": np.array([[2]], dtype=np.int64)})
        assert engine.statistics().batcher.failed == 1
    np.testing.assert_array_equal(good["value"], [[20.0]])


@pytest.mark.slow
async def test_cancelled_request_is_removed_before_inference(slow_path: Path) -> None:
    busy = np.zeros((4096, 1024), dtype=np.float32)
    waiting = np.ones((3, 1024), dtype=np.float32)
    async with Engine(slow_path, BatchConfig(max_batch_size=8192)) as engine:
        first = asyncio.create_task(engine.infer({"x": busy}))
        await wait_until(  # the first request has the only session (a run of about a second)
            lambda: engine.statistics().batcher.in_flight_batches == 1, "the first batch"
        )
        second = asyncio.create_task(engine.infer({"x": waiting}))
        await wait_until(  # queued behind the running batch
            lambda: engine.statistics().batcher.queued_rows == 3, "the second request queued"
        )
        second.cancel()
        with pytest.raises(asyncio.CancelledError):
            await second
        assert engine.statistics().batcher.queued_rows == 0
        await first
        stats = engine.statistics().batcher
    assert stats.cancelled == 1
    assert stats.batches == 1
    assert stats.rows == 4096  # the cancelled rows never reached a session


@pytest.mark.slow
async def test_full_queue_rejects_with_overloaded(slow_path: Path) -> None:
    config = BatchConfig(max_batch_size=8192, max_queue_rows=4)
    async with Engine(slow_path, config) as engine:
        first = asyncio.create_task(engine.infer({"x": np.zeros((4096, 1024), np.float32)}))
        await wait_until(
            lambda: engine.statistics().batcher.in_flight_batches == 1, "the first batch"
        )
        queued = asyncio.create_task(engine.infer({"x": np.zeros((4, 1024), np.float32)}))
        await wait_until(
            lambda: engine.statistics().batcher.queued_rows == 4, "the second request queued"
        )
        with pytest.raises(Overloaded, match="queue full"):
            await engine.infer({"x": np.zeros((1, 1024), np.float32)})
        await asyncio.gather(first, queued)
        assert engine.statistics().batcher.rejected == 1


async def test_close_drains_queued_requests_then_refuses(mlp_path: Path) -> None:
    x = np.ones((1, 64), dtype=np.float32)
    engine = Engine(mlp_path, runtime=RuntimeConfig(instances=2))
    await engine.start()
    pending = [asyncio.create_task(engine.infer({"input": x})) for _ in range(100)]
    # One loop turn, not a wait: each request runs up to its place in the queue, and the close
    # comes before the runs could empty it.
    await asyncio.sleep(0)
    assert engine.statistics().batcher.requests == 100
    await engine.aclose()
    results = await asyncio.gather(*pending)
    assert len(results) == 100
    assert not engine.ready
    with pytest.raises(NotReady):
        await engine.infer({"input": x})


async def test_several_sessions_serve_in_parallel(mlp_path: Path) -> None:
    x = np.ones((2, 64), dtype=np.float32)
    async with Engine(mlp_path, runtime=RuntimeConfig(instances=3)) as engine:
        results = await asyncio.gather(*(engine.infer({"input": x}) for _ in range(50)))
        assert engine.statistics().pool.instances == 3
    expected = reference(mlp_path, {"input": x})[0]
    for result in results:
        np.testing.assert_allclose(result["probabilities"], expected, rtol=1e-5, atol=1e-6)


async def test_missing_and_invalid_model_files(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="not found"):
        await Engine(tmp_path / "absent.onnx").start()
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"this is not a model")
    with pytest.raises(ModelLoadError, match="not a valid ONNX model"):
        await Engine(junk).start()


async def test_a_call_says_how_it_was_served(mlp_path: Path) -> None:
    x = np.ones((2, 64), dtype=np.float32)
    async with Engine(mlp_path, cache=CacheConfig(size_mb=4)) as engine:
        assert not engine.takes_raw("image/jpeg")  # no handler: every body is a V2 request
        miss = await engine.call(Call({"input": x}))
        hit = await engine.call(Call({"input": x.copy()}))
        uncached = await engine.call(Call({"input": x}, cache=False))
    expected = reference(mlp_path, {"input": x})[0]
    for result in (miss, hit, uncached):
        np.testing.assert_allclose(result.outputs["probabilities"], expected, rtol=1e-5, atol=1e-6)
        assert result.answer is None
    assert (miss.cache, miss.batch_rows) == ("miss", 2)
    assert (hit.cache, hit.batch_rows) == ("hit", 0)
    assert (uncached.cache, uncached.batch_rows) == ("off", 2)


async def test_a_failed_call_still_says_how_far_it_got(gather_path: Path) -> None:
    async with Engine(gather_path, cache=CacheConfig(size_mb=4)) as engine:
        served = engine.call(Call({"index": np.array([[9]], dtype=np.int64)}))
        with pytest.raises(InferenceFailed, match="out of data bounds"):
            await served
    assert (served.cache, served.batch_rows) == ("miss", 1)


CSV_HANDLER = '''
import numpy as np


class Csv:
    """A text/csv body, or a V2 BYTES input `csv`, of four numbers -> `x` [1, 4]."""

    media_types = frozenset({"text/csv"})

    def preprocess(self, request):
        text = request.body if request.inputs is None else request.inputs["csv"][0]
        values = (text.decode() if isinstance(text, bytes) else text).split(",")
        return {"x": np.array([values]).astype(np.float32)}

    def postprocess(self, outputs, request):
        return {"y": outputs["y"].tolist()}
'''


@pytest.fixture
def csv_handler(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> HandlerConfig:
    name = f"csv_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(CSV_HANDLER)
    monkeypatch.syspath_prepend(str(tmp_path))
    return HandlerConfig(f"{name}:Csv", workers=1)


async def test_a_model_with_a_handler_is_served_by_call_alone(
    tmp_path: Path, csv_handler: HandlerConfig
) -> None:
    model = models.scaled(tmp_path / "scaled.onnx", 2.0)
    text = np.array([b"1,2,3,4"], dtype=object)
    async with Engine(model, handler=csv_handler) as engine:
        assert engine.takes_raw("Text/CSV; charset=utf-8")
        assert not engine.takes_raw("application/json")
        with pytest.raises(UnsupportedMediaType, match="image/png"):
            engine.takes_raw("image/png")
        assert engine.raw_bytes  # the model takes no text: encoded payloads stay bytes
        raw = await engine.call(Call(body=b"1,2,3,4", content_type="text/csv"))
        v2 = await engine.call(Call({"csv": text}))
        direct = await engine.call(Call({"x": np.ones((1, 4), np.float32)}))
        with pytest.raises(InvalidInput, match="one output, 'predictions'"):
            engine.call(Call({"csv": text}, ["y"]))  # refused before anything runs
    assert raw.answer is not None
    assert orjson.loads(raw.answer) == {"y": [[2.0, 4.0, 6.0, 8.0]]}
    assert (raw.batch_rows, raw.cache) == (1, "off")
    assert list(v2.outputs) == ["predictions"]
    assert orjson.loads(v2.outputs["predictions"][0]) == {"y": [[2.0, 4.0, 6.0, 8.0]]}
    np.testing.assert_array_equal(direct.outputs["y"], [[2.0, 2.0, 2.0, 2.0]])
