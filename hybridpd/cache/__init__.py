"""hybridpd.cache: the page pool (geometry, block ids, tensors). No model, no requests."""

from hybridpd.cache.geometry import CacheGeometry
from hybridpd.cache.pool import NULL_BLOCK, BlockPool, OutOfBlocksError

__all__ = ["NULL_BLOCK", "BlockPool", "CacheGeometry", "OutOfBlocksError"]
