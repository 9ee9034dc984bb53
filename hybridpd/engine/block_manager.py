"""Which pool blocks each request holds.

Owns the request -> blocks map on top of `cache.pool.BlockPool`: per attention group a list of
logical blocks covering the request's tokens, per Mamba group one state block. Allocation is
all-or-nothing; freeing is exact. Knows nothing of tensors, models or sampling.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hybridpd.cache.pool import BlockPool


@dataclass
class RequestBlocks:
    attn: list[list[int]] = field(default_factory=list)  # per attention group
    mamba: list[int] = field(default_factory=list)  # per Mamba group (empty until first grow)

    @property
    def count(self) -> int:
        return sum(len(g) for g in self.attn) + len(self.mamba)

    def all_ids(self) -> list[int]:
        return [b for group in self.attn for b in group] + list(self.mamba)

    def frozen(self) -> tuple[tuple[tuple[int, ...], ...], tuple[int, ...]]:
        return tuple(tuple(g) for g in self.attn), tuple(self.mamba)


class BlockManager:
    def __init__(
        self, pool: BlockPool, num_attn_groups: int, num_mamba_groups: int, block_tokens: int
    ) -> None:
        self.pool = pool
        self.num_attn_groups = num_attn_groups
        self.num_mamba_groups = num_mamba_groups
        self.block_tokens = block_tokens
        self._held: dict[str, RequestBlocks] = {}

    # ---- queries ---------------------------------------------------------------------------
    def blocks_for(self, num_tokens: int) -> int:
        """Blocks a request of `num_tokens` tokens holds in total."""
        per_group = -(-num_tokens // self.block_tokens) if self.num_attn_groups else 0
        return per_group * self.num_attn_groups + self.num_mamba_groups

    def extra_needed(self, request_id: str, num_tokens: int) -> int:
        held = self._held.get(request_id)
        have = held.count if held else 0
        return max(0, self.blocks_for(num_tokens) - have)

    def get(self, request_id: str) -> RequestBlocks:
        return self._held[request_id]

    def holds(self, request_id: str) -> bool:
        return request_id in self._held

    @property
    def num_free(self) -> int:
        return self.pool.num_free

    @property
    def num_usable(self) -> int:
        return self.pool.num_total_usable

    # ---- mutation --------------------------------------------------------------------------
    def ensure(self, request_id: str, num_tokens: int) -> bool:
        """Grow the request's blocks to cover `num_tokens`. False (nothing taken) when full."""
        need = self.extra_needed(request_id, num_tokens)
        if need > self.pool.num_free:
            return False
        held = self._held.get(request_id)
        if held is None:
            held = self._held[request_id] = self._empty()
        if need == 0:
            return True
        it = iter(self.pool.allocate(need))
        if not held.mamba:
            held.mamba = [next(it) for _ in range(self.num_mamba_groups)]
        per_group = -(-num_tokens // self.block_tokens) if self.num_attn_groups else 0
        for group in held.attn:
            while len(group) < per_group:
                group.append(next(it))
        return True

    def free(self, request_id: str) -> int:
        """Return every block of the request to the pool; returns how many."""
        held = self._held.pop(request_id, None)
        if held is None:
            return 0
        ids = held.all_ids()
        if ids:
            self.pool.free(ids)
        return len(ids)

    def _empty(self) -> RequestBlocks:
        return RequestBlocks(attn=[[] for _ in range(self.num_attn_groups)], mamba=[])
