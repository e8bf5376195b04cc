"""Composition root: builds the engines, the model repository and the HTTP server from one
`ServeSettings` (`build_server`), and runs the server until a signal."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from batchserve.config import BatchConfig, CacheConfig, RuntimeConfig, ServerConfig
from batchserve.engine import Engine
from batchserve.front import ServerState
from batchserve.front.stats import RequestStatistics
from batchserve.handlers.config import ExecutorKind, HandlerConfig
from batchserve.http import METRICS, REPOSITORY, STATE, add_routes
from batchserve.http.connections import (
    ANSWER_SHARE,
    ConnectionCollector,
    ConnectionGuard,
    ConnectionLimits,
    GuardedSite,
    default_max_connections,
    drain_listeners,
)
from batchserve.http.routes import InferEndpoint
from batchserve.lifecycle import Lifecycle
from batchserve.metrics import BatchserveCollector, build_registry
from batchserve.repository import EngineFactory, ModelConfig, ModelRepository
from batchserve.rpc import GrpcServer
from batchserve.settings import ServeSettings
from batchserve.tracing import Tracing

log = logging.getLogger("batchserve.server")


def build_server(settings: ServeSettings) -> Server:
    """The server one process runs for `settings`: its engines, its repository, its front end.
    Nothing starts until the server is entered (`async with server`)."""
    # Tracing off: no Tracing at all, so the request path never calls into one.
    tracing = Tracing(settings.tracing) if settings.tracing.enabled else None
    return Server(build_repository(settings, tracing), settings.server, tracing=tracing)


def build_repository(settings: ServeSettings, tracing: Tracing | None = None) -> ModelRepository:
    grace = settings.server.shutdown_grace_s
    # A server sharing its port with other workers shares its models with them: its own
    # load/unload API cannot reach the others, so it refuses that API.
    shared = settings.server.reuse_port
    handler = settings.handler_config()
    if settings.model_repository is not None:
        limits = HandlerLimits.of(settings.handler_run())
        factory = engine_factory(
            settings.batch, settings.runtime, settings.cache, handler, handler_limits=limits,
            tracing=tracing,
        )  # fmt: skip
        return ModelRepository.from_directory(
            Path(settings.model_repository),
            factory,
            poll_s=settings.repository_poll_s,
            drain_timeout_s=grace,
            shared=shared,
        )
    assert settings.model is not None  # ServeSettings holds exactly one of the two
    engine = Engine(settings.model, settings.batch, settings.runtime, name=settings.name,
                    cache=settings.cache, handler=handler, tracing=tracing)  # fmt: skip
    return ModelRepository([engine], drain_timeout_s=grace, shared=shared)


# HandlerConfig's defaults, so that HandlerLimits does not restate them.
_HANDLER = HandlerConfig("-")


@dataclass(frozen=True, slots=True)
class HandlerLimits:
    """How the handler a model's config.toml names is run: the server's --handler-executor,
    --handler-workers and --handler-max-pending (config.toml picks the handler and its
    options; these flags say how every handler runs), and its grace and size limits."""

    executor: ExecutorKind = _HANDLER.executor
    workers: int = _HANDLER.workers
    max_pending: int = _HANDLER.max_pending
    drain_timeout_s: float = _HANDLER.drain_timeout_s
    max_elements: int = _HANDLER.max_elements  # for tensors preprocess makes
    max_answer_bytes: int = _HANDLER.max_answer_bytes  # for postprocess answers

    def __post_init__(self) -> None:
        self.apply("-", ())  # validates

    @classmethod
    def of(cls, handler: HandlerConfig) -> HandlerLimits:
        return cls(
            handler.executor,
            handler.workers,
            handler.max_pending,
            handler.drain_timeout_s,
            handler.max_elements,
            handler.max_answer_bytes,
        )

    def apply(self, spec: str, options: tuple[tuple[str, str], ...]) -> HandlerConfig:
        return HandlerConfig(
            spec,
            options,
            self.executor,
            self.workers,
            self.max_pending,
            self.drain_timeout_s,
            max_elements=self.max_elements,
            max_answer_bytes=self.max_answer_bytes,
        )


def engine_factory(
    batch: BatchConfig,
    runtime: RuntimeConfig,
    cache: CacheConfig,
    handler: HandlerConfig | None = None,
    *,
    handler_limits: HandlerLimits | None = None,
    tracing: Tracing | None = None,
) -> EngineFactory:
    """Engines with the server's settings, overridden by each model's config.toml (a model's
    `handler` key replaces the server's `--handler`, and runs with `handler_limits`: by default
    those of `handler`)."""
    if handler_limits is None:
        handler_limits = HandlerLimits.of(handler) if handler is not None else HandlerLimits()
    limits = handler_limits

    def build(name: str, version: str, path: Path, config: ModelConfig) -> Engine:
        model_cache = replace(cache, cacheable=False) if config.cache is False else cache
        model_handler = handler
        if config.handler is not None:
            model_handler = limits.apply(config.handler, config.handler_options)
        return Engine(path, config.batch(batch), config.runtime(runtime), name=name,
                      version=version, cache=model_cache, handler=model_handler,
                      tracing=tracing)  # fmt: skip

    return build


def create_app(
    repository: ModelRepository,
    config: ServerConfig,
    grpc_requests: RequestStatistics | None = None,
    tracing: Tracing | None = None,
) -> web.Application:
    """The aiohttp application; its startup loads every model, its cleanup drains them.
    `grpc_requests`: the gRPC front end's counts, for /metrics beside HTTP's. `tracing`: the
    request spans' tracer (None: off), started and closed by its owner."""
    app = web.Application(client_max_size=config.max_body_bytes)
    app[REPOSITORY] = repository
    state = app[STATE] = ServerState(config)
    state.tracer = tracing
    counts = {"http": state.requests}
    if grpc_requests is not None:
        counts["grpc"] = grpc_requests
    collector = BatchserveCollector(
        repository,
        {protocol: requests.snapshot for protocol, requests in counts.items()},
        lambda: sum(requests.in_flight for requests in counts.values()),
        lambda: (state.lag.lag_s, state.lag_shed),
    )
    app[METRICS] = build_registry(collector)
    app.cleanup_ctx.append(_models)
    add_routes(app)
    return app


async def _models(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    async with app[REPOSITORY]:
        state.accepting = True
        state.lag.start()
        yield
        state.accepting = False
        state.lag.stop()
    app[STATE].access_log.flush()


class _OneLineProtocolErrors(logging.Filter):
    """Requests that are not valid HTTP (oversized request line or headers, garbage) are refused
    by aiohttp's parser with 400 and the connection closed; log them as one warning line, not
    as an error with a traceback, so hostile clients cannot flood the log."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HttpProcessingError | RequestPayloadError):
            # A body that cannot be decoded has had its 400 already; aiohttp then fails once
            # more reading the rest of it.
            what = "body" if isinstance(error, RequestPayloadError) else "request"
            text = str(getattr(error, "message", error)).strip() or type(error).__name__
            record.msg = f"refused a malformed HTTP {what}: %s"
            record.args = (text.splitlines()[0][:200],)
            record.exc_info = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def _wire_logger() -> logging.Logger:
    logger = logging.getLogger("batchserve.http.wire")
    if not any(isinstance(f, _OneLineProtocolErrors) for f in logger.filters):
        logger.addFilter(_OneLineProtocolErrors())
    return logger


class Server(Lifecycle):
    """A running server, HTTP and (unless `config.grpc_port` is None) gRPC on one event loop:
    `start()` returns once models are loaded and the ports listen.

    Shutdown order: readiness false and new infer requests refused (503, UNAVAILABLE) → at
    the same time, gRPC streams stop reading and gRPC calls in flight finish (up to the grace
    period) while new HTTP handshakes are refused and connections already queued accepted and
    answered → listening sockets closed → in-flight HTTP requests finished (up to the grace
    period) → queues drained → sessions closed → the last spans exported.

    `tracing` (None: off) is the server's: started first, closed last. The engines of
    `repository` are to hold the same one (`build_server` wires both).
    """

    def __init__(
        self, repository: ModelRepository, config: ServerConfig, *, tracing: Tracing | None = None
    ) -> None:
        self.config = config
        self.tracing = tracing
        grpc_requests = RequestStatistics() if config.grpc_port is not None else None
        self.app = create_app(repository, config, grpc_requests, tracing)
        self.grpc: GrpcServer | None = None
        if grpc_requests is not None:
            self.grpc = GrpcServer(repository, self.app[STATE], grpc_requests, config)
        handler_kwargs: dict[str, object] = {
            "access_log": None,
            "logger": _wire_logger(),
            "keepalive_timeout": config.keepalive_timeout_s,
        }
        # handler_cancellation: a client that disconnects cancels its handler, which withdraws
        # its request from the batching queue before any inference is spent on it.
        self._runner = web.AppRunner(
            self.app,
            handler_cancellation=True,
            shutdown_timeout=config.shutdown_grace_s,
            **handler_kwargs,  # type: ignore[arg-type]
        )
        limits = ConnectionLimits(
            header_timeout_s=config.header_timeout_s,
            keepalive_timeout_s=config.keepalive_timeout_s,
            max_connections=config.max_connections or default_max_connections(),
            max_active_requests=config.max_active_requests,
            # Under a deadline, answers after the gate are kept to a share of it (see
            # `ConnectionGuard._adapt`); without one nothing is screened or measured.
            answer_target_s=ANSWER_SHARE * (config.request_timeout_s or 0.0),
        )
        # Requests that waited in line for the cap meet the infer endpoint's admission first.
        screen = InferEndpoint(repository, self.app[STATE]).screen
        self.connections = ConnectionGuard(limits, handler_kwargs, screen)
        self.app[METRICS].register(ConnectionCollector(self.connections.statistics))
        self._sites: list[GuardedSite] = []
        self._port: int | None = None

    async def start(self) -> None:
        tracing = self.tracing
        # Before the engines: their batchers trace runs from the first request on.
        if tracing is not None:
            await tracing.start()
        try:
            await self._start()
        except BaseException:
            if tracing is not None:
                await tracing.aclose()
            raise

    async def _start(self) -> None:
        await self._runner.setup()
        config = self.config
        guard = self.connections
        # With --workers, every worker binds the same port (SO_REUSEPORT): the kernel spreads
        # new connections evenly across them, where one shared socket would let the busiest
        # worker accept most of them.
        sites = [
            GuardedSite(self._runner, guard, config.host, config.port, reuse_port=config.reuse_port)
        ]
        if config.extra_port is not None:
            sites.append(GuardedSite(self._runner, guard, config.host, config.extra_port))
        self._sites = sites
        try:
            # gRPC first: once HTTP's readiness answers, both protocols are served.
            if self.grpc is not None:
                await self.grpc.start()
            for site in sites:
                await site.start()
        except BaseException:
            if self.grpc is not None:
                await self.grpc.aclose()
            await self._runner.cleanup()
            raise
        self._port = int(self._runner.addresses[0][1])

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the server has not started")
        return self._port

    @property
    def grpc_port(self) -> int:
        """The port gRPC listens on (the one picked, for a configured 0)."""
        if self.grpc is None:
            raise RuntimeError("gRPC is off (grpc_port is None)")
        return self.grpc.port

    @property
    def url(self) -> str:
        host = self.config.host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}"

    async def aclose(self) -> None:
        self.app[STATE].accepting = False
        # Take in what the kernel already accepted before closing the listeners: closing a
        # socket with connections still queued resets them (see drain_listeners).
        listeners = [sock for site in self._sites for sock in site.listeners]
        try:
            # gRPC calls finish before the models close (the runner's cleanup closes them).
            async with asyncio.TaskGroup() as closing:
                if self.grpc is not None:
                    closing.create_task(self.grpc.aclose())
                grace = min(2.0, self.config.shutdown_grace_s)
                closing.create_task(drain_listeners(listeners, self.connections, grace))
        finally:
            try:
                await self._runner.cleanup()
            finally:
                # Last, so the spans of the requests that drained are exported too.
                if self.tracing is not None:
                    await self.tracing.aclose()


async def serve_until_signalled(
    server: Server, on_ready: Callable[[], None] | None = None, *, worker: bool = False
) -> None:
    """Run until SIGTERM or SIGINT, then drain and return; `on_ready` runs once listening.
    A worker of `--workers` leaves "listening on" to its supervisor, which says it once all
    workers are ready."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    orphan_watch = asyncio.create_task(_stop_when_orphaned(stop)) if worker else None
    try:
        async with server:
            if on_ready is not None:
                on_ready()
            log.info("worker ready on %s" if worker else "listening on %s", server.url)
            await stop.wait()
            log.info("signal received: draining")
            server.app[STATE].accepting = False
    finally:
        if orphan_watch is not None:
            orphan_watch.cancel()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    log.info("stopped")


async def _stop_when_orphaned(stop: asyncio.Event) -> None:
    """A worker whose supervisor is gone (killed outright) drains and exits instead of
    serving on, unsupervised, forever."""
    parent = os.getppid()
    while os.getppid() == parent:  # noqa: ASYNC110 (no event exists for a parent death)
        await asyncio.sleep(0.5)
    log.warning("the supervisor is gone: draining")
    stop.set()
