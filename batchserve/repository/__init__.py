"""The set of served models and their versions."""

from batchserve.repository._old import ModelRepository

__all__ = ["ModelRepository"]
