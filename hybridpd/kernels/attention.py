"""Causal GQA attention over the paged KV cache (no RoPE), and the KV write into it.

Owns the pure-torch reference ops `write_kv_ref` and `paged_attention_ref`. The cache view is
`(num_blocks, Hkv, 2, block_tokens, head_dim)` ([:, :, 0] = K, [:, :, 1] = V), a strided view
over the pool's byte buffer written in place. One op serves prefill (with a cached prefix),
mixed batches and decode. Must not know about requests, the scheduler, the page pool's byte
layout or the model.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hybridpd.kernels.varlen import token_coords


def write_kv_ref(k: Tensor, v: Tensor, kv_cache: Tensor, slot_mapping: Tensor) -> None:
    """Store k, v (T, Hkv, D) at slots `block_id * block_tokens + offset` (T,) of kv_cache."""
    block_tokens = kv_cache.shape[3]
    blocks = torch.div(slot_mapping, block_tokens, rounding_mode="floor")  # (T,)
    offsets = slot_mapping - blocks * block_tokens  # (T,)
    kv_cache[blocks, :, 0, offsets] = k.to(kv_cache.dtype)  # indexed view: (T, Hkv, D)
    kv_cache[blocks, :, 1, offsets] = v.to(kv_cache.dtype)


def _gather_kv(kv_cache: Tensor, block_table: Tensor) -> tuple[Tensor, Tensor]:
    """Each sequence's keys and values in logical order: two (B, Hkv, S, D) float32, S =
    max_blocks * block_tokens."""
    pages = kv_cache[block_table].float()  # (B, max_blocks, Hkv, 2, bt, D)
    b, nblk, hkv, _, bt, d = pages.shape
    kv = pages.permute(0, 2, 3, 1, 4, 5).reshape(b, hkv, 2, nblk * bt, d)  # (B, Hkv, 2, S, D)
    return kv[:, :, 0], kv[:, :, 1]


def paged_attention_ref(q: Tensor, kv_cache: Tensor, block_table: Tensor,
                        query_start_loc: Tensor, seq_lens: Tensor, scale: float,
                        max_query_len: int | None = None,
                        coords: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """softmax(q k^T * scale) v per sequence, causal. q: (T, Hq, D); block_table:
    (B, max_blocks); query_start_loc: (B+1,); seq_lens: (B,) context + new tokens.
    `max_query_len` (a host int the caller already knows) avoids a device->host sync;
    `coords` (token_coords of query_start_loc, built once per step) avoids recomputing them.

    Query i of sequence b sits at position seq_lens[b] - q_len[b] + i and attends cache
    positions 0..that position. Returns (T, Hq, D) in q's dtype.
    """
    num_tokens, num_q_heads, head_dim = q.shape
    num_seqs = block_table.shape[0]
    keys, values = _gather_kv(kv_cache, block_table)  # (B, Hkv, S, D) each
    num_kv_heads, span = keys.shape[1], keys.shape[2]
    group = num_q_heads // num_kv_heads

    seq, idx = coords if coords is not None else token_coords(query_start_loc, num_tokens)
    q_lens = query_start_loc[1:] - query_start_loc[:-1]  # (B,)
    if max_query_len is not None:
        max_q = max_query_len if num_seqs else 0
    else:
        max_q = int(q_lens.max().item()) if num_seqs else 0
    q_pad = q.new_zeros((num_seqs, max_q, num_q_heads, head_dim), dtype=torch.float32)
    q_pad[seq, idx] = q.float()  # (B, Qmax, Hq, D)
    q_pad = q_pad.view(num_seqs, max_q, num_kv_heads, group, head_dim).permute(0, 2, 3, 1, 4)

    # query position per padded row; padded rows reuse the last position and are dropped later
    rows = torch.arange(max_q, device=q.device)  # (Qmax,)
    q_pos = (seq_lens - q_lens)[:, None] + torch.minimum(rows, (q_lens - 1)[:, None])  # (B,Qmax)
    keys_pos = torch.arange(span, device=q.device)  # (S,)
    visible = keys_pos[None, None, :] <= q_pos[:, :, None]  # (B, Qmax, S)

    scores = torch.einsum("bhgqd,bhsd->bhgqs", q_pad, keys) * scale  # (B, Hkv, G, Qmax, S)
    scores = scores.masked_fill(~visible[:, None, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    in_seq = (keys_pos[None, :] < seq_lens[:, None])[:, None, :, None]  # (B, 1, S, 1)
    values = torch.where(in_seq, values, torch.zeros_like(values))  # unused slots may be garbage
    out = torch.einsum("bhgqs,bhsd->bqhgd", probs, values)  # (B, Qmax, Hkv, G, D)
    out = out.reshape(num_seqs, max_q, num_q_heads, head_dim)
    return out[seq, idx].to(q.dtype)


def paged_decode_attention_ref(q: Tensor, kv_cache: Tensor, block_table: Tensor,
                               seq_lens: Tensor, scale: float) -> Tensor:
    """One new query per sequence, attending cache positions 0..seq_lens[b]-1 (its own K/V
    already written). q: (B, Hq, D); block_table: (B, max_blocks); seq_lens: (B,) >= 1.
    Returns (B, Hq, D) in q's dtype. No padding to a longest query: decode rows only."""
    num_seqs, num_q_heads, head_dim = q.shape
    keys, values = _gather_kv(kv_cache, block_table)  # (B, Hkv, S, D) each
    num_kv_heads, span = keys.shape[1], keys.shape[2]
    qf = q.float().view(num_seqs, num_kv_heads, num_q_heads // num_kv_heads, head_dim)
    scores = torch.einsum("bhgd,bhsd->bhgs", qf, keys) * scale  # (B, Hkv, G, S)
    valid = torch.arange(span, device=q.device)[None, :] < seq_lens[:, None]  # (B, S)
    scores = scores.masked_fill(~valid[:, None, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    values = torch.where(valid[:, None, :, None], values, torch.zeros_like(values))
    out = torch.einsum("bhgs,bhsd->bhgd", probs, values)  # (B, Hkv, G, D)
    return out.reshape(num_seqs, num_q_heads, head_dim).to(q.dtype)
