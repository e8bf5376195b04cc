"""batchserve: a high-throughput ONNX model server speaking the Open Inference Protocol."""

from batchserve.config import BatchConfig, CacheConfig, Device, RuntimeConfig, ServerConfig
from batchserve.engine import Engine, EngineStatistics
from batchserve.errors import (
    BatchserveError,
    DeadlineExceeded,
    DeviceUnavailable,
    InferenceFailed,
    InvalidInput,
    ModelLoadError,
    ModelNotFound,
    NotReady,
    Overloaded,
    PayloadTooLarge,
    UnsupportedInput,
)

__version__ = "0.1.0"

__all__ = [
    "BatchConfig",
    "BatchserveError",
    "CacheConfig",
    "DeadlineExceeded",
    "Device",
    "DeviceUnavailable",
    "Engine",
    "EngineStatistics",
    "InferenceFailed",
    "InvalidInput",
    "ModelLoadError",
    "ModelNotFound",
    "NotReady",
    "Overloaded",
    "PayloadTooLarge",
    "RuntimeConfig",
    "ServerConfig",
    "UnsupportedInput",
    "__version__",
]
