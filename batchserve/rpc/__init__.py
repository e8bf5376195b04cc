"""The Open Inference Protocol over gRPC (`inference.GRPCInferenceService`, with Triton's
extensions) and the standard health service, beside the HTTP front end."""

from batchserve.rpc.server import GrpcServer

__all__ = ["GrpcServer"]
