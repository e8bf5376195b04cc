"""One served model: validation, the batching queue and the session pool, without HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson

from batchserve.cache import ByteLRU, CacheStatistics, RedisTier, ResponseCache, cache_key
from batchserve.call import Call, Result
from batchserve.clock import Clock, MonotonicClock
from batchserve.config import BatchConfig, CacheConfig, RuntimeConfig
from batchserve.errors import DeadlineExceeded, InferenceFailed, InvalidInput, NotReady
from batchserve.handlers import (
    HandlerConfig,
    HandlerPipeline,
    RawRequest,
    answer_body,
    choose_route,
    handler_request,
    v2_outputs,
    wants_handler,
)
from batchserve.lifecycle import Lifecycle
from batchserve.queue import Batcher, BatcherStatistics, BatchPolicy
from batchserve.runtime import (
    HealthPolicy,
    ModelMetadata,
    PoolStatistics,
    SessionBuilder,
    SessionPool,
    capture_rows,
    sample_inputs,
)
from batchserve.runtime.input_prefix import formats_key
from batchserve.tracing import RequestTrace, Tracing

log = logging.getLogger("batchserve.engine")


@dataclass(frozen=True, slots=True)
class EngineStatistics:
    batcher: BatcherStatistics
    pool: PoolStatistics
    load_seconds: float
    cache: CacheStatistics | None = None


class Engine(Lifecycle):
    """Serve one ONNX model to concurrent callers, merging their requests into batches.

    >>> async with Engine("mlp.onnx", BatchConfig(max_batch_size=32)) as engine:
    ...     outputs = await engine.infer({"input": array})

    Front ends serve through `call`, which takes a model's handler into account.
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        batch: BatchConfig | None = None,
        runtime: RuntimeConfig | None = None,
        *,
        name: str | None = None,
        version: str = "1",
        clock: Clock | None = None,
        cache: CacheConfig | None = None,
        handler: HandlerConfig | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self.model_path = Path(model_path)
        self.handler_config = handler
        self.tracing = tracing  # spans of its runs, when tracing is on (started by its owner)
        # The handler around the model (pre- and post-processing off the event loop), if any.
        self.pipeline: HandlerPipeline | None = None
        self.batch_config = batch or BatchConfig()
        self.runtime_config = runtime or RuntimeConfig()
        self.name = name or self.model_path.stem
        self.version = version
        self._clock = clock or MonotonicClock()
        self._metadata: ModelMetadata | None = None
        self._batcher: Batcher | None = None
        self._pool: SessionPool | None = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._ready = False
        self._load_seconds = 0.0
        self.cache_config = cache or CacheConfig()
        self._cache: ResponseCache | None = None
        self._cache_version = version
        self._calls = 0  # infer calls in progress, so an unloaded version can drain them
        self.retired = False  # no longer routed to: callers holding it should look again
        self.digest = ""  # of the model file's bytes it loaded (set by `start`)

    def fresh(self) -> Engine:
        """A new, unstarted engine with the same settings. Loading a model again builds one:
        the unloaded engine may still be draining, and its drain closes it, not the new one."""
        return Engine(self.model_path, self.batch_config, self.runtime_config, name=self.name,
                      version=self.version, clock=self._clock, cache=self.cache_config,
                      handler=self.handler_config, tracing=self.tracing)  # fmt: skip

    async def start(self) -> None:
        """Load the model, build and warm up the sessions; returns when ready to serve."""
        if self._stack is not None:
            # Restarting a started (or draining) engine would orphan its pool, and whoever
            # closes it later would close the new one.
            raise RuntimeError(f"engine {self.name} version {self.version} is already started")
        started = time.perf_counter()
        builder = SessionBuilder(self.model_path, self.runtime_config)
        sessions, metadata = await asyncio.to_thread(builder.load)
        self.digest = builder.digest
        # Keys carry the file's digest: a new file never gets the old file's answers; and the
        # precision and input formats: replicas with and without --fp16, or normalising
        # UINT8 inputs differently, may share one Redis.
        precision = ":fp16" if self.runtime_config.fp16 else ""
        if self.runtime_config.input_formats:
            precision += ":" + formats_key(self.runtime_config.input_formats)
        self._cache_version = f"{self.version}:{builder.digest}{precision}"
        runtime = self.runtime_config
        health = HealthPolicy(
            replace_after_failures=runtime.replace_after_failures,
            stall_after_s=runtime.stall_timeout_s,
        )
        pool = SessionPool(sessions, metadata.input_names, rebuild=builder.rebuild, health=health)
        async with contextlib.AsyncExitStack() as stack:
            if self.cache_config.enabled:
                self._cache = await stack.enter_async_context(self._build_cache())
            await stack.enter_async_context(pool)
            await self._warm_up(pool, metadata)
            policy = BatchPolicy(self.batch_config.max_batch_size, self.batch_config.max_latency_s)
            batcher = Batcher(
                pool,
                policy,
                self._clock,
                max_queue_rows=self.batch_config.max_queue_rows,
                batched=metadata.batched,
                max_shape_groups=self.batch_config.max_shape_groups,
                priority=self.batch_config.priority,
                tracer=self.tracing.batches(self.name, self.version) if self.tracing else None,
            )
            # Closed in reverse: the batcher drains before the pool stops its threads.
            self._batcher = await stack.enter_async_context(batcher)
            pool.on_capacity = batcher.wake
            if self.handler_config is not None:
                # Loaded and checked against the model before the engine reports ready.
                self.pipeline = await stack.enter_async_context(
                    HandlerPipeline(self.handler_config, metadata, clock=self._clock)
                )
            self._stack = stack.pop_all()
        self._pool, self._metadata = pool, metadata
        self._load_seconds = time.perf_counter() - started
        self.retired = False
        self._ready = True
        log.info(
            "model %s loaded in %.2fs: %d session(s) on %s, batching %s",
            self.name,
            self._load_seconds,
            self.runtime_config.instances,
            self.runtime_config.device,
            f"up to {self.batch_config.max_batch_size} rows" if metadata.batched else "off",
        )

    def _build_cache(self) -> ResponseCache:
        config = self.cache_config
        redis = None
        if config.redis_url:
            redis = RedisTier(
                config.redis_url,
                self._clock,
                ttl_s=config.ttl_s,
                timeout_s=config.redis_timeout_ms / 1000.0,
                reset_after_s=config.redis_retry_after_s,
            )
        return ResponseCache(ByteLRU(int(config.size_mb * 1024 * 1024)), redis)

    async def _warm_up(self, pool: SessionPool, metadata: ModelMetadata) -> None:
        if self.runtime_config.cuda_graphs:
            await self._capture_graphs(pool, metadata)  # needed, --no-warmup or not
            return
        if not self.runtime_config.warmup:
            return
        # The first run of each shape allocates and plans; pay it before taking traffic.
        sizes = {1, self.batch_config.max_batch_size} if metadata.batched else {1}
        for rows in sorted(sizes):
            inputs = sample_inputs(metadata, rows)
            try:
                await pool.run_each([inputs[name] for name in metadata.input_names])
            except Exception as err:  # generated inputs may be meaningless to some models
                log.warning("warm-up of %s at %d rows failed, skipped: %s", self.name, rows, err)
                return

    async def _capture_graphs(self, pool: SessionPool, metadata: ModelMetadata) -> None:
        # A capture breaks when another thread makes CUDA calls meanwhile: capture every
        # bucket now, one session at a time, and never while serving.
        max_rows = self.batch_config.max_batch_size
        try:
            for rows in capture_rows(max_rows) if metadata.batched else [1]:
                inputs = sample_inputs(metadata, rows)
                try:
                    await pool.run_in_turn([inputs[name] for name in metadata.input_names])
                except Exception as err:  # generated inputs may be meaningless to some models
                    log.warning(
                        "capturing CUDA graphs of %s at %d rows failed; batches without a "
                        "graph run without one: %s",
                        self.name,
                        rows,
                        err,
                    )
                    return
        finally:
            pool.stop_capturing()

    async def aclose(self) -> None:
        """Stop taking requests, finish the queued ones, stop the sessions."""
        self._ready = False
        stack, self._stack = self._stack, None
        if stack is not None:
            try:
                await stack.aclose()
            finally:
                # Let go of the sessions (weights, arenas, threads, GPU memory) now rather
                # than when the cyclic collector next runs, which a tuned GC makes rare.
                self._pool = self._batcher = self._cache = self.pipeline = None

    @property
    def ready(self) -> bool:
        return self._ready

    def call(self, call: Call) -> Result:
        """Serve one call, the one entry point of front ends; returns a `Result` at once, to be
        awaited (it returns itself once served).

        A model with a handler takes through it a raw payload (`call.body`) and V2 tensors that
        carry a BYTES input the model itself does not take as BYTES (an encoded image for an
        FP32 model): preprocess → the batched run → postprocess, one deadline for all three.
        Every other call goes straight to the model (`infer`). Raises at once (InvalidInput)
        for V2 tensors bound for the handler that ask for an output besides `predictions`."""
        result = Result()
        pipeline = self.pipeline
        if call.body is None and (
            pipeline is None or not wants_handler(call.inputs, self.metadata)
        ):
            result.running = self._infer(call, result)
        else:
            result.running = self._handle(handler_request(call), call, result)
        return result

    def takes_raw(self, content_type: str | None) -> bool:
        """Whether a body of this media type is a raw payload for the model's handler (an
        image) rather than a V2 request; UnsupportedMediaType (415) for a raw payload type
        (image, audio, video) the handler does not take. A model without a handler takes none:
        every body is a V2 request."""
        pipeline = self.pipeline
        return pipeline is not None and choose_route(content_type, pipeline.media_types) == "raw"

    @property
    def raw_bytes(self) -> bool:
        """Whether BYTES inputs sent as binary data are to stay bytes (encoded images for the
        model's handler) rather than be read as UTF-8 text: when there is a handler and the
        model itself takes no text."""
        if self.pipeline is None:
            return False
        return not any(t.datatype == "BYTES" for t in self.metadata.inputs)

    async def infer_request(
        self,
        request: RawRequest,
        *,
        cache: bool = True,
        timeout_s: float | None = None,
        max_output_bytes: int | None = None,
    ) -> orjson.Fragment:
        """One request through the model's handler: preprocess, the batched run, postprocess
        (one deadline for all three); the handler's response body, JSON already.
        `max_output_bytes`: as for `infer`, on the tensors the handler's preprocessing makes."""
        call = Call(cache=cache, timeout_s=timeout_s, max_output_bytes=max_output_bytes)
        return await self._through_handler(request, call, Result())

    async def _handle(self, request: RawRequest, call: Call, result: Result) -> Result:
        """A call through the handler, its answer in the call's form: JSON for a raw payload,
        the `predictions` output for V2 tensors."""
        answer = await self._through_handler(request, call, result)
        if call.body is None:
            result.outputs = v2_outputs(answer)
        else:
            result.outputs = {}
            result.answer = answer_body(answer, call.max_output_bytes)
        return result

    async def _through_handler(
        self, request: RawRequest, call: Call, result: Result
    ) -> orjson.Fragment:
        pipeline = self.pipeline
        if pipeline is None:
            if self.handler_config is not None:  # closed: its handler is gone with it
                raise NotReady(f"model {self.name!r} is not ready")
            raise InvalidInput(f"model {self.name!r} has no handler")
        infer = functools.partial(self._model_outputs, call, result)
        # The whole pipeline counts as one call: a retired engine waits for preprocessing
        # too before it closes, so the request is answered by the engine that took it.
        self._calls += 1
        try:
            return await pipeline.run(request, infer, timeout_s=call.timeout_s)
        finally:
            self._calls -= 1

    async def _model_outputs(
        self, call: Call, result: Result, inputs: dict[str, np.ndarray], *, timeout_s: float | None
    ) -> dict[str, np.ndarray]:
        """The batched run between a handler's two steps, under the call's cache choice and
        output limit, with what is left of its deadline."""
        model_call = Call(
            inputs, cache=call.cache, timeout_s=timeout_s, max_output_bytes=call.max_output_bytes,
            trace=call.trace,
        )  # fmt: skip
        return (await self._infer(model_call, result)).outputs

    def retire(self) -> None:
        """Mark the engine as no longer routed to (a new version replaced it or it is being
        unloaded); requests already inside `infer` still finish."""
        self.retired = True

    async def quiesce(self, timeout_s: float) -> None:
        """Wait (up to `timeout_s`) until no call (`call`, `infer`, `infer_request`) is in
        progress."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        # Polled rather than signalled: an event set per request would cost the hot path.
        while self._calls and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.005)

    def check_admission(self, timeout_s: float | None = None, waited_s: float = 0.0) -> None:
        """Overloaded (429) at once when the queue is full or would make a request with this
        deadline late, counting the `waited_s` it already spent before reaching the server's
        code: lets the front end shed a request before reading and decoding it."""
        batcher = self._batcher
        if batcher is not None:
            batcher.check_room(timeout_s, waited_s)

    def count_refusal(self) -> None:
        """A request for this engine refused in front of it (by the connection gate, on its
        deadline): counted with the queue's own refusals."""
        batcher = self._batcher
        if batcher is not None:
            batcher.count_refusal()

    def problem(self) -> str | None:
        """Why this engine cannot serve although loaded (a wedged or lost session pool), or
        None. The liveness probe reports it: only a restart fixes it."""
        pool = self._pool
        return pool.problem() if pool is not None and self._ready else None

    @property
    def metadata(self) -> ModelMetadata:
        if self._metadata is None:
            raise NotReady(f"model {self.name!r} is not loaded")
        return self._metadata

    async def infer(
        self,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str] | None = None,
        *,
        cache: bool = True,
        timeout_s: float | None = None,
        max_output_bytes: int | None = None,
    ) -> dict[str, np.ndarray]:
        """Run the model on `inputs` (never its handler); returns the requested outputs (all
        when None).

        `max_output_bytes`: PayloadTooLarge (413) before running when the model's outputs for
        this many rows would take more memory than this, as far as their declared shapes tell
        (outputs with a free dimension besides the batch one are not counted); None: no limit.

        The returned arrays belong to the caller: writable, and shared with no other caller
        nor with the cache, whether computed, a cache hit, or the answer of an identical
        request in flight. BYTES inputs may be object arrays of str or UTF-8 bytes, or numpy
        `U` or `S` arrays; they reach the model as str (non-UTF-8 bytes: InvalidInput, 400).
        With a response cache configured, `cache=False` computes (and stores nothing).
        `timeout_s`: past it the request is withdrawn from the queue (no inference is spent on
        it) and DeadlineExceeded (504) is raised."""
        call = Call(
            inputs, outputs, cache=cache, timeout_s=timeout_s, max_output_bytes=max_output_bytes
        )
        return (await self._infer(call, Result())).outputs

    async def _infer(self, call: Call, result: Result) -> Result:
        """`infer` for one call, filling in `result`: the hot path of every front end."""
        batcher = self._batcher
        metadata = self._metadata
        if batcher is None or metadata is None or not self._ready:
            raise NotReady(f"model {self.name!r} is not ready")
        selected = metadata.select_outputs(call.outputs)
        arrays, rows = metadata.validate(call.inputs)
        if call.max_output_bytes is not None:
            metadata.check_output_bytes(rows, call.max_output_bytes)
        timeout_s = call.timeout_s
        tier = 0
        priority = self.batch_config.priority
        if priority is not None:
            tier = priority.tier(call.priority)
            timeout_s = priority.deadline_s(tier, timeout_s)
        response_cache = self._cache
        if response_cache is None or not call.cache:
            answer = self._run(
                batcher, metadata, arrays, rows, selected, result, timeout_s, tier, call.trace
            )
        else:
            named = dict(zip(metadata.input_names, arrays, strict=True))
            key = cache_key(self.name, self._cache_version, named, call.outputs)
            hit = response_cache.local_hit(key)
            if hit is not None:
                result.cache = "hit"
                result.outputs = hit  # decoded from the entry's bytes: arrays of this caller's own
                return result  # nothing to wait for
            result.cache = "miss"
            # A partial, not a lambda: a closure would turn this coroutine's locals into cells
            # that live as long as it waits, enough of them under load to set off the cyclic
            # collector every few dozen requests.
            compute = functools.partial(
                self._run, batcher, metadata, arrays, rows, selected, result, timeout_s, tier,
                call.trace,
            )  # fmt: skip
            answer = response_cache.get_or_compute(key, compute, checked_local=True)
        # Counted while it waits, so an engine being unloaded can let it finish first.
        self._calls += 1
        try:
            if timeout_s is None:
                result.outputs = await answer
            else:
                try:
                    async with asyncio.timeout(timeout_s):
                        result.outputs = await answer
                except TimeoutError:
                    raise DeadlineExceeded(
                        f"no answer within the request's deadline of {timeout_s * 1000:g} ms"
                    ) from None
        finally:
            self._calls -= 1
        return result

    @staticmethod
    async def _run(
        batcher: Batcher,
        metadata: ModelMetadata,
        arrays: list[np.ndarray],
        rows: int,
        selected: list[int],
        result: Result,
        timeout_s: float | None,
        tier: int = 0,
        trace: RequestTrace | None = None,
    ) -> dict[str, np.ndarray]:
        signature = tuple([a.shape[1:] for a in arrays])
        empty = not rows
        if empty:
            # Zero rows: merged into a batch, it would shift every other request's rows; alone
            # (a signature no other queued request has: no shape holds -1), counted as one row.
            signature, rows = (*signature, (-1, id(arrays))), 1
        item = batcher.submit(arrays, rows, signature, timeout_s, tier)
        if trace is not None:
            item.trace = trace  # before its run is dispatched (the next loop iteration at best)
        try:
            results = await item.future
        except asyncio.CancelledError:
            batcher.withdraw(item)
            raise
        finally:
            result.batch_rows = item.batch_rows
        names = metadata.output_names
        if empty:
            _check_no_rows(results)
        return {names[i]: results[i] for i in selected}

    def statistics(self) -> EngineStatistics:
        if self._batcher is None or self._pool is None:
            raise NotReady(f"model {self.name!r} is not loaded")
        cache = self._cache.statistics() if self._cache is not None else None
        return EngineStatistics(
            self._batcher.statistics(), self._pool.statistics(), self._load_seconds, cache
        )


def _check_no_rows(results: Sequence[np.ndarray]) -> None:
    """A request of zero rows runs alone, so no batch split checks its outputs: a model whose
    outputs do not follow the batch dimension would hand it outputs of any size."""
    bad = [list(o.shape) for o in results if not o.shape or o.shape[0]]
    if bad:
        raise InferenceFailed(f"model returned shapes {bad} for a request of 0 rows")
