"""Block id allocator of the page pool (ids only, no tensors).

Owns `BlockPool`: which block ids are free. Block 0 is the null block and is never handed out.
Allocation hands out the lowest free ids first, so a fresh pool gives consecutive ids (fewer,
larger transfer descriptors). Freeing is exact: a double free or a foreign id raises and changes
nothing. Knows nothing of tensors, layers, requests or byte layouts.
"""

from __future__ import annotations

import heapq
import numbers
from collections.abc import Iterable

NULL_BLOCK = 0


class OutOfBlocksError(RuntimeError):
    """Raised by `BlockPool.allocate` when fewer blocks are free than asked for."""


class BlockPool:
    """Free-list of block ids 1..num_blocks-1 (block 0 is the null block)."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 2:
            raise ValueError(f"a pool needs at least 2 blocks (null + 1), got {num_blocks}")
        self._num_blocks = num_blocks
        self._free: list[int] = list(range(1, num_blocks))  # a min-heap (sorted is a heap)
        self._allocated: set[int] = set()

    @property
    def num_blocks(self) -> int:
        """All blocks including the null block (the first dimension of the pool buffer)."""
        return self._num_blocks

    @property
    def num_total_usable(self) -> int:
        return self._num_blocks - 1

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_allocated(self) -> int:
        return len(self._allocated)

    def can_allocate(self, n: int) -> bool:
        return 0 <= n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        """`n` free block ids, lowest first. Raises OutOfBlocksError (pool unchanged) if short."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} blocks")
        if n > len(self._free):
            raise OutOfBlocksError(f"asked for {n} blocks, only {len(self._free)} free")
        ids = [heapq.heappop(self._free) for _ in range(n)]
        self._allocated.update(ids)
        return ids

    def free(self, ids: Iterable[int]) -> None:
        """Return blocks to the pool. Raises ValueError (pool unchanged) on a null, foreign,
        repeated or not-allocated id."""
        ids = list(ids)
        for b in ids:
            is_int = isinstance(b, numbers.Integral) and not isinstance(b, bool)
            if not is_int or not 0 < b < self._num_blocks:
                raise ValueError(f"block id {b!r} does not belong to this pool "
                                 f"(valid: 1..{self._num_blocks - 1})")
        if len(set(ids)) != len(ids):
            raise ValueError(f"block ids freed twice in one call: {sorted(ids)}")
        ids = [int(b) for b in ids]
        missing = [b for b in ids if b not in self._allocated]
        if missing:
            raise ValueError(f"double free: blocks {missing} are not allocated")
        self._allocated.difference_update(ids)
        for b in ids:
            heapq.heappush(self._free, b)

    def is_allocated(self, block_id: int) -> bool:
        return block_id in self._allocated
