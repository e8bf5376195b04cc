"""Response caching: keys that cannot mix models, versions, outputs or inputs; a local LRU,
then Redis, then one shared computation per key."""

from batchserve.cache.codec import Outputs
from batchserve.cache.key import cache_key
from batchserve.cache.lru import ByteLRU
from batchserve.cache.redis_tier import RedisTier
from batchserve.cache.tiered import CacheStatistics, ResponseCache

__all__ = ["ByteLRU", "CacheStatistics", "Outputs", "RedisTier", "ResponseCache", "cache_key"]
