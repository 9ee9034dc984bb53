"""Which pool blocks each request holds.

Owns the request -> blocks map on top of `cache.pool.BlockPool`: per attention group a list of
logical blocks covering the request's tokens, per Mamba group one state block. Allocation is
all-or-nothing; freeing is exact. `fork` gives a request's sibling sequences (n > 1) the same
state without recomputing it: full attention blocks are shared read-only (reference-counted: a
shared block returns to the pool when its last holder frees it), the partial last block of each
attention group and every Mamba state block are fresh blocks whose contents the caller must copy
(the (src, dst) pairs `fork` returns). Knows nothing of tensors, models or sampling.
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
        self._extra_refs: dict[int, int] = {}  # shared block -> holders beyond the first

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

    def fork_cost(self, num_tokens: int) -> int:
        """Fresh blocks one forked sibling of a `num_tokens`-token sequence takes."""
        partial = 1 if self.num_attn_groups and num_tokens % self.block_tokens else 0
        return partial * self.num_attn_groups + self.num_mamba_groups

    def fork(self, parent_id: str, child_id: str, num_tokens: int) -> list[tuple[int, int]] | None:
        """Give `child_id` the state of `parent_id`'s first `num_tokens` tokens: the parent's
        full attention blocks shared, fresh blocks for its partial last blocks and its Mamba
        state. Returns the (src, dst) block pairs whose contents must be copied before either
        sequence runs again; None (nothing taken) when the pool is short."""
        if child_id in self._held:
            raise ValueError(f"request {child_id!r} already holds blocks")
        parent = self._held[parent_id]
        if self.fork_cost(num_tokens) > self.pool.num_free:
            return None
        it = iter(self.pool.allocate(self.fork_cost(num_tokens)))
        full, partial = divmod(num_tokens, self.block_tokens)
        child = self._empty()
        copies: list[tuple[int, int]] = []
        for src_group, group in zip(parent.attn, child.attn):
            for b in src_group[:full]:
                self._extra_refs[b] = self._extra_refs.get(b, 0) + 1
                group.append(b)
            if partial:
                dst = next(it)
                copies.append((src_group[full], dst))
                group.append(dst)
        for b in parent.mamba:
            dst = next(it)
            copies.append((b, dst))
            child.mamba.append(dst)
        self._held[child_id] = child
        return copies

    def rename(self, old_id: str, new_id: str) -> None:
        """Hand every block of `old_id` to `new_id` (the first forked sibling)."""
        if new_id in self._held:
            raise ValueError(f"request {new_id!r} already holds blocks")
        self._held[new_id] = self._held.pop(old_id)

    def free(self, request_id: str) -> int:
        """Drop every block reference of the request; a block returns to the pool with its
        last holder. Returns how many references were dropped."""
        held = self._held.pop(request_id, None)
        if held is None:
            return 0
        ids = held.all_ids()
        last = []
        for b in ids:
            extra = self._extra_refs.get(b, 0)
            if extra == 0:
                last.append(b)
            elif extra == 1:
                del self._extra_refs[b]
            else:
                self._extra_refs[b] = extra - 1
        if last:
            self.pool.free(last)
        return len(ids)

    @property
    def num_shared(self) -> int:
        """Blocks currently held by more than one request."""
        return len(self._extra_refs)

    def _empty(self) -> RequestBlocks:
        return RequestBlocks(attn=[[] for _ in range(self.num_attn_groups)], mamba=[])
