"""The set of served models and their versions: a fixed list of engines, or a model repository
directory with versions, per-model config, hot reload, traffic splitting and the load/unload API.
"""

from batchserve.repository.config import ModelConfig, TrafficSplit, VersionPolicy
from batchserve.repository.repository import (
    EngineFactory,
    ModelRepository,
    RepositoryConflict,
)

__all__ = [
    "EngineFactory",
    "ModelConfig",
    "ModelRepository",
    "RepositoryConflict",
    "TrafficSplit",
    "VersionPolicy",
]
