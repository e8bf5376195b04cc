"""The load generator's gRPC side: `inference.GRPCInferenceService` over `grpc.aio`.

The service is the one `tritonclient[grpc]` publishes generated stubs for (the same stubs the
server answers with). The metadata and statistics calls go through the generated stub; the
calls under load go through the channel's own multicallables for the same methods, sending
request bytes serialized once when the workload was built (as the HTTP side writes pre-encoded
requests) and, for unary calls, leaving the answer unparsed: only its status is counted.
tritonclient's client classes are not used, as they build and parse messages on every call.

A channel is one HTTP/2 connection, so a load process holds one: its calls multiplex on it.
Unary calls carry the request's timeout as their gRPC deadline. A stream carries one request
at a time, like an HTTP/1.1 keep-alive connection; a periodic sweep gives up on an answer past
its deadline and drops that stream, since the answer may still come on it.
"""

from __future__ import annotations

import asyncio
import re
import time
from abc import abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit

import grpc
import grpc.aio
from google.protobuf.message import DecodeError
from tritonclient.grpc import service_pb2, service_pb2_grpc

from batchserve.bench.errors import BenchError
from batchserve.bench.transport import Disconnected, Slots
from batchserve.lifecycle import Lifecycle

DEFAULT_PORT: Final = 8001  # Triton's, and `batchserve serve`'s
SCHEMES: Final = {"grpc": False, "grpcs": True}  # scheme → TLS
OK: Final[str] = grpc.StatusCode.OK.name
# A request given up on at its deadline, by the server or by this side: counted as timed out.
TIMED_OUT: Final[str] = grpc.StatusCode.DEADLINE_EXCEEDED.name
# An error answered inside a stream: the protocol carries only its message, not a code.
STREAM_ERROR: Final = "STREAM_ERROR"

_SERVICE = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
MODEL_INFER: Final = f"/{_SERVICE.full_name}/ModelInfer"
MODEL_STREAM_INFER: Final = f"/{_SERVICE.full_name}/ModelStreamInfer"

# The server enforces its own message limit (--max-body-mb); the client takes any answer.
_OPTIONS: Final = (
    ("grpc.max_receive_message_length", -1),
    ("grpc.max_send_message_length", -1),
)
_METADATA_KEY = re.compile(r"[0-9a-z_.-]+")
# Set by gRPC itself; a --header for them would break the call.
_RESERVED = frozenset({"content-type", "te", "user-agent", "host", "connection"})
Metadata = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class GrpcTarget:
    """Where the gRPC server listens: `address` is HOST:PORT, `tls` whether it needs TLS."""

    address: str
    tls: bool = False

    @property
    def url(self) -> str:
        return f"{'grpcs' if self.tls else 'grpc'}://{self.address}"

    def channel(self) -> grpc.aio.Channel:
        """An asyncio channel; made inside the running loop, which it belongs to."""
        if self.tls:
            return grpc.aio.secure_channel(
                self.address, grpc.ssl_channel_credentials(), options=_OPTIONS
            )
        return grpc.aio.insecure_channel(self.address, options=_OPTIONS)

    def blocking_channel(self) -> grpc.Channel:
        if self.tls:
            return grpc.secure_channel(
                self.address, grpc.ssl_channel_credentials(), options=_OPTIONS
            )
        return grpc.insecure_channel(self.address, options=_OPTIONS)


def parse_target(url: str) -> GrpcTarget:
    """grpc://HOST[:PORT], grpcs://HOST[:PORT] (TLS) or HOST:PORT; the port defaults to 8001."""
    text = url if "://" in url else f"grpc://{url}"
    parts = urlsplit(text)
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError:
        port = 0
    if parts.scheme not in SCHEMES or not parts.hostname or not port or parts.path.strip("/"):
        raise BenchError(
            f"a gRPC server is grpc://HOST:PORT, grpcs://HOST:PORT or HOST:PORT, got {url!r}"
        )
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return GrpcTarget(f"{host}:{port}", SCHEMES[parts.scheme])


def call_metadata(headers: Mapping[str, str]) -> Metadata:
    """--header and --api-key as gRPC metadata: lower-case keys, text values."""
    pairs = []
    for name, value in headers.items():
        key = name.lower()
        if not _METADATA_KEY.fullmatch(key) or key.endswith("-bin"):
            raise BenchError(f"{name!r} cannot be a gRPC metadata key (text keys: 0-9 a-z _ . -)")
        if key in _RESERVED or key.startswith("grpc-"):
            raise BenchError(f"--header cannot set {name}: gRPC sets it")
        pairs.append((key, value))
    return tuple(pairs)


def _name(err: grpc.aio.AioRpcError) -> str:
    name: str = err.code().name
    return name


def _describe(err: grpc.RpcError) -> str:
    # Every call's error is also a grpc.Call, with a code and details.
    return f"{err.code().name}: {err.details()}"


def model_metadata(
    target: GrpcTarget,
    model: str,
    version: str | None = None,
    metadata: Metadata = (),
    timeout_s: float = 10.0,
) -> dict[str, Any]:
    """The ModelMetadata RPC's answer, in the shape of HTTP's metadata JSON."""
    request = service_pb2.ModelMetadataRequest(name=model, version=version or "")
    with target.blocking_channel() as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        try:
            answer = stub.ModelMetadata(request, timeout=timeout_s, metadata=metadata)
        except grpc.RpcError as err:
            raise BenchError(f"ModelMetadata on {target.url} failed: {_describe(err)}") from None

    def tensors(specs: Any) -> list[dict[str, Any]]:
        return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in specs]

    return {
        "name": answer.name,
        "versions": list(answer.versions),
        "platform": answer.platform,
        "inputs": tensors(answer.inputs),
        "outputs": tensors(answer.outputs),
    }


def server_counts(
    target: GrpcTarget, model: str, metadata: Metadata = (), timeout_s: float = 5.0
) -> tuple[int, int] | None:
    """(rows, runs) from the ModelStatistics RPC, when the server has it."""
    request = service_pb2.ModelStatisticsRequest(name=model)
    with target.blocking_channel() as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        try:
            answer = stub.ModelStatistics(request, timeout=timeout_s, metadata=metadata)
        except grpc.RpcError:
            return None
    if not answer.model_stats:
        return None
    rows = sum(entry.inference_count for entry in answer.model_stats)
    runs = sum(entry.execution_count for entry in answer.model_stats)
    return int(rows), int(runs)


class _GrpcClient(Lifecycle):
    """What both gRPC clients share: the channel, the slots that bound the calls in flight
    (--concurrency or --max-outstanding, as for HTTP), and the periodic deadline sweep."""

    ok_status: Final = OK
    timeout_status: Final = TIMED_OUT

    def __init__(
        self, target: GrpcTarget, metadata: Metadata, limit: int, timeout_s: float
    ) -> None:
        self._target = target
        self._metadata = metadata or None
        self._timeout_s = timeout_s
        self._slots = Slots(limit)
        self._channel: grpc.aio.Channel | None = None
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._channel = self._target.channel()
        self._sweeper = asyncio.create_task(self._sweep())

    async def aclose(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._channel is not None:
            await self._channel.close()  # cancels every call still out

    @property
    def saturated(self) -> bool:
        return self._slots.saturated

    @property
    def sweep_interval(self) -> float:
        """How late past its deadline a request may be timed out."""
        return min(0.5, self._timeout_s / 4)

    async def post(self, raw: bytes, deadline: float | None = None) -> str:
        """Send one serialized ModelInferRequest; the answer's status code name ("OK").
        RequestTimeout when no slot came free by `deadline` (perf_counter seconds)."""
        if deadline is None:
            deadline = time.perf_counter() + self._timeout_s
        await self._slots.acquire(deadline)
        try:
            return await self._send(raw, deadline)
        finally:
            self._slots.release()

    @abstractmethod
    async def _send(self, raw: bytes, deadline: float) -> str: ...

    async def _sweep(self) -> None:
        # One periodic check, as the HTTP pool does, rather than a timer per request.
        while True:
            await asyncio.sleep(self.sweep_interval)
            self._expire(time.perf_counter())

    def _expire(self, now: float) -> None:
        self._slots.expire(now)


class UnaryClient(_GrpcClient):
    """One ModelInfer call per request, each with the request's deadline."""

    async def start(self) -> None:
        await super().start()
        assert self._channel is not None
        # No serializer either way: the request is already bytes, the answer stays bytes.
        self._infer = self._channel.unary_unary(MODEL_INFER)

    async def _send(self, raw: bytes, deadline: float) -> str:
        left = deadline - time.perf_counter()
        if left <= 0:
            return TIMED_OUT
        try:
            await self._infer(raw, timeout=left, metadata=self._metadata)
        except grpc.aio.AioRpcError as err:
            return _name(err)
        return OK


class _Stream:
    """One ModelStreamInfer call with one request on it at a time."""

    __slots__ = ("_call", "_reader", "_waiter", "closed", "deadline")

    def __init__(self, call: Any) -> None:
        self._call = call
        self._waiter: asyncio.Future[str] | None = None
        self.deadline = 0.0  # of the request on the stream; 0 when idle
        self.closed = False
        self._reader = asyncio.create_task(self._read())

    @property
    def reader(self) -> asyncio.Task[None]:
        """The task reading the stream's answers; it ends with the stream."""
        return self._reader

    async def send(self, raw: bytes, deadline: float) -> str:
        waiter: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._waiter = waiter
        self.deadline = deadline
        try:
            await self._call.write(raw)
        except grpc.aio.AioRpcError as err:  # the stream ended before this request went out
            self._answer(_name(err))
        except asyncio.InvalidStateError:
            self._fail(Disconnected("the stream had ended"))
        return await waiter

    async def _read(self) -> None:
        try:
            while (message := await self._call.read()) is not grpc.aio.EOF:
                response = service_pb2.ModelStreamInferResponse.FromString(message)
                self._answer(stream_status(response.error_message))
        except grpc.aio.AioRpcError as err:
            self._answer(_name(err))
        except DecodeError:
            self._fail(Disconnected("the server answered a malformed message"))
            self.abort()
        finally:
            self.closed = True
            self._fail(Disconnected("the server ended the stream"))

    def _answer(self, status: str) -> None:
        waiter, self._waiter = self._waiter, None
        self.deadline = 0.0
        if waiter is not None and not waiter.done():
            waiter.set_result(status)

    def _fail(self, error: Exception) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)

    def time_out(self) -> None:
        # The late answer may still come on this stream: it is dropped, not reused.
        self._answer(TIMED_OUT)
        self.abort()

    def abort(self) -> None:
        self.closed = True
        self._call.cancel()
        self._reader.cancel()


def stream_status(error_message: str) -> str:
    """The status of one answer in a stream: OK, or the code a message starts with
    ("NOT_FOUND: ..."), else STREAM_ERROR."""
    if not error_message:
        return OK
    head: str = error_message.partition(":")[0].strip()
    if head in grpc.StatusCode.__members__ and head != OK:
        return head
    return STREAM_ERROR


class StreamClient(_GrpcClient):
    """Requests on ModelStreamInfer streams, one at a time on each, an idle stream reused last
    in, first out; at most `limit` streams, so as many requests in flight as HTTP would have."""

    def __init__(
        self, target: GrpcTarget, metadata: Metadata, limit: int, timeout_s: float
    ) -> None:
        super().__init__(target, metadata, limit, timeout_s)
        self._idle: list[_Stream] = []
        self._all: set[_Stream] = set()
        self._readers: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        await super().start()
        assert self._channel is not None
        self._open = self._channel.stream_stream(MODEL_STREAM_INFER)

    async def aclose(self) -> None:
        for stream in self._all:
            stream.abort()
        await asyncio.gather(*self._readers, return_exceptions=True)
        await super().aclose()

    async def _send(self, raw: bytes, deadline: float) -> str:
        stream = self._take()
        try:
            status = await stream.send(raw, deadline)
        except BaseException:
            stream.abort()
            self._all.discard(stream)
            raise
        if stream.closed:
            self._all.discard(stream)
        else:
            self._idle.append(stream)
        return status

    def _take(self) -> _Stream:
        while self._idle:
            stream = self._idle.pop()
            if not stream.closed:
                return stream
            self._all.discard(stream)
        # No deadline on the stream itself: it outlives many requests, each with its own.
        stream = _Stream(self._open(metadata=self._metadata))
        self._all.add(stream)
        self._readers.add(stream.reader)
        stream.reader.add_done_callback(self._readers.discard)
        return stream

    def _expire(self, now: float) -> None:
        super()._expire(now)
        for stream in list(self._all):
            if stream.deadline and stream.deadline < now:
                stream.time_out()
