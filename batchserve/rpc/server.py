"""The gRPC server: `inference.GRPCInferenceService` and `grpc.health.v1.Health` on grpc.aio,
on the event loop the HTTP server runs on, sharing its repository and front-door state."""

from __future__ import annotations

import errno
import logging
import os
import socket
from collections.abc import Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from tritonclient.grpc import service_pb2_grpc

from batchserve.config import ServerConfig
from batchserve.front import ServerState
from batchserve.front.stats import RequestStatistics
from batchserve.lifecycle import Lifecycle
from batchserve.repository import ModelRepository
from batchserve.rpc.errors import Code
from batchserve.rpc.service import InferenceService

log = logging.getLogger("batchserve.rpc")

SERVICE = "inference.GRPCInferenceService"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
_RESPONSE_HEADROOM = 64 * 1024  # a response's own fields, beyond its outputs' bytes


class Health(health_aio.HealthServicer):  # type: ignore[misc]
    """`grpc.health.v1.Health` for the whole server ("") and the inference service: SERVING
    exactly when HTTP's readiness answers 200, at the moment of each Check (Kubernetes' gRPC
    probe). Watch follows the server's lifecycle: serving once started, not when draining."""

    def __init__(self, ready: Callable[[], bool]) -> None:
        super().__init__()
        self._ready = ready

    async def Check(self, request: Any, context: Any) -> Any:
        if request.service not in ("", SERVICE):
            await context.abort(Code.NOT_FOUND, f"unknown service {request.service!r}")
        status = SERVING if self._ready() else NOT_SERVING
        return health_pb2.HealthCheckResponse(status=status)


class GrpcServer(Lifecycle):
    """Listens on `config.grpc_port` (0: a free port, then `port`) once started; `aclose`
    drains: new calls refused, open streams end after their last answer, calls in flight
    finish within the shutdown grace, then the server stops."""

    def __init__(
        self,
        repository: ModelRepository,
        state: ServerState,
        requests: RequestStatistics,
        config: ServerConfig,
    ) -> None:
        if config.grpc_port is None:
            raise ValueError("gRPC is off in this configuration (grpc_port is None)")
        self.config = config
        self._bind_port: int = config.grpc_port
        self.service = InferenceService(repository, state, requests)
        self.health = Health(self.service.ready)
        self._server: Any = None
        self._port: int | None = None

    async def start(self) -> None:
        config = self.config
        server = grpc.aio.server(options=_options(config))
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(self.service, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        host = f"[{config.host}]" if ":" in config.host else config.host
        address = f"{host}:{self._bind_port}"
        try:
            port = server.add_insecure_port(address)
        except RuntimeError:
            port = 0  # grpcio raises where older releases returned 0
        if not port:
            raise _bind_error(config.host, self._bind_port)
        await server.start()
        for service in ("", SERVICE):
            await self.health.set(service, SERVING)
        self._server, self._port = server, port
        log.info("gRPC listening on %s:%d", host, port)

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the gRPC server has not started")
        return self._port

    async def aclose(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        await self.health.enter_graceful_shutdown()
        self.service.drain()
        # New calls are refused at once; those in flight have the grace to finish.
        await server.stop(self.config.shutdown_grace_s)


def _bind_error(host: str, port: int) -> OSError:
    """Why gRPC could not bind (grpcio does not say): the error binding it here gives, as an
    HTTP port's failure reads, so that the command line reports it in one line."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as probe:
        try:
            probe.bind((host, port))
        except OSError as err:
            err.strerror = f"{err.strerror} (gRPC, {host}:{port})"
            return err
    return OSError(errno.EADDRINUSE, f"{os.strerror(errno.EADDRINUSE)} (gRPC, {host}:{port})")


def _options(config: ServerConfig) -> list[tuple[str, int]]:
    return [
        # A message is refused (RESOURCE_EXHAUSTED) past the size an HTTP body may have.
        ("grpc.max_receive_message_length", config.max_body_bytes),
        ("grpc.max_send_message_length", config.max_response_bytes + _RESPONSE_HEADROOM),
        # grpc shares ports by default (SO_REUSEPORT): a second server would bind a taken port
        # and get half of its calls. Only the workers of --workers share theirs.
        ("grpc.so_reuseport", 1 if config.reuse_port else 0),
    ]
