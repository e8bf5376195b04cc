"""The batching queue: a pure dispatch policy and the async batcher that carries it out."""

from batchserve.queue.batcher import Batcher, BatcherStatistics, Pending
from batchserve.queue.policy import BatchPolicy, Decision, QueueState

__all__ = ["BatchPolicy", "Batcher", "BatcherStatistics", "Decision", "Pending", "QueueState"]
