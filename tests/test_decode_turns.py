"""Big bodies decode one per event-loop iteration (front/turns.py): the mechanism, step by
step on the loop, and big JSON bodies arriving together at a real server."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import aiohttp
import numpy as np
import onnxruntime as ort
import orjson
import pytest
from onnx import TensorProto, helper, numpy_helper, save

from batchserve import Engine
from batchserve.front.turns import BIG_BODY_BYTES, DecodeTurns

from helpers import StartServer, wait_until
from models import OPSET


async def test_holders_take_one_loop_iteration_each_in_arrival_order() -> None:
    turns = DecodeTurns()
    loop = asyncio.get_running_loop()
    events: list[str] = []

    async def decode(name: str) -> None:
        async with turns:
            events.append(f"{name} decodes")
            # What the loop has to do meanwhile (a timer that fell due, I/O): it must run
            # before the next holder's decode, not after all of them.
            loop.call_soon(events.append, f"loop after {name}")

    await asyncio.gather(*(decode(name) for name in ("a", "b", "c")))
    assert events == [
        "a decodes", "loop after a", "b decodes", "loop after b", "c decodes", "loop after c",
    ]  # fmt: skip
    assert turns.waiting == 0


async def test_a_cancelled_waiter_gives_up_its_place_and_the_turn_goes_on() -> None:
    turns = DecodeTurns()
    order: list[str] = []
    release = asyncio.Event()

    async def decode(name: str) -> None:
        async with turns:
            order.append(name)
            if name == "a":
                await release.wait()  # holds the turn until told

    first = asyncio.create_task(decode("a"))
    await wait_until(lambda: order == ["a"], "a holding the turn")
    waiting = [asyncio.create_task(decode(name)) for name in ("b", "c")]
    await wait_until(lambda: turns.waiting == 2, "b and c waiting for it")
    waiting[0].cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting[0]
    assert turns.waiting == 1
    release.set()
    await asyncio.gather(first, waiting[1])
    assert waiting[0].cancelled()
    assert order == ["a", "c"]


async def test_a_waiter_cancelled_as_the_turn_reaches_it_passes_the_turn_on() -> None:
    turns = DecodeTurns()
    order: list[str] = []

    async def decode(name: str) -> None:
        async with turns:
            order.append(name)

    async with turns:  # the turn is taken; b and c queue behind it
        b = asyncio.create_task(decode("b"))
        c = asyncio.create_task(decode("c"))
        await wait_until(lambda: turns.waiting == 2, "b and c waiting for the turn")
    # Leaving hands the turn to b at the next iteration; cancel b in that same iteration,
    # before it resumes: the turn it was given must go on to c.
    asyncio.get_running_loop().call_soon(b.cancel)
    await asyncio.gather(b, c, return_exceptions=True)
    assert b.cancelled()
    assert order == ["c"]
    assert turns.waiting == 0


async def test_big_json_bodies_arriving_together_are_all_answered_right(
    start_server: StartServer, tmp_path: Path
) -> None:
    axes = numpy_helper.from_array(np.array([1], dtype=np.int64), "axes")
    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["x", "axes"], ["y"], keepdims=0)],
        "sum",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 65536])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch"])],
        [axes],
    )
    model = helper.make_model(graph, opset_imports=OPSET)
    model.ir_version = 8
    save(model, tmp_path / "sum.onnx")
    server = await start_server(Engine(tmp_path / "sum.onnx", name="sum"))
    rng = np.random.default_rng(3)
    xs = [rng.standard_normal((1, 65536)).astype(np.float32) for _ in range(6)]
    bodies = [orjson.dumps({"inputs": [{"name": "x", "shape": [1, 65536], "datatype": "FP32",
                                        "data": x.ravel().tolist()}]}) for x in xs]  # fmt: skip
    assert all(len(body) >= BIG_BODY_BYTES for body in bodies)
    session = ort.InferenceSession(str(tmp_path / "sum.onnx"))
    headers = {"Content-Type": "application/json"}

    async def infer(http: aiohttp.ClientSession, body: bytes) -> float:
        # A file-like body: aiohttp warns about sending large bodies as bare bytes.
        url = f"{server.url}/v2/models/sum/infer"
        async with http.post(url, data=io.BytesIO(body), headers=headers) as response:
            assert response.status == 200, await response.text()
            return float((await response.json())["outputs"][0]["data"][0])

    async with aiohttp.ClientSession() as http:
        answers = await asyncio.gather(*(infer(http, body) for body in bodies))
    for x, answer in zip(xs, answers, strict=True):
        want = float(session.run(None, {"x": x})[0][0])
        assert answer == np.float32(want)
