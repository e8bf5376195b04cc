"""Handler faults: aspect-ratio image bombs, handler code that exits or hangs, executors that
stop with calls queued or stuck, and handler worker processes whose server was killed."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import orjson
import pytest
from PIL import Image

from batchserve.errors import InferenceFailed, InvalidInput, ModelLoadError, NotReady
from batchserve.handlers import HandlerConfig, HandlerPipeline, RawRequest, encode_body, imaging
from batchserve.handlers.executor import HandlerExecutor
from batchserve.handlers.image import ImageClassificationHandler
from batchserve.handlers.loader import check_handler, prepare_handler
from batchserve.runtime.metadata import ModelMetadata, TensorSpec

from helpers import (
    RESNET_METADATA,
    StartServerProcess,
    encode,
    photo,
    raw,
    reference_preprocess,
    wait_for_exits,
    wait_until,
)

MLP = ModelMetadata(
    (TensorSpec("input", "FP32", (-1, 64)),), (TensorSpec("probabilities", "FP32", (-1, 10)),), True
)

FAULTY = '''
import sys, time
import numpy as np
from batchserve.handlers import RawRequest


class Faulty:
    """text/plain; ?mode= picks the fault: exit, kbd (preprocess), post-exit (postprocess)."""

    media_types = frozenset({"text/plain"})

    def sample_request(self, metadata):
        return RawRequest.from_body(b"", "text/plain")

    def preprocess(self, request):
        mode = request.parameters.get("mode", "")
        if mode == "exit":
            sys.exit(3)
        if mode == "kbd":
            raise KeyboardInterrupt
        time.sleep(float(request.parameters.get("sleep", "0")))
        return {"input": np.ones((1, 64), np.float32)}

    def postprocess(self, outputs, request):
        if request.parameters.get("mode") == "post-exit":
            sys.exit(4)
        return {"sum": float(outputs["probabilities"].sum())}


class ExitsInSetup(Faulty):
    def setup(self, metadata, options):
        sys.exit(5)


class BadSample(Faulty):
    def sample_request(self, metadata):
        return {"oops": 1}["missing"]


class ExitingSample(Faulty):
    def sample_request(self, metadata):
        raise SystemExit(6)
'''


@pytest.fixture
def faulty(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    name = f"faulty_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(FAULTY))
    monkeypatch.syspath_prepend(str(tmp_path))  # reaches spawned workers too
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # and a server started as a process
    return name


def text(**parameters: str) -> RawRequest:
    return RawRequest.from_body(b"x", "text/plain", {}, parameters)


async def fake_infer(
    inputs: dict[str, np.ndarray], *, timeout_s: float | None
) -> dict[str, np.ndarray]:
    return {"probabilities": np.full((1, 10), 0.1, np.float32)}


# ------------------------------------------------------------------------- image bombs


@pytest.mark.slow
def test_a_40000x1_png_is_answered_quickly_with_bounded_memory() -> None:
    """A ~100-byte PNG far under max_pixels, whose short side scaled to 256 would make a
    10-gigapixel image: preprocessed in a child process capped at 1 GiB more address space."""
    script = textwrap.dedent(
        """
        import io, resource, sys, time
        from PIL import Image
        from batchserve.handlers import RawRequest
        from batchserve.handlers.image import ImageClassificationHandler
        from helpers import RESNET_METADATA
        buffer = io.BytesIO()
        Image.new("RGB", (40000, 1), (200, 10, 10)).save(buffer, "PNG")
        data = buffer.getvalue()
        assert len(data) < 300, len(data)
        handler = ImageClassificationHandler()
        handler.setup(RESNET_METADATA, {})
        with open("/proc/self/status") as status:
            size = next(int(l.split()[1]) for l in status if l.startswith("VmSize:")) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (size + 2**30, resource.RLIM_INFINITY))
        started = time.process_time()
        batch = handler.preprocess(RawRequest.from_body(data, "image/png"))["input"]
        print(batch.shape, round(time.process_time() - started, 3))
        """
    )
    tests = str(Path(__file__).parent)
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": tests},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    shape, seconds = done.stdout.rsplit(" ", 1)
    assert shape == "(1, 3, 224, 224)"
    # CPU seconds of the child alone (other work on the machine does not count), far under a
    # full resize to 10 gigapixels: the work done is bounded, not merely the memory.
    assert float(seconds) < 2.0, seconds


def _center_crop(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """The reference: the centre of the full resize, rounded as torchvision's `CenterCrop`."""
    top = round((pixels.shape[0] - height) / 2.0)
    left = round((pixels.shape[1] - width) / 2.0)
    return pixels[top : top + height, left : left + width]


@pytest.mark.parametrize("size", [(2000, 60), (60, 2000), (5000, 17), (4097, 256)])
def test_very_wide_or_tall_images_match_the_full_resize(size: tuple[int, int]) -> None:
    """Past the exact path's area limit only the crop is resampled: the same pixels as the
    full resize + crop (torchvision's transform) within one level of 255."""
    image = Image.fromarray(photo(*size))
    full = _center_crop(np.asarray(imaging.resize_short_side(image, 256)), 224, 224)
    new_w, new_h = imaging.resize_short_side(image, 256).size
    assert new_w * new_h > imaging.FULL_RESIZE_MAX_AREA * 256 * 256  # the cropped path runs
    cropped = np.asarray(imaging.resize_center_crop(image, 256, 224, 224))
    assert cropped.shape == full.shape == (224, 224, 3)
    assert np.abs(cropped.astype(int) - full.astype(int)).max() <= 1


# ------------------------------------------------------------------------- top_k


@pytest.mark.parametrize("value", ["²", "①", "٣", "0", "-1"])
def test_bad_top_k_is_400_before_any_inference(value: str) -> None:
    handler = ImageClassificationHandler()
    handler.setup(RESNET_METADATA, {})
    with pytest.raises(InvalidInput, match="top_k"):
        handler.preprocess(raw(encode(photo(64, 64), "PNG"), "image/png", top_k=value))
    assert handler.preprocess(raw(encode(photo(64, 64), "PNG"), "image/png", top_k="3"))


# ------------------------------------------------------------------------- handler code that exits


@pytest.mark.parametrize("executor", ["thread", "process"])
async def test_sys_exit_in_a_handler_is_a_500_not_the_end_of_the_server(
    faulty: str, executor: str
) -> None:
    config = HandlerConfig(f"{faulty}:Faulty", executor=executor, workers=1)  # type: ignore[arg-type]
    async with HandlerPipeline(config, MLP) as pipeline:
        for mode, step, code in (
            ("exit", "preprocess", "SystemExit: 3"),
            ("kbd", "preprocess", "KeyboardInterrupt"),
            ("post-exit", "postprocess", "SystemExit: 4"),
        ):
            with pytest.raises(InferenceFailed, match=f"handler {step} failed: {code}"):
                await pipeline.run(text(mode=mode), fake_infer)
        # The worker (thread or process) survived and still serves.
        body = await pipeline.run(text(), fake_infer)
        assert orjson.loads(encode_body(body)) == {"sum": pytest.approx(1.0)}


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("ExitsInSetup", "setup failed: SystemExit: 5"),
        ("BadSample", "sample_request failed: 'missing'"),
        ("ExitingSample", "sample_request failed: SystemExit: 6"),
    ],
)
def test_load_time_handler_faults_are_model_load_errors(
    faulty: str, name: str, message: str
) -> None:
    with pytest.raises(ModelLoadError, match=message):
        check_handler(prepare_handler(f"{faulty}:{name}", MLP), MLP)


# ------------------------------------------------------------------------- executor drain


async def test_close_lets_queued_calls_finish() -> None:
    executor = HandlerExecutor("thread", workers=1, max_pending=4)
    await executor.start()
    release = threading.Event()
    running = asyncio.ensure_future(executor.run(release.wait, 30))
    queued = asyncio.ensure_future(executor.run(sum, [1, 2, 3]))
    try:
        await wait_until(lambda: executor.statistics().pending == 2, "both calls submitted")
        closing = asyncio.ensure_future(executor.aclose(timeout_s=60))
        await wait_until(lambda: not executor.accepting, "the close begun (no new calls)")
        with pytest.raises(NotReady):
            await executor.run(sum, [1])
        assert not queued.done()  # still waiting behind the running call
        release.set()  # the running call ends while the executor is closing
        async with asyncio.timeout(60):  # a hang guard only
            await closing
        assert await running is True
        assert await queued == 6  # not cancelled: its request was in flight
    finally:
        release.set()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["thread", "process"])
async def test_close_has_a_deadline_even_with_a_hung_call(kind: str) -> None:
    executor = HandlerExecutor(kind, workers=1, max_pending=4)  # type: ignore[arg-type]
    await executor.start()
    release = threading.Event()
    hung = (
        asyncio.ensure_future(executor.run(release.wait))
        if kind == "thread"
        else asyncio.ensure_future(executor.run(time.sleep, 60))
    )
    await wait_until(lambda: executor.statistics().pending == 1, "the hung call submitted")
    queued = asyncio.ensure_future(executor.run(sum, [1]))
    await wait_until(lambda: executor.statistics().pending == 2, "the queued call submitted")
    # The hung call never ends by itself (a minute's sleep, or an event set only below): the
    # close returns because of its own deadline. asyncio.timeout(30) is a hang guard only.
    async with asyncio.timeout(30):
        await executor.aclose(timeout_s=0.5)
    # Both callers get an answer: a clean 503, never a CancelledError that drops the connection.
    for call in (hung, queued):
        with pytest.raises(NotReady, match="stopped"):
            await asyncio.wait_for(call, 5)
    release.set()


async def test_abandoned_handler_threads_cannot_block_interpreter_exit() -> None:
    async with HandlerExecutor("thread", workers=2, max_pending=4) as executor:
        await executor.run(sum, [1])
        threads = [t for t in threading.enumerate() if t.name.startswith("batchserve-handler")]
        assert len(threads) >= 2
        assert all(t.daemon for t in threads)


# ------------------------------------------------------------------------- orphaned workers


def descendants(pid: int) -> set[int]:
    found: set[int] = set()
    todo = [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                children = (task / "children").read_text().split()
            except OSError:
                continue
            for child in map(int, children):
                if child not in found:
                    found.add(child)
                    todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
def test_process_handler_workers_exit_when_their_server_is_killed(
    faulty: str, mlp_path: Path, serve_process: StartServerProcess
) -> None:
    server = serve_process(str(mlp_path), "--name", "m", "--handler", f"{faulty}:Faulty",
                           "--handler-executor", "process", "--handler-workers", "2")  # fmt: skip
    children: set[int] = set()
    try:
        children = descendants(server.process.pid)
        assert len(children) >= 2  # the handler workers (and multiprocessing's tracker)
        server.kill()  # SIGKILL: no chance to stop its handler workers itself
        wait_for_exits(children, timeout_s=30)
        left = {p: Path(f"/proc/{p}/cmdline").read_bytes()[:200] for p in children if alive(p)}
        assert left == {}
    finally:
        server.kill()
        for pid in children:  # never leave a stray process behind, even when failing
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_a_png_of_a_normal_photo_still_matches_the_reference() -> None:
    """Ordinary aspect ratios keep the exact full-resize path."""
    handler = ImageClassificationHandler()
    handler.setup(RESNET_METADATA, {})
    data = encode(photo(1600, 400), "PNG")  # 4:1, still the exact path
    batch = handler.preprocess(raw(data, "image/png"))["input"]
    np.testing.assert_allclose(batch[0], reference_preprocess(data), rtol=0, atol=2e-5)
