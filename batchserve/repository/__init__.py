"""The set of served models and their versions: a fixed list of engines, or a model repository
directory with versions, per-model config, hot reload, traffic splitting and the load/unload API.
"""

from batchserve.repository.config import ModelConfig, TrafficSplit, VersionPolicy
from batchserve.repository.repository import (
    EngineFactory,
    HandlerLimits,
    ModelRepository,
    RepositoryConflict,
    engine_factory,
)

__all__ = [
    "EngineFactory",
    "HandlerLimits",
    "ModelConfig",
    "ModelRepository",
    "RepositoryConflict",
    "TrafficSplit",
    "VersionPolicy",
    "engine_factory",
]
