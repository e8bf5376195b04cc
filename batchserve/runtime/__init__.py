"""ONNX Runtime adapter and the session pool that runs batches off the event loop."""

from batchserve.runtime.metadata import ModelMetadata, TensorSpec
from batchserve.runtime.pool import SessionPool
from batchserve.runtime.providers import provider_chain
from batchserve.runtime.session import load_sessions

__all__ = ["ModelMetadata", "SessionPool", "TensorSpec", "load_sessions", "provider_chain"]
