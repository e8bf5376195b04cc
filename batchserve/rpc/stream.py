"""ModelStreamInfer: one bidirectional stream, many inference requests, one answer each.

Each request read is served in a task of its own, so answers leave as soon as they are ready,
in any order, each with its request's id; a request that fails is answered with its
`error_message` and the stream goes on. A client that goes away cancels the stream, which
cancels every task in it: their queued rows are withdrawn before any inference is spent.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from tritonclient.grpc import service_pb2

from batchserve.rpc.infer import InferCalls, Metadata

log = logging.getLogger("batchserve.rpc")


class Stream:
    """One ModelStreamInfer call. `close()` (the server drains) stops reading new requests;
    the stream then ends, with OK, once the requests it read are answered."""

    __slots__ = ("_calls", "_closing", "_context", "_metadata", "_writing")

    def __init__(self, calls: InferCalls, context: Any, metadata: Metadata) -> None:
        self._calls = calls
        self._context = context
        self._metadata = metadata
        self._closing = asyncio.Event()
        self._writing = asyncio.Lock()  # one message at a time on the wire

    def close(self) -> None:
        self._closing.set()

    async def run(self, requests: AsyncIterator[Any]) -> None:
        """Read and answer until the client half-closes or `close()`; returns once every
        request read is answered (the task group waits for them)."""
        async with asyncio.TaskGroup() as answers:
            reading = answers.create_task(self._read(requests, answers))
            closing = answers.create_task(self._closing.wait())
            await asyncio.wait((reading, closing), return_when=asyncio.FIRST_COMPLETED)
            reading.cancel()
            closing.cancel()

    async def _read(self, requests: AsyncIterator[Any], answers: asyncio.TaskGroup) -> None:
        async for request in requests:
            answers.create_task(self._answer(request))

    async def _answer(self, request: Any) -> None:
        response, refused = await self._calls.serve(request, self._metadata, self._context)
        if refused is None:
            message = service_pb2.ModelStreamInferResponse(infer_response=response)
        else:
            # The request's id travels with its error, so a client can tell which one failed.
            which = service_pb2.ModelInferResponse(
                model_name=request.model_name, model_version=request.model_version, id=request.id
            )
            message = service_pb2.ModelStreamInferResponse(
                error_message=refused.message, infer_response=which
            )
        try:
            async with self._writing:
                await self._context.write(message)
        except Exception as err:  # the call is over (the client went away): nobody to tell
            log.debug("stream answer not sent: %r", err)
            self._closing.set()
