"""ONNX Runtime adapter and the session pool that runs batches off the event loop."""

from batchserve.runtime.binding import capture_rows
from batchserve.runtime.metadata import ModelMetadata, TensorSpec
from batchserve.runtime.pool import HealthPolicy, PoolStatistics, SessionPool
from batchserve.runtime.session import SessionBuilder, sample_inputs

__all__ = [
    "HealthPolicy",
    "ModelMetadata",
    "PoolStatistics",
    "SessionBuilder",
    "SessionPool",
    "TensorSpec",
    "capture_rows",
    "sample_inputs",
]
