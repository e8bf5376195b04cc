"""Handlers without HTTP: the image-classification handler against an independent reference,
end to end through the real resnet50 and the batching engine, the loader's errors, and the
bounded executor's back-pressure, deadlines, cancellation and process pool."""

from __future__ import annotations

import asyncio
import base64
import functools
import textwrap
import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort
import orjson
import pytest

from batchserve import BatchConfig, Engine, RuntimeConfig
from batchserve.errors import (
    DeadlineExceeded,
    InferenceFailed,
    InvalidInput,
    ModelLoadError,
    NotReady,
    Overloaded,
    PayloadTooLarge,
    UnsupportedMediaType,
)
from batchserve.examples import write_example
from batchserve.handlers import (
    PREDICTIONS,
    HandlerConfig,
    HandlerExecutor,
    HandlerPipeline,
    RawRequest,
    check_handler,
    choose_route,
    encode_body,
    imaging,
    load_handler,
    prepare_handler,
    v2_outputs,
    wants_handler,
)
from batchserve.handlers.image import ImageClassificationHandler
from batchserve.handlers.pipeline import _preprocess
from batchserve.protocol import decode_request, encode_response
from batchserve.protocol.v2 import InferRequest
from batchserve.runtime.metadata import ModelMetadata, TensorSpec
from batchserve.testing import FakeClock

from helpers import (
    MEAN,
    RESNET_METADATA,
    STD,
    encode,
    photo,
    png_header,
    raw,
    reference_preprocess,
    reference_top_k,
    wait_until,
    with_jpeg_size,
)

# ------------------------------------------------------------------------- fixtures, helpers


@pytest.fixture(scope="module")
def resnet50_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_example("resnet50", tmp_path_factory.mktemp("handlers") / "resnet50.onnx")


@pytest.fixture(scope="module")
def resnet50_session(resnet50_path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(resnet50_path), providers=["CPUExecutionProvider"])


@pytest.fixture
def handler() -> ImageClassificationHandler:
    return _image_handler()


def _image_handler(**options: str) -> ImageClassificationHandler:
    handler = ImageClassificationHandler()
    handler.setup(RESNET_METADATA, options)
    return handler


def v2(*images: bytes | str) -> RawRequest:
    array = np.empty(len(images), dtype=object)
    array[:] = list(images)
    return RawRequest.from_v2({"images": array})


# ------------------------------------------------------------------------- preprocessing


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("size", [(640, 480), (300, 500), (256, 300), (120, 90)])
def test_preprocess_matches_reference(
    handler: ImageClassificationHandler, fmt: str, size: tuple[int, int]
) -> None:
    data = encode(photo(*size), fmt)
    content_type = "image/jpeg" if fmt == "JPEG" else "image/png"
    batch = handler.preprocess(raw(data, content_type))["input"]
    assert batch.shape == (1, 3, 224, 224)
    assert batch.dtype == np.float32
    np.testing.assert_allclose(batch[0], reference_preprocess(data), rtol=0, atol=2e-5)


def test_solid_colour_normalises_to_known_values(handler: ImageClassificationHandler) -> None:
    pixels = np.empty((300, 400, 3), np.uint8)
    pixels[:] = (10, 128, 250)
    batch = handler.preprocess(raw(encode(pixels, "PNG"), "image/png"))["input"]
    expected = (np.array([10, 128, 250]) / 255 - MEAN) / STD
    for channel in range(3):
        np.testing.assert_allclose(batch[0, channel], expected[channel], atol=1e-5)


def test_crop_is_centred(handler: ImageClassificationHandler) -> None:
    # A 512x256 image is resized to 512x256 (short side already 256), cropped to 224x224
    # from column 144: a white stripe there is the crop's first column.
    pixels = np.zeros((256, 512, 3), np.uint8)
    pixels[:, 144] = 255
    batch = handler.preprocess(raw(encode(pixels, "PNG"), "image/png"))["input"][0]
    white = (1 - MEAN) / STD
    np.testing.assert_allclose(batch[:, 100, 0], white, atol=1e-5)
    assert (batch[:, 100, 1:] < 0).all()


def test_png_with_alpha_and_greyscale(handler: ImageClassificationHandler) -> None:
    rgba = np.dstack([photo(320, 240), np.full((240, 320), 128, np.uint8)])
    grey = photo(320, 240)[..., 0]
    for data in (encode(rgba, "PNG"), encode(grey, "PNG"), encode(grey, "JPEG")):
        content_type = "image/png" if data.startswith(b"\x89PNG") else "image/jpeg"
        batch = handler.preprocess(raw(data, content_type))["input"]
        np.testing.assert_allclose(batch[0], reference_preprocess(data), atol=2e-5)


@pytest.mark.skipif(not imaging.HAVE_SIMPLEJPEG, reason="simplejpeg not installed")
def test_jpeg_decoders_agree() -> None:
    data = encode(photo(640, 480), "JPEG", quality=90)
    by_pillow = _image_handler(decoder="pillow").preprocess(raw(data))["input"]
    by_simplejpeg = _image_handler(decoder="simplejpeg").preprocess(raw(data))["input"]
    np.testing.assert_allclose(by_pillow, by_simplejpeg, atol=2e-5)


@pytest.mark.parametrize("decoder", ["pillow", "simplejpeg"])
def test_draft_decoding_is_close_and_sized(decoder: str) -> None:
    if decoder == "simplejpeg" and not imaging.HAVE_SIMPLEJPEG:
        pytest.skip("simplejpeg not installed")
    data = encode(photo(2048, 1536), "JPEG", quality=90)
    exact = _image_handler(decoder=decoder).preprocess(raw(data))["input"]
    drafted = _image_handler(decoder=decoder, draft="true").preprocess(raw(data))["input"]
    assert drafted.shape == exact.shape
    assert not np.array_equal(drafted, exact)  # it really decoded at a smaller scale
    assert np.abs(drafted - exact).mean() < 0.1


def test_several_images_per_v2_request(handler: ImageClassificationHandler) -> None:
    images = [encode(photo(640, 480, 1), "JPEG"), encode(photo(200, 300, 2), "PNG")]
    # Binary tensors give bytes, JSON gives base64 text: both are accepted.
    request = v2(images[0], base64.b64encode(images[1]).decode())
    batch = handler.preprocess(request)["input"]
    assert batch.shape == (2, 3, 224, 224)
    for row, data in zip(batch, images, strict=True):
        np.testing.assert_allclose(row, reference_preprocess(data), atol=2e-5)


# ------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("data", "content_type"),
    [
        (b"\xff\xd8\xff\xe0" + b"\x00\x10JFIF" + b"garbage" * 50, "image/jpeg"),
        (encode(photo(320, 240), "JPEG")[:3000], "image/jpeg"),  # truncated
        (encode(photo(320, 240), "PNG")[:2000], "image/png"),  # truncated
        (b"GIF89a" + b"\x00" * 100, "image/jpeg"),  # not what it claims
        (png_header(64, 64), "image/png"),  # a header, no pixel data
        (b"", "image/png"),
    ],
    ids=["jpeg-garbage", "jpeg-truncated", "png-truncated", "gif", "png-no-data", "empty"],
)
def test_corrupt_images_are_400(
    handler: ImageClassificationHandler, data: bytes, content_type: str
) -> None:
    with pytest.raises(InvalidInput) as caught:
        handler.preprocess(raw(data, content_type))
    assert caught.value.status == 400


def test_declared_bomb_is_413_before_decoding(handler: ImageClassificationHandler) -> None:
    # Neither body holds pixel data: a decoder would fail with 400, the header check says 413.
    with pytest.raises(PayloadTooLarge, match="30000x30000"):
        handler.preprocess(raw(png_header(30000, 30000), "image/png"))
    bomb = with_jpeg_size(encode(photo(64, 64), "JPEG"), 9000, 9000)
    with pytest.raises(PayloadTooLarge, match="9000x9000"):
        handler.preprocess(raw(bomb))
    assert imaging.declared_size(bomb, "jpeg") == (9000, 9000)


def test_max_pixels_option(tmp_path: Path) -> None:
    small = _image_handler(max_pixels="20000")
    small.preprocess(raw(encode(photo(160, 120), "JPEG")))  # 19,200 pixels: fine
    with pytest.raises(PayloadTooLarge):
        small.preprocess(raw(encode(photo(200, 120), "JPEG")))


def test_too_many_images_is_413() -> None:
    handler = _image_handler(max_images="2")
    image = encode(photo(64, 64), "PNG")
    with pytest.raises(PayloadTooLarge):
        handler.preprocess(v2(image, image, image))


def test_v2_request_errors(handler: ImageClassificationHandler) -> None:
    with pytest.raises(InvalidInput, match="base64"):
        handler.preprocess(v2("not base64 !"))
    with pytest.raises(InvalidInput, match="BYTES"):
        handler.preprocess(RawRequest.from_v2({"x": np.zeros(3, np.float32)}))
    with pytest.raises(InvalidInput, match="one BYTES input"):
        handler.preprocess(RawRequest.from_v2({"a": np.array(["x"]), "b": np.array(["y"])}))


def test_unsupported_media_type(handler: ImageClassificationHandler) -> None:
    with pytest.raises(UnsupportedMediaType) as caught:
        handler.preprocess(raw(encode(photo(64, 64), "GIF"), "image/gif"))
    assert caught.value.status == 415


def test_route_choice() -> None:
    accepted = ImageClassificationHandler.media_types
    assert choose_route("image/jpeg", accepted) == "raw"
    assert choose_route("Image/PNG; charset=binary", accepted) == "raw"
    for v2_type in ("application/json", "application/octet-stream", None, "text/plain"):
        assert choose_route(v2_type, accepted) == "v2"
        assert choose_route(v2_type, frozenset()) == "v2"
    with pytest.raises(UnsupportedMediaType, match="image/webp"):
        choose_route("image/webp", accepted)
    with pytest.raises(UnsupportedMediaType, match="no handler"):
        choose_route("image/jpeg", frozenset())


def test_which_v2_requests_go_to_the_handler() -> None:
    assert wants_handler({"image": np.array([b"..."], dtype=object)}, RESNET_METADATA)
    assert not wants_handler({"input": np.zeros((1, 3, 224, 224), np.float32)}, RESNET_METADATA)
    text_model = ModelMetadata(
        (TensorSpec("text", "BYTES", (-1,)),), (TensorSpec("y", "FP32", (-1,)),), True
    )
    assert not wants_handler({"text": np.array(["hi"], dtype=object)}, text_model)


# ------------------------------------------------------------------------- postprocessing


def test_postprocess_top_k_labels_and_softmax(tmp_path: Path) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f"label {i}\n" for i in range(1000)))
    handler = _image_handler(labels=str(labels), top_k="3")
    logits = np.random.default_rng(3).normal(size=(2, 1000)).astype(np.float32)
    body = handler.postprocess({"logits": logits}, RawRequest())
    for row, answer in zip(logits, body["predictions"], strict=True):
        expected = reference_top_k(row, 3)
        assert [p["index"] for p in answer] == [i for i, _ in expected]
        assert [p["label"] for p in answer] == [f"label {i}" for i, _ in expected]
        np.testing.assert_allclose([p["score"] for p in answer], [s for _, s in expected], 1e-5)
    per_request = handler.postprocess({"logits": logits}, raw(b"", top_k="7"))
    assert len(per_request["predictions"][0]) == 7
    with pytest.raises(InvalidInput):
        handler.postprocess({"logits": logits}, raw(b"", top_k="-1"))


def test_postprocess_without_softmax_keeps_scores() -> None:
    handler = _image_handler(apply_softmax="false", top_k="2")
    scores = np.zeros((1, 1000), np.float32)
    scores[0, [7, 9]] = [0.25, 0.5]
    body = handler.postprocess({"logits": scores}, RawRequest())
    assert body == {
        "predictions": [
            [
                {"label": "class_9", "index": 9, "score": 0.5},
                {"label": "class_7", "index": 7, "score": 0.25},
            ]
        ]
    }


def test_v2_outputs_fit_the_v2_encoder() -> None:
    body = {"predictions": [[{"label": "cat", "index": 1, "score": 0.5}]]}
    outputs = v2_outputs(body)
    payload, header_length = encode_response("resnet50", "1", InferRequest({}), outputs)
    assert header_length is None
    (output,) = orjson.loads(payload)["outputs"]
    assert output["name"] == PREDICTIONS
    assert (output["datatype"], output["shape"]) == ("BYTES", [1])
    assert orjson.loads(output["data"][0]) == body


# ------------------------------------------------------------------------- end to end


@pytest.mark.slow
async def test_end_to_end_equals_direct_ort(
    resnet50_path: Path, resnet50_session: ort.InferenceSession
) -> None:
    images = [encode(photo(640, 480, 5), "JPEG"), encode(photo(333, 500, 6), "PNG")]
    engine = Engine(resnet50_path, runtime=RuntimeConfig(spin=False))
    config = HandlerConfig("image-classification", workers=2)
    async with engine, HandlerPipeline(config, engine.metadata) as pipeline:
        assert pipeline.checked
        infer = functools.partial(engine.infer, cache=False)
        single = orjson.loads(encode_body(await pipeline.run(raw(images[0]), infer, timeout_s=30)))
        both = orjson.loads(encode_body(await pipeline.run(v2(*images), infer, timeout_s=30)))
    for data, answer in zip(images, both["predictions"], strict=True):
        (logits,) = resnet50_session.run(["logits"], {"input": reference_preprocess(data)[None]})
        expected = reference_top_k(logits[0])
        assert [p["index"] for p in answer] == [i for i, _ in expected]
        # Logits of this random-weight model are in the thousands: only the top score is
        # far from zero, and tiny ones differ relatively with the batch ORT ran at.
        np.testing.assert_allclose(
            [p["score"] for p in answer], [s for _, s in expected], rtol=1e-4, atol=1e-9
        )
    first, batched = single["predictions"][0], both["predictions"][0]
    assert [p["index"] for p in first] == [p["index"] for p in batched]
    assert first[0]["score"] == pytest.approx(batched[0]["score"], rel=1e-4)


@pytest.mark.slow
async def test_concurrent_clients_share_runs(resnet50_path: Path) -> None:
    images = [encode(photo(320, 240, seed), "JPEG") for seed in range(8)]
    engine = Engine(
        resnet50_path,
        BatchConfig(max_batch_size=8, max_latency_ms=50),
        RuntimeConfig(instances=1, spin=False, warmup=False),
    )
    async with engine, HandlerPipeline(HandlerConfig("image-classification"), engine.metadata) as p:
        infer = functools.partial(engine.infer, cache=False)
        answers = await asyncio.gather(*(p.run(raw(data), infer) for data in images))
        stats = engine.statistics().batcher
    assert len(answers) == 8
    assert stats.requests == 8
    assert stats.rows == 8
    assert stats.batches < 8  # preprocessed requests from several clients shared ORT runs
    assert max(stats.batch_sizes) > 1


async def test_pipeline_deadline_covers_all_steps() -> None:
    """The fake clock makes inference take 31 s of a 30 s budget: inference is given what is
    left after preprocessing, and the request fails with DeadlineExceeded before postprocess."""
    clock = FakeClock()
    config = HandlerConfig("image-classification")
    given: list[float | None] = []
    async with HandlerPipeline(config, RESNET_METADATA, clock=clock) as p:

        async def slow_infer(
            inputs: dict[str, np.ndarray], *, timeout_s: float | None
        ) -> dict[str, np.ndarray]:
            given.append(timeout_s)
            clock.advance(31.0)
            return {"logits": np.zeros((1, 1000), np.float32)}

        with pytest.raises(DeadlineExceeded, match="during its handler"):
            await p.run(raw(encode(photo(64, 64), "PNG"), "image/png"), slow_infer, timeout_s=30)
    assert given == [30.0]  # the fake clock stood still while preprocessing ran


# ------------------------------------------------------------------------- user handlers


USER_HANDLER = '''
import numpy as np
from batchserve.errors import InvalidInput
from batchserve.handlers import RawRequest


class Doubler:
    """Text body "1,2,3" -> input x [1, 3]; answers sum of y."""

    media_types = frozenset({"text/csv"})

    def setup(self, metadata, options):
        self.scale = float(options.get("scale", "1"))

    def sample_request(self, metadata):
        return RawRequest.from_body(b"1,2,3", "text/csv")

    def preprocess(self, request):
        try:
            values = [float(v) for v in request.body.decode().split(",")]
        except ValueError:
            raise InvalidInput("expected comma-separated numbers") from None
        return {"x": np.array([values], dtype=np.float32) * self.scale}

    def postprocess(self, outputs, request):
        return {"sum": float(outputs["y"].sum()), "rows": int(outputs["y"].shape[0])}


class WrongShape(Doubler):
    def preprocess(self, request):
        return {"x": np.zeros((1, 4), np.float32)}


class Crashes(Doubler):
    def preprocess(self, request):
        raise KeyError("boom")


class NotAHandler:
    pass


def factory():
    return Doubler()
'''

VECTOR = ModelMetadata(
    (TensorSpec("x", "FP32", (-1, 3)),), (TensorSpec("y", "FP32", (-1, 3)),), True
)


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    name = f"user_handlers_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(USER_HANDLER))
    # sys.path reaches spawned worker processes too (multiprocessing sends it along).
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def test_user_handler_by_spec(user_module: str) -> None:
    handler = prepare_handler(f"{user_module}:Doubler", VECTOR, {"scale": "2"})
    assert check_handler(handler, VECTOR)
    inputs = handler.preprocess(RawRequest.from_body(b"1,2,3", "text/csv"))
    np.testing.assert_array_equal(inputs["x"], [[2, 4, 6]])
    assert prepare_handler(f"{user_module}:factory", VECTOR).preprocess(
        RawRequest.from_body(b"1,1,1", "text/csv")
    )["x"].shape == (1, 3)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_colon_here", "expected 'package.module:Class'"),
        ("surely_no_such_module_xyz:Handler", "cannot import module"),
        ("{mod}:Missing", "has no attribute 'Missing'"),
        ("{mod}:NotAHandler", "is not a handler"),
        ("batchserve.handlers.image:IMAGENET_MEAN", "not a class or factory"),
    ],
)
def test_loader_errors(user_module: str, spec: str, message: str) -> None:
    with pytest.raises(ModelLoadError, match=message):
        load_handler(spec.format(mod=user_module))


def test_handler_that_does_not_fit_the_model(user_module: str) -> None:
    handler = prepare_handler(f"{user_module}:WrongShape", VECTOR)
    with pytest.raises(ModelLoadError, match="does not fit the model") as caught:
        check_handler(handler, VECTOR)
    assert "[1, 4]" in caught.value.message
    assert "'x'" in caught.value.message


def test_image_handler_against_the_wrong_model(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="rank 4"):
        prepare_handler("image-classification", VECTOR)
    two_inputs = ModelMetadata(RESNET_METADATA.inputs * 2, RESNET_METADATA.outputs, True)
    with pytest.raises(ModelLoadError, match="one image input"):
        prepare_handler("image-classification", two_inputs)
    with pytest.raises(ModelLoadError, match="unknown option"):
        prepare_handler("image-classification", RESNET_METADATA, {"colour": "red"})
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\n")
    with pytest.raises(ModelLoadError, match="2 labels, the model has 1000"):
        prepare_handler("image-classification", RESNET_METADATA, {"labels": str(labels)})


async def test_handler_errors_map_to_statuses(user_module: str) -> None:
    for name, error in (("Crashes", InferenceFailed), ("WrongShape", InferenceFailed)):
        # check_handler would refuse these at load time; run them anyway to see the mapping.
        async with HandlerExecutor("thread", 1, 4) as executor:
            handler = load_handler(f"{user_module}:{name}")
            handler.setup(VECTOR, {})
            with pytest.raises(error) as caught:
                await executor.run(_preprocess, handler, VECTOR, RawRequest(b"1,2,3"), 1 << 24)
            assert caught.value.status == 500
    async with HandlerPipeline(HandlerConfig(f"{user_module}:Doubler"), VECTOR) as pipeline:
        with pytest.raises(InvalidInput):
            await pipeline.preprocess(RawRequest.from_body(b"a,b", "text/csv"))


async def test_process_pool_runs_a_user_handler(user_module: str) -> None:
    config = HandlerConfig(
        f"{user_module}:Doubler", (("scale", "3"),), executor="process", workers=1
    )
    async with HandlerPipeline(config, VECTOR) as pipeline:
        request = RawRequest.from_body(b"1,2,3", "text/csv")
        inputs = await pipeline.preprocess(request, timeout_s=30)
        np.testing.assert_array_equal(inputs["x"], [[3, 6, 9]])
        assert isinstance(inputs["x"], np.ndarray)
        body = await pipeline.postprocess({"y": inputs["x"] + 1}, request, timeout_s=30)
        assert orjson.loads(encode_body(body)) == {"sum": 21.0, "rows": 1}
        with pytest.raises(InvalidInput):  # our errors cross the process boundary intact
            await pipeline.preprocess(RawRequest.from_body(b"x", "text/csv"))
        assert pipeline.statistics().completed >= 3


async def test_process_pool_with_the_image_handler() -> None:
    config = HandlerConfig("image-classification", executor="process", workers=2)
    data = encode(photo(640, 480), "JPEG")
    async with HandlerPipeline(config, RESNET_METADATA) as pipeline:
        inputs = await pipeline.preprocess(raw(data), timeout_s=30)
        with pytest.raises(PayloadTooLarge):
            await pipeline.preprocess(raw(png_header(30000, 30000), "image/png"))
    np.testing.assert_allclose(inputs["input"][0], reference_preprocess(data), atol=2e-5)


# ------------------------------------------------------------------------- executor


def _wait(event: threading.Event) -> str:
    event.wait(10)
    return "done"


async def test_executor_back_pressure() -> None:
    gate = threading.Event()
    async with HandlerExecutor("thread", workers=1, max_pending=2) as executor:
        running = [asyncio.create_task(executor.run(_wait, gate)) for _ in range(2)]
        await wait_until(lambda: executor.statistics().pending == 2, "both calls submitted")
        with pytest.raises(Overloaded) as caught:
            await executor.run(_wait, gate)
        assert caught.value.status == 429
        gate.set()
        assert await asyncio.gather(*running) == ["done", "done"]
        stats = executor.statistics()
        assert (stats.pending, stats.completed, stats.rejected) == (0, 2, 1)
        assert await executor.run(_wait, gate) == "done"  # room again


async def test_executor_deadline() -> None:
    gate = threading.Event()
    async with HandlerExecutor("thread", workers=1, max_pending=4) as executor:
        with pytest.raises(DeadlineExceeded) as caught:
            await executor.run(_wait, gate, timeout_s=0.05)
        assert caught.value.status == 504
        with pytest.raises(DeadlineExceeded):
            await executor.run(_wait, gate, timeout_s=0)
        assert executor.statistics().timed_out == 2
        gate.set()


async def test_cancelled_caller_frees_its_slot_before_the_work_starts() -> None:
    gate = threading.Event()
    calls: list[str] = []

    def record(tag: str) -> str:
        calls.append(tag)
        return tag

    async with HandlerExecutor("thread", workers=1, max_pending=2) as executor:
        busy = asyncio.create_task(executor.run(_wait, gate))
        queued = asyncio.create_task(executor.run(record, "queued"))
        await wait_until(lambda: executor.statistics().pending == 2, "both calls submitted")
        queued.cancel()
        with pytest.raises(asyncio.CancelledError):
            await queued
        stats = executor.statistics()
        assert (stats.pending, stats.cancelled) == (1, 1)
        late = asyncio.create_task(executor.run(record, "late"))  # the freed slot takes it
        await wait_until(lambda: executor.statistics().pending == 2, "the late call submitted")
        gate.set()
        assert await busy == "done"
        assert await late == "late"
    assert calls == ["late"]  # the cancelled call never ran


async def test_executor_refuses_when_closed() -> None:
    executor = HandlerExecutor("thread", workers=1, max_pending=1)

    with pytest.raises(NotReady):
        await executor.run(_wait, threading.Event())


def test_v2_json_base64_images_reach_the_handler() -> None:
    # Base64 text in a V2 JSON request works with the V2 decoder as it is.
    image = encode(photo(64, 64), "PNG")
    body = (
        b'{"inputs":[{"name":"images","shape":[1],"datatype":"BYTES","data":["'
        + base64.b64encode(image)
        + b'"]}]}'
    )
    decoded = decode_request(body)
    assert wants_handler(decoded.inputs, RESNET_METADATA)
    batch = _image_handler().preprocess(RawRequest.from_v2(decoded.inputs))["input"]
    np.testing.assert_allclose(batch[0], reference_preprocess(image), atol=2e-5)


def test_nhwc_model_layout() -> None:
    nhwc = ModelMetadata(
        (TensorSpec("pixels", "FP32", (-1, 160, 160, 3)),),
        (TensorSpec("scores", "FP32", (-1, 10)),),
        True,
    )
    handler = prepare_handler("image-classification", nhwc, {"resize": "180"})
    data = encode(photo(400, 300), "JPEG")
    batch = handler.preprocess(raw(data))["pixels"]
    assert batch.shape == (1, 160, 160, 3)
    expected = reference_preprocess(data, size=160, resize=180).transpose(1, 2, 0)
    np.testing.assert_allclose(batch[0], expected, atol=2e-5)
