"""The no-op server's gRPC service: constant answers to ModelMetadata, ModelInfer and
ModelStreamInfer, each request still parsed (as any server must)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio
from tritonclient.grpc import service_pb2

SERVICE = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name


def _tensor(name: str) -> Any:
    return service_pb2.ModelMetadataResponse.TensorMetadata(
        name=name, datatype="FP32", shape=[-1, 64 if name == "input" else 1]
    )


METADATA: bytes = service_pb2.ModelMetadataResponse(
    name="noop",
    versions=["1"],
    platform="noop",
    inputs=[_tensor("input")],
    outputs=[_tensor("output")],
).SerializeToString()
_ANSWER = service_pb2.ModelInferResponse(model_name="noop")
_ANSWER.outputs.add(name="output", datatype="FP32", shape=[1, 1])
_ANSWER.raw_output_contents.append(b"\0\0\0\0")
ANSWER: bytes = _ANSWER.SerializeToString()
_STREAM_ANSWER = service_pb2.ModelStreamInferResponse(infer_response=_ANSWER)
STREAM_ANSWER: bytes = _STREAM_ANSWER.SerializeToString()


async def _metadata(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    return METADATA


async def _infer(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    return ANSWER


async def _stream_infer(
    requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
) -> AsyncIterator[bytes]:
    async for _ in requests:
        yield STREAM_ANSWER


def service() -> grpc.GenericRpcHandler:
    """The handler to add to a grpc.aio server: requests parsed, answers pre-serialized."""
    parse = service_pb2.ModelInferRequest.FromString
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "ModelMetadata": grpc.unary_unary_rpc_method_handler(
                _metadata, request_deserializer=service_pb2.ModelMetadataRequest.FromString
            ),
            "ModelInfer": grpc.unary_unary_rpc_method_handler(_infer, request_deserializer=parse),
            "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(
                _stream_infer, request_deserializer=parse
            ),
        },
    )
