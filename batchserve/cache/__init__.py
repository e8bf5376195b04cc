"""Response caching: keys that cannot mix models, versions, outputs or inputs."""

from batchserve.cache.key import cache_key

__all__ = ["cache_key"]
