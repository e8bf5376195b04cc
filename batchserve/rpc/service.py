"""`inference.GRPCInferenceService`: KServe's gRPC inference protocol and the Triton extensions
that tritonclient uses, over the server's own repository, engines and front-door state.

The messages are the generated ones that `tritonclient[grpc]` publishes (`service_pb2`,
`model_config_pb2`): they are untyped, so they are `Any` here and nowhere else.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from google.protobuf.json_format import ParseDict
from tritonclient.grpc import service_pb2, service_pb2_grpc

from batchserve import __version__
from batchserve.engine import Engine
from batchserve.front import ServerState
from batchserve.front.stats import RequestStatistics
from batchserve.protocol import triton
from batchserve.repository import ModelRepository
from batchserve.rpc.convert import tensor_metadata
from batchserve.rpc.errors import Code, Refusal, abort, refusal
from batchserve.rpc.infer import InferCalls, call_metadata
from batchserve.rpc.stream import Stream

Service = TypeVar("Service", bound="InferenceService")
Method = Callable[[Service, Any, Any], Awaitable[Any]]


def guarded(method: Method[Service]) -> Method[Service]:
    """The API key first (when one is set), and any error ended as a gRPC status."""

    @functools.wraps(method)
    async def wrapper(self: Service, request: Any, context: Any) -> Any:
        try:
            self.authorize(context)
            return await method(self, request, context)
        except Exception as err:
            await abort(context, refusal(err, method.__name__))

    return wrapper


def public(method: Method[Service]) -> Method[Service]:
    """No API key (server liveness and readiness, as the HTTP health endpoints: probes carry
    no credentials); any error still ended as a gRPC status."""

    @functools.wraps(method)
    async def wrapper(self: Service, request: Any, context: Any) -> Any:
        try:
            return await method(self, request, context)
        except Exception as err:
            await abort(context, refusal(err, method.__name__))

    return wrapper


async def _unimplemented(self: InferenceService, request: Any, context: Any) -> None:
    await context.abort(Code.UNIMPLEMENTED, "not implemented by batchserve")


class InferenceService(service_pb2_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    """Every RPC but ServerLive and ServerReady needs the API key when one is set (as HTTP's
    health endpoints, and the standard health service, they stay public)."""

    def __init__(
        self, repository: ModelRepository, state: ServerState, requests: RequestStatistics
    ) -> None:
        self._repository = repository
        self._state = state
        self._calls = InferCalls(repository, state, requests)
        self._streams: set[Stream] = set()
        self._draining = False

    def authorize(self, context: Any) -> None:
        if self._state.api_key is not None:
            self._state.check_credentials(call_metadata(context).get("authorization", ""))

    def drain(self) -> None:
        """Open streams stop reading and end once answered; new ones are refused."""
        self._draining = True
        for stream in self._streams:
            stream.close()

    # -- inference ---------------------------------------------------------------------------

    async def ModelInfer(self, request: Any, context: Any) -> Any:
        response, refused = await self._calls.serve(request, call_metadata(context), context)
        if refused is not None:
            await abort(context, refused)
        return response

    async def ModelStreamInfer(self, requests: AsyncIterator[Any], context: Any) -> None:
        metadata = call_metadata(context)
        try:
            self.authorize(context)
        except Exception as err:
            await abort(context, refusal(err, "ModelStreamInfer"))
        if self._draining:
            await abort(context, Refusal(503, "the server is shutting down"))
        stream = Stream(self._calls, context, metadata)
        self._streams.add(stream)
        try:
            await stream.run(requests)
        finally:
            self._streams.discard(stream)

    # -- health and metadata -----------------------------------------------------------------

    @public
    async def ServerLive(self, request: Any, context: Any) -> Any:
        # Answering at all shows the event loop turns; a wedged session pool needs a restart.
        live = all(engine.problem() is None for engine in self._repository)
        return service_pb2.ServerLiveResponse(live=live)

    @public
    async def ServerReady(self, request: Any, context: Any) -> Any:
        return service_pb2.ServerReadyResponse(ready=self.ready())

    def ready(self) -> bool:
        """As HTTP's readiness: accepting calls, and every model version loaded."""
        return self._state.accepting and self._repository.ready

    @guarded
    async def ModelReady(self, request: Any, context: Any) -> Any:
        engine = self._engine(request.name, request.version)
        return service_pb2.ModelReadyResponse(ready=engine.ready and self._state.accepting)

    @guarded
    async def ServerMetadata(self, request: Any, context: Any) -> Any:
        return service_pb2.ServerMetadataResponse(
            name="batchserve", version=__version__, extensions=triton.EXTENSIONS
        )

    @guarded
    async def ModelMetadata(self, request: Any, context: Any) -> Any:
        engine = self._engine(request.name, request.version)
        metadata = engine.metadata
        versions = [request.version] if request.version else self._versions(engine)
        return service_pb2.ModelMetadataResponse(
            name=engine.name,
            versions=versions,
            platform=triton.PLATFORM,
            inputs=tensor_metadata(metadata.inputs),
            outputs=tensor_metadata(metadata.outputs),
        )

    @guarded
    async def ModelConfig(self, request: Any, context: Any) -> Any:
        engine = self._engine(request.name, request.version)
        versions = [request.version] if request.version else self._versions(engine)
        config = triton.model_config(engine, versions=versions)
        return ParseDict({"config": config}, service_pb2.ModelConfigResponse())

    @guarded
    async def ModelStatistics(self, request: Any, context: Any) -> Any:
        if not request.name:  # Triton: every model
            engines: list[Engine] = list(self._repository)
        elif request.version:
            engines = [self._engine(request.name, request.version)]
        else:
            versions = self._repository.versions(request.name)
            engines = [self._engine(request.name, version) for version in versions]
        answer = triton.model_statistics(engines)
        return ParseDict(answer, service_pb2.ModelStatisticsResponse(), ignore_unknown_fields=True)

    def _engine(self, name: str, version: str) -> Engine:
        return self._repository.get(name, version or None)

    def _versions(self, engine: Engine) -> list[str]:
        return self._repository.versions(engine.name)

    # -- repository --------------------------------------------------------------------------

    @guarded
    async def RepositoryIndex(self, request: Any, context: Any) -> Any:
        rows = self._repository.index()
        if request.ready:
            rows = [row for row in rows if row["state"] == "READY"]
        entry = service_pb2.RepositoryIndexResponse.ModelIndex
        return service_pb2.RepositoryIndexResponse(models=[entry(**row) for row in rows])

    @guarded
    async def RepositoryModelLoad(self, request: Any, context: Any) -> Any:
        # Triton's optional parameters (a config to load with, files) are accepted, unused.
        await self._repository.load(request.model_name)
        return service_pb2.RepositoryModelLoadResponse()

    @guarded
    async def RepositoryModelUnload(self, request: Any, context: Any) -> Any:
        await self._repository.unload(request.model_name)
        return service_pb2.RepositoryModelUnloadResponse()

    # -- Triton extensions this server does not have -------------------------------------------

    SystemSharedMemoryStatus = SystemSharedMemoryRegister = _unimplemented
    SystemSharedMemoryUnregister = CudaSharedMemoryStatus = _unimplemented
    CudaSharedMemoryRegister = CudaSharedMemoryUnregister = _unimplemented
    TraceSetting = LogSettings = _unimplemented
