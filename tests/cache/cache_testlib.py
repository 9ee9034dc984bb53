"""Test helpers for the page pool: model shapes, TP sharding of a full state, byte masks.

The sharding here is written from the model numbers (DESIGN.md §4), not from CacheGeometry, so
tests that compare the two check the geometry instead of repeating it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from hybridpd.cache.tensors import TORCH_DTYPES, PoolTensors
from hybridpd.config import LayerKind, ModelConfig

EIGHT_B = dict(  # Nemotron-H-8B
    hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
    mamba_num_heads=128, mamba_head_dim=64, n_groups=8, ssm_state_size=128, conv_kernel=4,
)
NANO_30B = dict(  # Nemotron-3-Nano-30B-A3B
    hidden_size=2688, num_attention_heads=32, num_key_value_heads=2, head_dim=128,
    mamba_num_heads=64, mamba_head_dim=64, n_groups=8, ssm_state_size=128, conv_kernel=4,
)
TINY = dict(  # conv 24 ch x 3 bf16 = 144 B (16-aligned), ssm 4x2x2 fp32 = 64 B
    hidden_size=16, num_attention_heads=4, num_key_value_heads=2, head_dim=4,
    mamba_num_heads=4, mamba_head_dim=2, n_groups=4, ssm_state_size=2, conv_kernel=4,
)
TINY_GAP = dict(  # fp16 conv 12 ch x 3 = 72 B, SSM at 80 (an 8-byte gap); odd head_dim
    hidden_size=16, num_attention_heads=2, num_key_value_heads=1, head_dim=3,
    mamba_num_heads=2, mamba_head_dim=2, n_groups=2, ssm_state_size=2, conv_kernel=4,
)
TINY_PATTERN = "M-*M-M-*MM"  # attention [2, 7], Mamba [0, 3, 5, 8, 9]: S = 2, last group padded
PATTERN_8B = "M-M-M-M*-" * 4 + "M-" * 8  # 24 M, 4 *, 24 -
PATTERN_30B = "MEMEM*E" * 5 + "MEMEMEM*EMEMEMEME"  # 23 M, 6 *, 23 E


def model(shape: dict, pattern: str, dtype: str = "bfloat16", ssm: str = "float32",
          **over: object) -> ModelConfig:
    raw = dict(shape, model_type="nemotron_h", hybrid_override_pattern=pattern, vocab_size=64,
               intermediate_size=32, **over)
    return ModelConfig.from_hf_dict(raw, dtype=dtype, ssm_state_dtype=ssm)


@dataclass
class FullState:
    """A request's full (TP = 1) state: per attention layer KV, per Mamba layer conv and SSM."""

    kv: dict[int, torch.Tensor]  # layer -> (K heads, 2, N, head_dim)
    conv: dict[int, torch.Tensor]  # layer -> (conv_dim, K-1), channels x | B | C
    ssm: dict[int, torch.Tensor]  # layer -> (H, P, N)


def random_state(m: ModelConfig, num_tokens: int, kv_dtype: str, seed: int = 0) -> FullState:
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, dtype: str) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(TORCH_DTYPES[dtype])

    kv = {layer: rnd(m.num_key_value_heads, 2, num_tokens, m.head_dim, dtype=kv_dtype)
          for layer in m.layers_of(LayerKind.ATTENTION)}
    conv = {layer: rnd(m.conv_dim, m.conv_kernel - 1, dtype=m.dtype)
            for layer in m.layers_of(LayerKind.MAMBA)}
    ssm = {layer: rnd(m.mamba_num_heads, m.mamba_head_dim, m.ssm_state_size,
                      dtype=m.ssm_state_dtype) for layer in m.layers_of(LayerKind.MAMBA)}
    return FullState(kv, conv, ssm)


def kv_heads_of_rank(num_kv_heads: int, tp: int, rank: int) -> list[int]:
    if tp <= num_kv_heads:
        per = num_kv_heads // tp
        return list(range(rank * per, rank * per + per))
    return [rank * num_kv_heads // tp]


def shard(m: ModelConfig, state: FullState, tp: int, rank: int) -> FullState:
    """The slice of a full state one TP rank holds."""
    heads = kv_heads_of_rank(m.num_key_value_heads, tp, rank)
    xl, bl, hl = m.d_inner // tp, m.bc_dim // tp, m.mamba_num_heads // tp
    kv = {k: v[heads] for k, v in state.kv.items()}
    conv = {}
    for layer, c in state.conv.items():
        x, b, cc = c[: m.d_inner], c[m.d_inner : m.d_inner + m.bc_dim], c[m.d_inner + m.bc_dim :]
        part = slice(rank * xl, rank * xl + xl), slice(rank * bl, rank * bl + bl)
        conv[layer] = torch.cat([x[part[0]], b[part[1]], cc[part[1]]])
    ssm = {k: v[rank * hl : rank * hl + hl] for k, v in state.ssm.items()}
    return FullState(kv, conv, ssm)


def token_slots(ids: list[int], num_tokens: int, block_tokens: int) -> tuple[torch.Tensor, ...]:
    """(block id, offset in block) of each token: (N,), (N,) int64."""
    n = torch.arange(num_tokens)
    return torch.tensor(ids, dtype=torch.int64)[n // block_tokens], n % block_tokens


def write_state(pool: PoolTensors, st: FullState, block_ids: list[list[int]], n: int) -> None:
    """Write a (sharded) state into the pool through its views. block_ids per group."""
    geo = pool.geometry
    for layer, kv in st.kv.items():
        g, _ = geo.layer_location(layer)
        blk, off = token_slots(block_ids[g], n, geo.block_tokens)
        pool.kv_view(layer)[blk, :, :, off, :] = kv.permute(2, 0, 1, 3)
    first_mamba = len(geo.attention_groups)
    for layer in st.conv:
        b = block_ids[first_mamba + geo.layer_location(layer)[0]][0]
        pool.conv_view(layer)[b] = st.conv[layer]
        pool.ssm_view(layer)[b] = st.ssm[layer]


def read_state(pool: PoolTensors, layers: FullState, block_ids: list[list[int]],
               n: int) -> FullState:
    """Read back, through the views, what `write_state` would have written (same keys)."""
    geo = pool.geometry
    kv, conv, ssm = {}, {}, {}
    for layer in layers.kv:
        g, _ = geo.layer_location(layer)
        blk, off = token_slots(block_ids[g], n, geo.block_tokens)
        kv[layer] = pool.kv_view(layer)[blk, :, :, off, :].permute(1, 2, 0, 3)
    first_mamba = len(geo.attention_groups)
    for layer in layers.conv:
        b = block_ids[first_mamba + geo.layer_location(layer)[0]][0]
        conv[layer] = pool.conv_view(layer)[b].clone()
        ssm[layer] = pool.ssm_view(layer)[b].clone()
    return FullState(kv, conv, ssm)


def owned_mask(pool_geometry: object, num_blocks: int, block_ids: list[list[int]],
               n: int) -> np.ndarray:
    """uint8 mask over the rank's buffer: 1 on every byte of the request's state."""
    pool = PoolTensors(pool_geometry, num_blocks)  # type: ignore[arg-type]
    geo = pool.geometry
    for group in geo.attention_groups:
        for layer in group:
            g, _ = geo.layer_location(layer)
            blk, off = token_slots(block_ids[g], n, geo.block_tokens)
            pool.kv_view(layer).view(torch.uint8)[blk, :, :, off, :] = 1
    first_mamba = len(geo.attention_groups)
    for g, group in enumerate(geo.mamba_groups):
        b = block_ids[first_mamba + g][0]
        for layer in group:
            pool.conv_view(layer).view(torch.uint8)[b] = 1
            pool.ssm_view(layer).view(torch.uint8)[b] = 1
    return pool.buffer.numpy().reshape(-1).copy()


def coverage(offsets: np.ndarray, lengths: np.ndarray, nbytes: int) -> np.ndarray:
    """How many ranges cover each byte: int64 (nbytes,)."""
    ev = np.zeros(nbytes + 1, dtype=np.int64)
    np.add.at(ev, offsets, 1)
    np.add.at(ev, offsets + lengths, -1)
    return np.cumsum(ev)[:-1]


def random_bytes(pool: PoolTensors, seed: int) -> None:
    rng = np.random.default_rng(seed)
    pool.buffer.numpy().reshape(-1)[:] = rng.integers(0, 256, pool.nbytes, dtype=np.uint8)
