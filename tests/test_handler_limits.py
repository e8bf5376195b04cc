"""Handler limits: what a request can make the handler path hold or build. Calls that gave up
while queued let go of their data at once; preprocess tensors obey the element limit; a
handler's answer is bounded (and encoded) where it is made; per-request options are bounded."""

from __future__ import annotations

import asyncio
import gc
import os
import textwrap
import threading
import weakref
from pathlib import Path

import aiohttp
import numpy as np
import orjson
import pytest

from batchserve import BatchConfig, Engine, RuntimeConfig
from batchserve.errors import DeadlineExceeded, InferenceFailed, InvalidInput, PayloadTooLarge
from batchserve.handlers import HandlerConfig, HandlerPipeline, RawRequest, encode_body
from batchserve.handlers.executor import HandlerExecutor
from batchserve.handlers.image import ImageClassificationHandler
from batchserve.runtime.metadata import ModelMetadata, TensorSpec

from helpers import RESNET_METADATA, StartServer, encode, photo, raw, wait_until

MLP = ModelMetadata(
    (TensorSpec("input", "FP32", (-1, 64)),), (TensorSpec("probabilities", "FP32", (-1, 10)),), True
)

SHAPER = '''
import numpy as np


class Shaper:
    """text/plain; `?rows=` rows of 64 features; `?answer=` numbers in the answer, or `set`
    for an answer that is not JSON."""

    media_types = frozenset({"text/plain"})

    def preprocess(self, request):
        rows = int(request.parameters.get("rows", "1"))
        return {"input": np.ones((rows, 64), np.float32)}

    def postprocess(self, outputs, request):
        answer = request.parameters.get("answer", "")
        if answer == "set":
            return {"labels": {1, 2}}
        if answer:
            return {"numbers": list(range(int(answer)))}
        return {"rows": int(outputs["probabilities"].shape[0])}
'''


@pytest.fixture
def shaper(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    name = f"shaper_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(SHAPER))
    monkeypatch.syspath_prepend(str(tmp_path))  # reaches spawned workers too
    return f"{name}:Shaper"


def text(**parameters: str) -> RawRequest:
    return RawRequest.from_body(b"x", "text/plain", {}, parameters)


async def ones_infer(
    inputs: dict[str, np.ndarray], *, timeout_s: float | None
) -> dict[str, np.ndarray]:
    rows = inputs["input"].shape[0]
    return {"probabilities": np.full((rows, 10), 0.1, np.float32)}


def _wait(event: threading.Event, payload: object) -> str:
    event.wait(30)
    return "done"


def _read_then(fifo: str, payload: object) -> str:
    # A process worker cannot share a threading.Event: it blocks reading a FIFO instead.
    with open(fifo, "rb") as gate:
        gate.read(1)
    return "done"


# ------------------------------------------------------------------------- executor queue


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["thread", "process"])
async def test_calls_that_timed_out_in_the_queue_release_their_data(
    kind: str, tmp_path: Path
) -> None:
    """A caller whose deadline passed while its call waited gets 504 and its slot back; the
    call's arguments (a request body, in the server) must go with it, or callers with short
    deadlines pile data up behind a busy worker without bound."""
    gate, fifo = threading.Event(), tmp_path / "go"
    os.mkfifo(fifo)
    release = os.open(fifo, os.O_RDWR)  # held open: the worker's open needs no other writer
    busy_fn, busy_arg = (_wait, gate) if kind == "thread" else (_read_then, str(fifo))
    executor = HandlerExecutor(kind, workers=1, max_pending=3)  # type: ignore[arg-type]
    async with executor:
        busy = asyncio.create_task(executor.run(busy_fn, busy_arg, None))
        await wait_until(lambda: executor.statistics().pending == 1, "the busy call submitted")
        refs = []
        for _ in range(20):
            payload = np.zeros(1000)
            refs.append(weakref.ref(payload))
            with pytest.raises(DeadlineExceeded):
                await executor.run(busy_fn, busy_arg, payload, timeout_s=0.01)
            del payload
        await asyncio.sleep(0)  # one loop turn: callbacks of the last withdrawal run
        gc.collect()
        held = sum(ref() is not None for ref in refs)
        stats = executor.statistics()
        gate.set()
        os.write(release, b"1")
        assert await busy == "done"
    os.close(release)
    assert held == 0  # no queued call outlived its caller
    assert stats.timed_out == 20
    assert stats.pending == 1  # only the busy call


# ------------------------------------------------------------------------- what a handler makes


def answer(body: object) -> object:
    return orjson.loads(encode_body(body))


@pytest.mark.parametrize("kind", ["thread", "process"])
async def test_preprocess_tensors_obey_the_element_limit(shaper: str, kind: str) -> None:
    """A body of one byte, a tensor of any size: the handler's tensors get the limit a client's
    own tensors get, checked on the worker that made them."""
    config = HandlerConfig(shaper, executor=kind, workers=1, max_elements=1000)  # type: ignore[arg-type]
    async with HandlerPipeline(config, MLP) as pipeline:
        assert answer(await pipeline.run(text(rows="15"), ones_infer)) == {"rows": 15}
        with pytest.raises(PayloadTooLarge, match=r"shape \[16, 64\].*1024 elements"):
            await pipeline.run(text(rows="16"), ones_infer)


@pytest.mark.parametrize("kind", ["thread", "process"])
async def test_a_handler_answer_is_encoded_and_bounded_on_the_worker(
    shaper: str, kind: str
) -> None:
    config = HandlerConfig(shaper, executor=kind, workers=1, max_answer_bytes=1000)  # type: ignore[arg-type]
    async with HandlerPipeline(config, MLP) as pipeline:
        body = await pipeline.run(text(answer="10"), ones_infer)
        assert isinstance(body, orjson.Fragment)  # JSON already: nothing left for the loop
        assert answer(body) == {"numbers": list(range(10))}
        with pytest.raises(PayloadTooLarge, match="over the limit of 1000"):
            await pipeline.run(text(answer="100000"), ones_infer)
        with pytest.raises(InferenceFailed, match="not JSON"):
            await pipeline.run(text(answer="set"), ones_infer)
        assert pipeline.statistics().pending == 0


async def test_the_server_answers_413_for_a_tensor_a_handler_made_too_large(
    start_server: StartServer, mlp_path: Path, shaper: str, http: aiohttp.ClientSession
) -> None:
    handler = HandlerConfig(shaper, workers=1, max_elements=64 * 100)
    engine = Engine(mlp_path, BatchConfig(), RuntimeConfig(spin=False), name="m", handler=handler)
    server = await start_server(engine)
    url = f"{server.url}/v2/models/m/infer"
    headers = {"Content-Type": "text/plain"}
    async with http.post(url, params={"rows": "100"}, data=b"x", headers=headers) as r:
        assert r.status == 200, await r.text()
        assert await r.json() == {"rows": 100}
    async with http.post(url, params={"rows": "101"}, data=b"x", headers=headers) as r:
        assert r.status == 413
        assert "elements" in (await r.json())["error"]
    async with http.post(url, params={"answer": "set"}, data=b"x", headers=headers) as r:
        assert r.status == 500
        assert "not JSON" in (await r.json())["error"]


# ------------------------------------------------------------------------- per-request options


@pytest.mark.parametrize("value", ["9" * 5000, "1" * 19, "x" * 5000])
def test_an_oversized_top_k_is_a_400_with_a_bounded_message(value: str) -> None:
    """A query string carries thousands of digits; int() refuses more than 4300 with a
    ValueError (a 500 through the pipeline) and the error must not echo them all back."""
    handler = ImageClassificationHandler()
    handler.setup(RESNET_METADATA, {})
    image = encode(photo(64, 64), "PNG")
    with pytest.raises(InvalidInput, match="top_k") as caught:
        handler.preprocess(raw(image, "image/png", top_k=value))
    assert len(caught.value.message) < 100
    assert handler.preprocess(raw(image, "image/png", top_k="1" * 18))  # all classes
