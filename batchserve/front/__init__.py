"""The protocol-independent front door that the HTTP and gRPC front ends share."""

from batchserve.front.state import ServerState

__all__ = ["ServerState"]
