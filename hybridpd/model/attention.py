"""Nemotron-H attention (`*` layers): GQA, no RoPE, no bias, paged KV through the kernels.

Owns: q/k/v projections sharded by heads (KV heads replicated when TP > num_kv_heads), writing
this step's K/V into the layer's pool view, paged attention through the kernel seam (decode rows
through the decode op, the rest through the prefill op: no decode row is padded to a prefill's
length), and the row-parallel o_proj. Must not know: requests, the block allocator, page byte
layout.
"""

from __future__ import annotations

import torch
from torch import nn

from hybridpd.config import ModelConfig
from hybridpd.model.checkpoint import CheckpointReader
from hybridpd.model.forward_batch import CacheViews, ForwardBatch, StepMeta
from hybridpd.model.parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    TPGroup,
    kv_head_shard,
    linear_names,
    split_evenly,
)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, tp: TPGroup, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = cfg.head_dim
        self.scale = cfg.head_dim ** -0.5
        q_heads = split_evenly(cfg.num_attention_heads, tp, "num_attention_heads")
        kv_heads = kv_head_shard(cfg.num_key_value_heads, tp)
        self.num_heads = q_heads.size
        self.num_kv_heads = kv_heads.size
        d, h = cfg.head_dim, cfg.hidden_size
        self.q_proj = ColumnParallelLinear(h, q_heads.scaled(d), False, dtype, device)
        self.k_proj = ColumnParallelLinear(h, kv_heads.scaled(d), False, dtype, device)
        self.v_proj = ColumnParallelLinear(h, kv_heads.scaled(d), False, dtype, device)
        self.o_proj = RowParallelLinear(q_heads.scaled(d), h, False, tp, dtype, device)

    def weight_names(self, prefix: str) -> list[str]:
        return [n for p in ("q_proj", "k_proj", "v_proj", "o_proj")
                for n in linear_names(f"{prefix}.{p}", False)]

    def load(self, reader: CheckpointReader, prefix: str) -> None:
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            getattr(self, name).load(reader, f"{prefix}.{name}")

    def forward(self, x: torch.Tensor, batch: ForwardBatch, cache: CacheViews,
                meta: StepMeta) -> torch.Tensor:
        """(T, hidden) -> (T, hidden); writes this step's K/V into the pool first."""
        t = x.shape[0]
        q = self.q_proj(x).view(t, self.num_heads, self.head_dim)  # (T, Hq_local, D)
        k = self.k_proj(x).view(t, self.num_kv_heads, self.head_dim)  # (T, Hkv_local, D)
        v = self.v_proj(x).view(t, self.num_kv_heads, self.head_dim)
        group = cache.group_index(self.layer_idx)
        kv_cache = cache.kv_view(self.layer_idx)
        table = batch.attn_block_tables[group]
        ops, nd = meta.ops, batch.num_decodes
        ops.write_kv(k, v, kv_cache, batch.attn_slot_mappings[group])
        parts = []
        if meta.decode is not None:
            parts.append(ops.decode_attention(q[:nd], kv_cache, table[:nd], self.scale,
                                              meta.decode))
        if meta.prefill is not None:
            parts.append(ops.prefill_attention(q[nd:], kv_cache, table[nd:], self.scale,
                                               meta.prefill))
        out = parts[0] if len(parts) == 1 else torch.cat(parts)  # (T, Hq_local, D)
        return self.o_proj(out.reshape(t, self.num_heads * self.head_dim))
