"""One transfer scenario for the NIXL bench: model shape, both sides' geometry, block ids.

Owns the set-up that `bench/transfer_bench.py` and the tests share: a `ModelConfig` from a
preset (real shapes, optionally cut to fewer layers), the `PeerGeometry` of each P rank a D rank
reads from and of that D rank, and block ids per group (shuffled in a pool with slack, so that
block ids are not conveniently consecutive). Pure numbers: knows nothing of NIXL or tensors.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from hybridpd.cache.geometry import CacheGeometry
from hybridpd.config import ModelConfig
from hybridpd.demo.presets import get_preset, hf_config
from hybridpd.disagg.params import PeerGeometry
from hybridpd.disagg.plan import source_p_ranks

BlockIds = tuple[tuple[int, ...], ...]


def model_from_preset(name: str, num_layers: int | None = None) -> ModelConfig:
    """The preset's shape as `ModelConfig.from_hf_dict` reads it (special ids are dummies)."""
    preset = get_preset(name)
    raw = hf_config(preset, vocab_size=preset.vocab_size or 256, bos_token_id=1,
                    eos_token_ids=[2], pad_token_id=0, num_layers=num_layers)
    return ModelConfig.from_hf_dict(raw)


def blocks_needed(geo: CacheGeometry, num_tokens: int) -> list[int]:
    """Blocks per group (attention groups, then Mamba groups) for one request."""
    attn = geo.attn_blocks_for_tokens(num_tokens)
    return [attn] * len(geo.attention_groups) + [1] * len(geo.mamba_groups)


def assign_block_ids(geo: CacheGeometry, num_tokens: int, num_blocks: int,
                     rng: random.Random | None) -> BlockIds:
    """Distinct ids in 1..num_blocks-1 per group; shuffled when `rng` is given."""
    counts = blocks_needed(geo, num_tokens)
    free = list(range(1, num_blocks))
    if sum(counts) > len(free):
        raise ValueError(f"{sum(counts)} blocks needed, pool has {len(free)}")
    if rng is not None:
        rng.shuffle(free)
    out, at = [], 0
    for n in counts:
        out.append(tuple(free[at : at + n]))
        at += n
    return tuple(out)


@dataclass(frozen=True)
class Side:
    """One rank's pool in the scenario (the buffer address is filled in by its owner)."""

    geometry: CacheGeometry
    num_blocks: int
    block_ids: BlockIds

    def peer(self, base_addr: int = 0) -> PeerGeometry:
        return PeerGeometry.from_cache(self.geometry, self.num_blocks, base_addr)


@dataclass(frozen=True)
class TransferCase:
    """D rank `d_rank` (of `d_tp`) reads one request of `num_tokens` from its P ranks."""

    model: ModelConfig
    num_tokens: int
    p_tp: int = 1
    d_tp: int = 1
    d_rank: int = 0
    kernel_block_size: int = 16
    slack: float = 1.0  # extra free blocks in each pool, as a fraction of those needed
    shuffle_seed: int | None = 0  # None: consecutive block ids

    @property
    def p_ranks(self) -> tuple[int, ...]:
        return source_p_ranks(self.d_rank, self.p_tp, self.d_tp)

    def _side(self, tp: int, rank: int, seed_offset: int) -> Side:
        geo = CacheGeometry.build(self.model, tp, rank, self.kernel_block_size)
        need = sum(blocks_needed(geo, self.num_tokens))
        num_blocks = 1 + need + int(need * self.slack)
        rng = None if self.shuffle_seed is None else random.Random(self.shuffle_seed + seed_offset)
        return Side(geo, num_blocks, assign_block_ids(geo, self.num_tokens, num_blocks, rng))

    def p_side(self, p_rank: int) -> Side:
        return self._side(self.p_tp, p_rank, 1000 + p_rank)

    def d_side(self) -> Side:
        return self._side(self.d_tp, self.d_rank, 0)
