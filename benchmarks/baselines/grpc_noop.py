"""gRPC ceiling: a ModelInfer server without a model, on grpc.aio or on grpclib.

Every `inference.GRPCInferenceService/ModelInfer` call's request is parsed (the protobuf decode
stays in the measurement) and answered with one constant ModelInferResponse shaped like a real
answer from the benchmark mlp (`probabilities`, FP32, [1, 10], raw contents). No inference, no
batching: whatever a real gRPC server on that implementation reaches is bounded by this. On
grpc.aio, ModelStreamInfer answers each message of a stream the same way (with its id), and
ModelMetadata describes the mlp, so `batchserve bench --protocol grpc [--streaming]` can drive
it as it drives batchserve.

Usage::

    python benchmarks/baselines/grpc_noop.py --impl aio --port 8001
    python benchmarks/baselines/grpc_noop.py --impl grpclib --port 8001
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from typing import Any

import grpc
import uvloop
from tritonclient.grpc import service_pb2 as pb

SERVICE = "inference.GRPCInferenceService"
RESPONSE = pb.ModelInferResponse(model_name="mlp", model_version="1")
RESPONSE.outputs.add(name="probabilities", datatype="FP32", shape=[1, 10])
RESPONSE.raw_output_contents.append(bytes(40))
METADATA = pb.ModelMetadataResponse(name="mlp", versions=["1"], platform="constant")
METADATA.inputs.add(name="input", datatype="FP32", shape=[-1, 64])
METADATA.outputs.add(name="probabilities", datatype="FP32", shape=[-1, 10])


def _answer(request_id: str) -> Any:
    if not request_id:
        return RESPONSE
    answer = pb.ModelInferResponse()
    answer.CopyFrom(RESPONSE)
    answer.id = request_id
    return answer


async def serve_aio(host: str, port: int, stop: asyncio.Event) -> None:
    async def infer(request: Any, context: Any) -> Any:
        del request, context  # parsed by the deserializer: that is the work measured
        return RESPONSE

    async def stream(requests: Any, context: Any) -> Any:
        del context
        async for request in requests:
            yield pb.ModelStreamInferResponse(infer_response=_answer(request.id))

    async def metadata(request: Any, context: Any) -> Any:
        del request, context
        return METADATA

    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "ModelInfer": grpc.unary_unary_rpc_method_handler(
                infer,
                request_deserializer=pb.ModelInferRequest.FromString,
                response_serializer=pb.ModelInferResponse.SerializeToString,
            ),
            "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(
                stream,
                request_deserializer=pb.ModelInferRequest.FromString,
                response_serializer=pb.ModelStreamInferResponse.SerializeToString,
            ),
            "ModelMetadata": grpc.unary_unary_rpc_method_handler(
                metadata,
                request_deserializer=pb.ModelMetadataRequest.FromString,
                response_serializer=pb.ModelMetadataResponse.SerializeToString,
            ),
        },
    )
    server = grpc.aio.server(handlers=[handler])
    server.add_insecure_port(f"{host}:{port}")
    await server.start()
    await stop.wait()
    await server.stop(grace=1)


async def serve_grpclib(host: str, port: int, stop: asyncio.Event) -> None:
    from grpclib.const import Cardinality, Handler
    from grpclib.server import Server, Stream

    class Inference:
        async def infer(self, stream: Stream[Any, Any]) -> None:
            await stream.recv_message()
            await stream.send_message(RESPONSE)

        def __mapping__(self) -> dict[str, Handler]:
            return {
                f"/{SERVICE}/ModelInfer": Handler(
                    self.infer, Cardinality.UNARY_UNARY, pb.ModelInferRequest,
                    pb.ModelInferResponse,
                )
            }  # fmt: skip

    server = Server([Inference()])
    await server.start(host, port)
    await stop.wait()
    server.close()
    await server.wait_closed()


async def main(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    serve = serve_aio if args.impl == "aio" else serve_grpclib
    await serve(args.host, args.port, stop)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impl", choices=("aio", "grpclib"), default="aio")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(main(parser.parse_args()))
