"""batchserve: a high-throughput ONNX model server speaking the Open Inference Protocol.

The engine is imported on first use (`from batchserve import Engine`), not with the package:
the CLI's other commands (`cost`, `bench`) and `__version__` must not pay for loading ONNX
Runtime and redis.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from batchserve.config import BatchConfig, CacheConfig, Device, RuntimeConfig, ServerConfig
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
from batchserve.version import __version__

if TYPE_CHECKING:
    from batchserve.engine import Engine, EngineStatistics

# Exported names whose modules load heavy dependencies: imported when first looked up.
_LAZY = {"Engine": "batchserve.engine", "EngineStatistics": "batchserve.engine"}

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


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # found directly from now on
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
