"""Paged prefill attention as a Triton kernel (flash-attention style), beside the reference.

Owns `paged_attention_triton`, with the signature of `attention.paged_attention_ref`: causal GQA
attention of a packed varlen batch of queries over the head-major paged KV cache
`(num_blocks, Hkv, 2, block_tokens, head_dim)` read in place through its strides, every
sequence's cached prefix included (query i of sequence b sits at seq_lens[b] - q_len[b] + i).
Online softmax over key tiles: no score matrix is materialised. Keys at or beyond seq_len are
never read (masked loads), so pool bytes after the KV (unified pages hold Mamba state there)
cannot leak in as NaN. Serves any query length (decode rows are queries of length 1), but decode
has its own split-KV kernel in the seam. Knows nothing of requests, the scheduler, the pool's
byte layout or the model.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from hybridpd.kernels.triton_common import (
    check_device,
    check_last_dim_contiguous,
    dot_precision,
    interpreting,
    pow2,
)

_LOG2E = 1.4426950408889634


@triton.jit
def _attn_tile(acc, m_i, l_i, q, q_pos, kv_head_ptr, bt_row_ptr, stride_btc, stride_kb,
               stride_kkv, stride_kt, stride_kd, block_tokens, start, kv_end, qk_scale,
               offs_d, d_mask, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
               PREC: tl.constexpr, K_ROWS: tl.constexpr):
    """One key tile [start, start + BLOCK_N) folded into the running softmax state."""
    offs_n = start + tl.arange(0, BLOCK_N)
    n_mask = offs_n < kv_end
    lblk = offs_n // block_tokens
    if MASKED:
        phys = tl.load(bt_row_ptr + lblk * stride_btc, mask=n_mask, other=0)
    else:
        phys = tl.load(bt_row_ptr + lblk * stride_btc)
    rows = kv_head_ptr + phys.to(tl.int64) * stride_kb + (offs_n - lblk * block_tokens) * stride_kt
    kv_ptrs = rows[:, None] + offs_d[None, :] * stride_kd  # (BLOCK_N, BLOCK_D)
    if MASKED:
        nd_mask = n_mask[:, None] & d_mask[None, :]
    else:
        nd_mask = d_mask[None, :]
    if K_ROWS:  # K as (BLOCK_N, BLOCK_D) rows, transposed for the dot
        k = tl.trans(tl.load(kv_ptrs, mask=nd_mask, other=0.0))
    else:  # K loaded straight as (BLOCK_D, BLOCK_N)
        kt_ptrs = rows[None, :] + offs_d[:, None] * stride_kd
        if MASKED:
            k = tl.load(kt_ptrs, mask=n_mask[None, :] & d_mask[:, None], other=0.0)
        else:
            k = tl.load(kt_ptrs, mask=d_mask[:, None], other=0.0)
    v = tl.load(kv_ptrs + stride_kkv, mask=nd_mask, other=0.0)
    s = tl.dot(q, k.to(q.dtype), input_precision=PREC) * qk_scale  # (BLOCK_M, BLOCK_N)
    if MASKED:
        visible = (offs_n[None, :] <= q_pos[:, None]) & n_mask[None, :]
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=PREC)
    return acc, m_new, l_i


@triton.jit
def _prefill_attention_kernel(
    q_ptr, kv_ptr, bt_ptr, qsl_ptr, seq_lens_ptr, out_ptr, qk_scale,
    stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_kkv, stride_kt, stride_kd,
    stride_btb, stride_btc,
    stride_ot, stride_oh, stride_od,
    block_tokens,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr, DOT_F32: tl.constexpr,
    K_ROWS: tl.constexpr,
):
    # heads fastest, so the GQA group's programs share K/V tiles in L2; the costliest (last)
    # query tiles first, so the causal tail does not idle the chip
    head = tl.program_id(0)
    tile = tl.num_programs(1) - 1 - tl.program_id(1)
    seq = tl.program_id(2)
    q_start = tl.load(qsl_ptr + seq)
    q_len = tl.load(qsl_ptr + seq + 1) - q_start
    if tile * BLOCK_M < q_len:
        seq_len = tl.load(seq_lens_ptr + seq)
        ctx = seq_len - q_len  # cached prefix: causal offset
        offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        m_mask = offs_m < q_len
        d_mask = offs_d < HEAD_DIM
        q_rows = (q_start + offs_m).to(tl.int64)
        q = tl.load(q_ptr + q_rows[:, None] * stride_qt + head * stride_qh
                    + offs_d[None, :] * stride_qd,
                    mask=m_mask[:, None] & d_mask[None, :], other=0.0)
        if DOT_F32:  # every dot below runs in q's dtype
            q = q.to(tl.float32)
        q_pos = ctx + offs_m  # padded rows sit past the last key; they are never stored
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        kv_head_ptr = kv_ptr + (head // GROUP).to(tl.int64) * stride_kh
        bt_row_ptr = bt_ptr + seq.to(tl.int64) * stride_btb
        # keys every row of the tile sees (full tiles, no masks), then the causal diagonal
        kv_end = tl.minimum(ctx + tile * BLOCK_M + BLOCK_M, seq_len)
        full_end = ((ctx + tile * BLOCK_M + 1) // BLOCK_N) * BLOCK_N
        for start in range(0, full_end, BLOCK_N):
            acc, m_i, l_i = _attn_tile(acc, m_i, l_i, q, q_pos, kv_head_ptr, bt_row_ptr,
                                       stride_btc, stride_kb, stride_kkv, stride_kt, stride_kd,
                                       block_tokens, start, kv_end, qk_scale, offs_d, d_mask,
                                       BLOCK_N, False, PREC, K_ROWS)
        for start in range(full_end, kv_end, BLOCK_N):
            acc, m_i, l_i = _attn_tile(acc, m_i, l_i, q, q_pos, kv_head_ptr, bt_row_ptr,
                                       stride_btc, stride_kb, stride_kkv, stride_kt, stride_kd,
                                       block_tokens, start, kv_end, qk_scale, offs_d, d_mask,
                                       BLOCK_N, True, PREC, K_ROWS)
        out = acc / l_i[:, None]
        tl.store(out_ptr + q_rows[:, None] * stride_ot + head * stride_oh
                 + offs_d[None, :] * stride_od,
                 out.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


def _config(head_dim: int, max_query_len: int) -> tuple[int, int, int, int, bool]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages, K_ROWS) for a head dim and longest query
    (the fastest of a sweep on an H200 at D = 128, docs/benchmarks.md)."""
    if interpreting():
        return 16, 16, 4, 1, False
    if max_query_len <= 16:
        return 16, 64, 4, 2, False
    return 128, 32, 4, 4, True


def paged_attention_triton(q: Tensor, kv_cache: Tensor, block_table: Tensor,
                           query_start_loc: Tensor, seq_lens: Tensor, scale: float,
                           max_query_len: int | None = None,
                           config: tuple | None = None) -> Tensor:
    """Same contract as `paged_attention_ref`: q (T, Hq, D), kv_cache (num_blocks, Hkv, 2,
    block_tokens, D), block_table (B, max_blocks), query_start_loc (B+1,), seq_lens (B,)
    -> (T, Hq, D) in q's dtype. `max_query_len` (host int) sizes the grid without a
    device->host sync; `config` overrides (BLOCK_M, BLOCK_N, num_warps, num_stages[, K_ROWS])
    (for tuning)."""
    op = "paged_attention_triton"
    if q.dim() != 3 or kv_cache.dim() != 5 or kv_cache.shape[2] != 2:
        raise ValueError(f"{op}: q must be (T, Hq, D) and kv_cache (nb, Hkv, 2, bt, D); got "
                         f"{tuple(q.shape)} and {tuple(kv_cache.shape)}")
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads, block_tokens = kv_cache.shape[1], kv_cache.shape[3]
    if kv_cache.shape[4] != head_dim or num_q_heads % num_kv_heads:
        raise ValueError(f"{op}: head_dim {head_dim} / Hq {num_q_heads} do not fit kv_cache "
                         f"{tuple(kv_cache.shape)}")
    num_seqs = block_table.shape[0]
    if block_table.dim() != 2 or query_start_loc.shape != (num_seqs + 1,) \
            or seq_lens.shape != (num_seqs,):
        raise ValueError(f"{op}: block_table (B, W), query_start_loc (B+1,), seq_lens (B,) "
                         f"disagree: {tuple(block_table.shape)}, "
                         f"{tuple(query_start_loc.shape)}, {tuple(seq_lens.shape)}")
    check_device(op, q, kv_cache, block_table, query_start_loc, seq_lens)
    check_last_dim_contiguous(op, "kv_cache", kv_cache)
    out = torch.empty_like(q)
    if num_tokens == 0 or num_seqs == 0:
        return out
    if max_query_len is None:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max().item())
    block_m, block_n, warps, stages, *rest = config or _config(head_dim, max_query_len)
    k_rows = bool(rest[0]) if rest else False
    grid = (num_q_heads, triton.cdiv(max(max_query_len, 1), block_m), num_seqs)
    _prefill_attention_kernel[grid](
        q, kv_cache, block_table, query_start_loc, seq_lens, out, scale * _LOG2E,
        *q.stride(), kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2),
        kv_cache.stride(3), kv_cache.stride(4), *block_table.stride(), *out.stride(),
        block_tokens,
        GROUP=num_q_heads // num_kv_heads, HEAD_DIM=head_dim, BLOCK_D=pow2(head_dim),
        BLOCK_M=block_m, BLOCK_N=block_n, PREC=dot_precision(q.dtype, interpreting()),
        DOT_F32=interpreting(), K_ROWS=k_rows,
        num_warps=warps, num_stages=stages,
    )
    return out
