"""A model's handler and its executor: preprocess → batched inference → postprocess, with one
deadline across the three steps and handler code kept off the event loop."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Mapping
from math import prod
from typing import Protocol

import numpy as np
import orjson

from batchserve.clock import Clock, MonotonicClock
from batchserve.errors import (
    BatchserveError,
    DeadlineExceeded,
    InferenceFailed,
    InvalidInput,
    PayloadTooLarge,
)
from batchserve.handlers.base import Handler, RawRequest
from batchserve.handlers.config import HandlerConfig
from batchserve.handlers.executor import ExecutorStatistics, HandlerExecutor
from batchserve.handlers.loader import check_handler, check_inputs, prepare_handler
from batchserve.handlers.negotiate import answer_body
from batchserve.lifecycle import Lifecycle
from batchserve.runtime import ModelMetadata


class InferFn(Protocol):
    """The batched model call, e.g. `functools.partial(engine.infer, cache=False)`."""

    def __call__(
        self, inputs: dict[str, np.ndarray], *, timeout_s: float | None
    ) -> Awaitable[Mapping[str, np.ndarray]]: ...


class HandlerPipeline(Lifecycle):
    """`async with HandlerPipeline(config, metadata) as pipeline:
    body = await pipeline.run(request, infer, timeout_s=0.5)`.

    Entering loads the handler, sets it up, checks it against the model (ModelLoadError when it
    does not fit) and starts the executor; in process mode each worker process imports and sets
    up its own copy by spec (handlers are never pickled, nor is any client data unpickled: a
    request's bytes travel as `bytes`).

    What a handler makes is bounded on the worker that makes it: each preprocess tensor by
    `config.max_elements`, the postprocess answer's JSON by `config.max_answer_bytes` (413
    either way), so nothing larger crosses to this process or runs on the event loop.
    """

    def __init__(
        self, config: HandlerConfig, metadata: ModelMetadata, *, clock: Clock | None = None
    ) -> None:
        self.config = config
        self.metadata = metadata
        self._clock = clock or MonotonicClock()
        self._handler: Handler | None = None
        self._executor: HandlerExecutor | None = None
        self.checked = False  # whether the handler offered a sample that was checked

    async def start(self) -> None:
        config, metadata = self.config, self.metadata
        # Imports and setup may block (reading a labels file, building a tokenizer).
        handler = await asyncio.to_thread(prepare_handler, config.spec, metadata, config.option_map)
        self.checked = await asyncio.to_thread(check_handler, handler, metadata)
        workers = config.resolved_workers()
        if config.executor == "thread":
            executor = HandlerExecutor(
                "thread",
                workers,
                config.resolved_max_pending(),
                drain_timeout_s=config.drain_timeout_s,
            )
        else:
            executor = HandlerExecutor(
                "process",
                workers,
                config.resolved_max_pending(),
                initializer=_init_worker,
                initargs=(config.spec, dict(config.options), metadata),
                drain_timeout_s=config.drain_timeout_s,
            )
        await executor.start()
        self._handler, self._executor = handler, executor

    async def aclose(self) -> None:
        executor, self._executor = self._executor, None
        if executor is not None:
            await executor.aclose()

    @property
    def handler(self) -> Handler:
        """The parent process's instance (in process mode: used only for load-time checks)."""
        if self._handler is None:
            raise RuntimeError("the handler pipeline is not started")
        return self._handler

    @property
    def media_types(self) -> frozenset[str]:
        """Raw body types the handler takes, for `negotiate.choose_route`."""
        return frozenset(getattr(self.handler, "media_types", frozenset()))

    async def preprocess(
        self, request: RawRequest, *, timeout_s: float | None = None
    ) -> dict[str, np.ndarray]:
        executor, limit = self._running(), self.config.max_elements
        if executor.kind == "process":
            return await executor.run(_worker_preprocess, request, limit, timeout_s=timeout_s)
        return await executor.run(
            _preprocess, self.handler, self.metadata, request, limit, timeout_s=timeout_s
        )

    async def postprocess(
        self,
        outputs: Mapping[str, np.ndarray],
        request: RawRequest,
        *,
        timeout_s: float | None = None,
    ) -> orjson.Fragment:
        """The handler's answer, already JSON: `encode_body` and `v2_outputs` take it as is."""
        executor, limit = self._running(), self.config.max_answer_bytes
        outputs = dict(outputs)
        if executor.kind == "process":
            body = await executor.run(
                _worker_postprocess, outputs, request, limit, timeout_s=timeout_s
            )
        else:
            body = await executor.run(
                _postprocess, self.handler, outputs, request, limit, timeout_s=timeout_s
            )
        return orjson.Fragment(body)

    async def run(
        self, request: RawRequest, infer: InferFn, *, timeout_s: float | None = None
    ) -> orjson.Fragment:
        """The whole path for one request; `timeout_s` bounds all three steps together. The
        answer is JSON already (see `postprocess`)."""
        deadline = None if timeout_s is None else self._clock.now() + timeout_s
        inputs = await self.preprocess(request, timeout_s=self._left(deadline))
        outputs = await infer(inputs, timeout_s=self._left(deadline))
        return await self.postprocess(outputs, request, timeout_s=self._left(deadline))

    def _left(self, deadline: float | None) -> float | None:
        if deadline is None:
            return None
        left = deadline - self._clock.now()
        if left <= 0:
            raise DeadlineExceeded("the request's deadline passed during its handler")
        return left

    def _running(self) -> HandlerExecutor:
        executor = self._executor
        if executor is None:
            raise RuntimeError("the handler pipeline is not started")
        return executor

    def statistics(self) -> ExecutorStatistics:
        return self._running().statistics()


# What runs on a worker (thread or process). Foreign exceptions become InferenceFailed here, so
# what crosses back is always one of ours (and picklable: a user's exception may not be).
# BaseException too: on a worker nothing of ours is ever cancelled or exited, while a handler's
# sys.exit() or KeyboardInterrupt, re-raised on the event loop, would end the whole server.


def _preprocess(
    handler: Handler, metadata: ModelMetadata, request: RawRequest, max_elements: int
) -> dict[str, np.ndarray]:
    try:
        inputs = handler.preprocess(request)
    except BatchserveError:
        raise
    except BaseException as err:
        raise InferenceFailed(f"handler preprocess failed: {type(err).__name__}: {err}") from None
    _check_elements(inputs, max_elements)
    try:
        check_inputs(inputs, metadata)
    except InvalidInput as err:
        # The handler made these arrays, not the client: a server-side fault.
        raise InferenceFailed(f"handler output does not fit the model: {err.message}") from None
    return inputs


def _check_elements(inputs: object, max_elements: int) -> None:
    """PayloadTooLarge when the handler made a tensor past the element limit from this request,
    counted as the V2 decoder counts a client's own tensors: a zero dimension empties the
    tensor but not the rows a model makes of the others, so it counts as one."""
    if not isinstance(inputs, dict):
        return  # check_inputs says what is wrong
    for name, array in inputs.items():
        shape = getattr(array, "shape", None)
        if not isinstance(shape, tuple):
            continue
        extent = prod(dim for dim in shape if dim)
        if extent > max_elements:
            raise PayloadTooLarge(
                f"the handler made input {name!r} of shape {list(shape)} from this request: "
                f"{extent} elements, over the limit of {max_elements}"
            )


def _postprocess(
    handler: Handler, outputs: Mapping[str, np.ndarray], request: RawRequest, max_bytes: int
) -> bytes:
    try:
        answer = handler.postprocess(outputs, request)
    except BatchserveError:
        raise
    except BaseException as err:
        raise InferenceFailed(f"handler postprocess failed: {type(err).__name__}: {err}") from None
    return _encode_answer(answer, max_bytes)


def _encode_answer(answer: object, max_bytes: int) -> bytes:
    """The answer's JSON, bounded: encoded here, on the worker, it crosses to the server (and
    its event loop) as one bytes object of known size instead of a Python structure of any
    size, pickled, rebuilt and encoded there."""
    try:
        return answer_body(answer, max_bytes)
    except (TypeError, ValueError) as err:  # orjson.JSONEncodeError is a TypeError
        raise InferenceFailed(
            f"handler postprocess returned an answer that is not JSON: {err}"
        ) from None


class _Worker:
    """The handler of this worker process; set once by the pool's initializer."""

    handler: Handler | None = None
    metadata: ModelMetadata | None = None


def _init_worker(spec: str, options: dict[str, str], metadata: ModelMetadata) -> None:
    # A process-pool worker has no other way to keep state between calls than its module.
    _Worker.handler = prepare_handler(spec, metadata, options)
    _Worker.metadata = metadata


def _worker_preprocess(request: RawRequest, max_elements: int) -> dict[str, np.ndarray]:
    handler, metadata = _Worker.handler, _Worker.metadata
    if handler is None or metadata is None:
        raise InferenceFailed("handler worker process not initialised")
    return _preprocess(handler, metadata, request, max_elements)


def _worker_postprocess(
    outputs: dict[str, np.ndarray], request: RawRequest, max_bytes: int
) -> bytes:
    handler = _Worker.handler
    if handler is None:
        raise InferenceFailed("handler worker process not initialised")
    return _postprocess(handler, outputs, request, max_bytes)
