"""Triton kernels for decode steps: SSD state update, conv1d update and split-KV paged attention.

Owns three kernels and their launchers, each with the signature of its reference op in the seam
(`kernels/ops.py`) and checked against that `*_ref` in tests/kernels/test_triton_decode.py:
  - `ssd_decode`: one SSD recurrence step per sequence, the state read and written in place in
    its pool slot (strided view, the pool's SSM dtype), fp32 math;
  - `conv1d_update`: one causal-conv step over the DS-layout conv state `(C, K-1)` in the pool
    slots, SiLU fused, state shifted in place;
  - `decode_attention`: paged GQA attention for one new query per sequence over the head-major
    page layout `(num_blocks, Hkv, 2, block_tokens, head_dim)`, split over the KV length
    (`DecodeMeta.num_splits` partitions, a fixed host int, so it captures in a CUDA graph),
    K/V never read beyond `seq_len` (pages hold other bytes past the KV), then a reduction of
    the partial results by their log-sum-exp.
Imported only through the seam on CUDA (or under TRITON_INTERPRET=1 in tests): it imports
triton at module import. Knows nothing of requests, the scheduler, the pool's byte layout or
the model.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from hybridpd.kernels.metadata import DecodeMeta

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


# ---- SSD single-step state update ---------------------------------------------------------
@triton.jit
def _ssd_decode_kernel(
    x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, dtb_ptr, st_ptr, ids_ptr, y_ptr,
    sxb, sxh, sxp, sdb, sdh, sbb, sbg, sbn, scb, scg, scn,
    ss0, ssh, ssp, ssn, syb, syh, syp,
    P, heads_per_group,
    N: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    pb = tl.program_id(2)
    g = h // heads_per_group
    sid = tl.load(ids_ptr + b)
    offs_p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    mp = offs_p < P
    mn = offs_n < N
    dt = tl.load(dt_ptr + b * sdb + h * sdh).to(tl.float32) + tl.load(dtb_ptr + h).to(tl.float32)
    dt = tl.where(dt > 20.0, dt, tl.log(1.0 + tl.exp(dt)))  # softplus, torch's threshold
    decay = tl.exp(dt * tl.load(A_ptr + h).to(tl.float32))
    x = tl.load(x_ptr + b * sxb + h * sxh + offs_p * sxp, mask=mp, other=0.0).to(tl.float32)
    bv = tl.load(B_ptr + b * sbb + g * sbg + offs_n * sbn, mask=mn, other=0.0).to(tl.float32)
    cv = tl.load(C_ptr + b * scb + g * scg + offs_n * scn, mask=mn, other=0.0).to(tl.float32)
    m2 = mp[:, None] & mn[None, :]
    sp = st_ptr + sid * ss0 + h * ssh + offs_p[:, None] * ssp + offs_n[None, :] * ssn
    state = tl.load(sp, mask=m2, other=0.0).to(tl.float32)
    state = state * decay + (dt * x)[:, None] * bv[None, :]
    tl.store(sp, state.to(st_ptr.dtype.element_ty), mask=m2)
    y = tl.sum(state * cv[None, :], axis=1) + tl.load(D_ptr + h).to(tl.float32) * x
    tl.store(y_ptr + b * syb + h * syh + offs_p * syp, y.to(y_ptr.dtype.element_ty), mask=mp)


def ssd_decode(x: Tensor, dt_raw: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor,
               dt_bias: Tensor, ssm_states: Tensor, state_ids: Tensor) -> Tensor:
    """Same contract as `ssd_decode_ref`: x (B, H, P); dt_raw (B, H); B, C (B, G, N);
    ssm_states (num_blocks, H, P, N) strided pool view, updated in place at state_ids."""
    nb, h, p = x.shape
    g, n = B.shape[1], B.shape[2]
    _check(dt_raw.shape == (nb, h) and C.shape == B.shape and B.shape[0] == nb,
           f"ssd_decode: shapes x{tuple(x.shape)} dt{tuple(dt_raw.shape)} B{tuple(B.shape)}")
    _check(ssm_states.shape[1:] == (h, p, n) and state_ids.shape == (nb,) and h % g == 0,
           f"ssd_decode: state view {tuple(ssm_states.shape)} vs x {tuple(x.shape)}, N {n}")
    y = torch.empty_like(x)
    if nb == 0:
        return y
    block_p = min(16, triton.next_power_of_2(p))
    grid = (nb, h, triton.cdiv(p, block_p))
    _ssd_decode_kernel[grid](
        x, dt_raw, A, B, C, D, dt_bias, ssm_states, state_ids, y,
        x.stride(0), x.stride(1), x.stride(2), dt_raw.stride(0), dt_raw.stride(1),
        B.stride(0), B.stride(1), B.stride(2), C.stride(0), C.stride(1), C.stride(2),
        ssm_states.stride(0), ssm_states.stride(1), ssm_states.stride(2), ssm_states.stride(3),
        y.stride(0), y.stride(1), y.stride(2),
        p, h // g, N=n, BLOCK_P=block_p, BLOCK_N=triton.next_power_of_2(n),
    )
    return y


# ---- causal conv1d update (DS layout) -----------------------------------------------------
@triton.jit
def _conv_update_kernel(
    x_ptr, w_ptr, bias_ptr, st_ptr, ids_ptr, out_ptr,
    sxb, sxc, swc, swk, ss0, ssc, ssk, sob, soc, C,
    K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_C: tl.constexpr,
):
    b = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    m = offs < C
    sid = tl.load(ids_ptr + b)
    x = tl.load(x_ptr + b * sxb + offs * sxc, mask=m, other=0.0).to(tl.float32)
    acc = x * tl.load(w_ptr + offs * swc + (K - 1) * swk, mask=m, other=0.0).to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs, mask=m, other=0.0).to(tl.float32)
    base = st_ptr + sid * ss0 + offs * ssc
    prev = tl.load(base, mask=m, other=0.0).to(tl.float32)  # oldest column: dropped
    acc += prev * tl.load(w_ptr + offs * swc, mask=m, other=0.0).to(tl.float32)
    for k in tl.static_range(1, K - 1):
        col = tl.load(base + k * ssk, mask=m, other=0.0).to(tl.float32)
        acc += col * tl.load(w_ptr + offs * swc + k * swk, mask=m, other=0.0).to(tl.float32)
        tl.store(base + (k - 1) * ssk, col.to(st_ptr.dtype.element_ty), mask=m)
    tl.store(base + (K - 2) * ssk, x.to(st_ptr.dtype.element_ty), mask=m)
    out = acc / (1.0 + tl.exp(-acc))  # silu
    tl.store(out_ptr + b * sob + offs * soc, out.to(out_ptr.dtype.element_ty), mask=m)


def conv1d_update(x: Tensor, weight: Tensor, bias: Tensor | None, conv_states: Tensor,
                  state_ids: Tensor) -> Tensor:
    """Same contract as `causal_conv1d_update_ref`: x (B, C); weight (C, K); conv_states
    (num_blocks, C, K-1) strided pool view, shifted in place at state_ids."""
    nb, c = x.shape
    k = weight.shape[1]
    _check(weight.shape[0] == c and conv_states.shape[1:] == (c, k - 1) and k >= 2,
           f"conv1d_update: x{tuple(x.shape)} w{tuple(weight.shape)} "
           f"state{tuple(conv_states.shape)}")
    _check(state_ids.shape == (nb,), "conv1d_update: one state id per row")
    out = torch.empty_like(x)
    if nb == 0:
        return out
    block_c = min(1024, triton.next_power_of_2(c))
    grid = (nb, triton.cdiv(c, block_c))
    _conv_update_kernel[grid](
        x, weight, bias if bias is not None else weight, conv_states, state_ids, out,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
        conv_states.stride(0), conv_states.stride(1), conv_states.stride(2),
        out.stride(0), out.stride(1), c,
        K=k, HAS_BIAS=bias is not None, BLOCK_C=block_c,
    )
    return out


# ---- split-KV paged decode attention ------------------------------------------------------
@triton.jit
def _attn_block(q, kv_ptr, bt_ptr, b, hk, t0, end, stb, stw, s0, s1, s2, s3, s4, block_tokens,
                m_i, l_i, acc, head_dim: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
                IEEE: tl.constexpr):
    """Online-softmax update over cache positions [t0, t0 + BLOCK_N) ∩ [.., end)."""
    offs_d = tl.arange(0, D)  # D: head_dim padded to a power of two >= 16 (what tl.dot needs)
    offs_t = t0 + tl.arange(0, BLOCK_N)
    mt = offs_t < end
    blk = tl.load(bt_ptr + b * stb + (offs_t // block_tokens) * stw, mask=mt, other=0)
    row = blk.to(tl.int64) * s0 + hk * s1 + (offs_t % block_tokens) * s3
    kp = kv_ptr + row[:, None] + offs_d[None, :] * s4
    mkv = mt[:, None] & (offs_d < head_dim)[None, :]
    k = tl.load(kp, mask=mkv, other=0.0)  # (BLOCK_N, D): never past seq_len or head_dim
    v = tl.load(kp + s2, mask=mkv, other=0.0)
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    s = tl.where(mt[None, :], s, float("-inf"))  # (G_PAD, BLOCK_N)
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp(m_i - m_new)
    p = tl.exp(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if IEEE:
        pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
    else:
        pv = tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc * alpha[:, None] + pv


@triton.jit
def _decode_attn_kernel(
    q_ptr, kv_ptr, bt_ptr, len_ptr, o_ptr, lse_ptr,
    sqb, sqh, sqd, s0, s1, s2, s3, s4, stb, stw, sob, soh, sos, sod, slb, slh, sls,
    scale, block_tokens, split_len, G, head_dim: tl.constexpr,
    D: tl.constexpr, G_PAD: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
    INTERPRET: tl.constexpr, ITERS: tl.constexpr,
):
    b = tl.program_id(0)
    hk = tl.program_id(1)
    sp = tl.program_id(2)
    seq_len = tl.load(len_ptr + b)
    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, D)
    mg = offs_g < G
    md = offs_d < head_dim
    heads = hk * G + offs_g
    q = tl.load(q_ptr + b * sqb + heads[:, None] * sqh + offs_d[None, :] * sqd,
                mask=mg[:, None] & md[None, :], other=0.0)
    q = (q.to(tl.float32) * scale).to(kv_ptr.dtype.element_ty)
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D], tl.float32)
    if not INTERPRET:  # this row's own partition: every split gets a share of seq_len
        split_len = tl.cdiv(tl.cdiv(seq_len, tl.num_programs(2)), BLOCK_N) * BLOCK_N
    start = sp * split_len
    end = tl.minimum(start + split_len, seq_len)
    if INTERPRET:  # the interpreter cannot loop to a tensor bound: host trip count
        for i in range(0, ITERS):
            t0 = start + i * BLOCK_N
            if t0 < end:
                m_i, l_i, acc = _attn_block(q, kv_ptr, bt_ptr, b, hk, t0, end, stb, stw, s0,
                                            s1, s2, s3, s4, block_tokens, m_i, l_i, acc,
                                            head_dim, D, BLOCK_N, IEEE)
    else:
        for t0 in range(start, end, BLOCK_N):
            m_i, l_i, acc = _attn_block(q, kv_ptr, bt_ptr, b, hk, t0, end, stb, stw, s0, s1,
                                        s2, s3, s4, block_tokens, m_i, l_i, acc,
                                        head_dim, D, BLOCK_N, IEEE)
    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf"))
    tl.store(o_ptr + b * sob + heads[:, None] * soh + sp * sos + offs_d[None, :] * sod, out,
             mask=mg[:, None] & md[None, :])
    tl.store(lse_ptr + b * slb + heads * slh + sp * sls, lse, mask=mg)


@triton.jit
def _decode_reduce_kernel(
    o_ptr, lse_ptr, out_ptr, sob, soh, sos, sod, slb, slh, sls, sxb, sxh, sxd, num_splits,
    head_dim: tl.constexpr, D: tl.constexpr, S_PAD: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, S_PAD)
    offs_d = tl.arange(0, D)
    md = offs_d < head_dim
    ms = offs_s < num_splits
    lse = tl.load(lse_ptr + b * slb + h * slh + offs_s * sls, mask=ms, other=float("-inf"))
    m = tl.max(lse, axis=0)
    live = ms & (lse > float("-inf"))  # empty splits (past seq_len) are never read
    w = tl.where(live, tl.exp(lse - m), 0.0)  # (S_PAD,)
    part = tl.load(o_ptr + b * sob + h * soh + offs_s[:, None] * sos + offs_d[None, :] * sod,
                   mask=live[:, None] & md[None, :], other=0.0)
    out = tl.sum(part * w[:, None], axis=0) / tl.sum(w, axis=0)
    tl.store(out_ptr + b * sxb + h * sxh + offs_d * sxd, out.to(out_ptr.dtype.element_ty),
             mask=md)


MAX_SPLITS = 64


def _occupancy_splits(device: torch.device, programs: int) -> int:
    """Splits that give the GPU about two programs per SM at `programs` (rows × KV heads):
    at batch 1 a few programs walking the whole context one after the other would leave most
    SMs idle (a fixed split count sized by the table's width did: 40 programs on 132 SMs)."""
    if INTERPRET or device.type != "cuda":
        return 1
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return min(MAX_SPLITS, triton.cdiv(2 * sms, max(programs, 1)))


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def decode_attention(q: Tensor, kv_cache: Tensor, block_table: Tensor, scale: float,
                     meta: DecodeMeta) -> Tensor:
    """Same contract as the seam's decode_attention: q (B, Hq, D); kv_cache (num_blocks, Hkv,
    2, block_tokens, D) strided pool view; block_table (B, W); meta.seq_lens (B,) >= 1."""
    nb, hq, d = q.shape
    hkv, bt = kv_cache.shape[1], kv_cache.shape[3]
    seq_lens = meta.seq_lens
    _check(kv_cache.shape[2] == 2 and kv_cache.shape[4] == d and hq % hkv == 0,
           f"decode_attention: q{tuple(q.shape)} vs cache{tuple(kv_cache.shape)}")
    _check(block_table.shape[0] == nb and seq_lens.shape == (nb,),
           f"decode_attention: table{tuple(block_table.shape)} lens{tuple(seq_lens.shape)}")
    out = torch.empty_like(q)
    if nb == 0:
        return out
    g = hq // hkv
    d_pad = max(16, triton.next_power_of_2(d))  # any head_dim; tl.dot wants >= 16, pow2
    span = block_table.shape[1] * bt  # no sequence is longer than its table
    block_n = 64 if d <= 128 else 32
    splits = max(1, meta.num_splits, _occupancy_splits(q.device, nb * hkv))
    split_len = triton.cdiv(triton.cdiv(span, splits), block_n) * block_n
    splits = triton.cdiv(span, split_len)  # (on a GPU each row re-partitions its seq_len)
    part = torch.empty((nb, hq, splits, d), dtype=torch.float32, device=q.device)
    lse = torch.empty((nb, hq, splits), dtype=torch.float32, device=q.device)
    ieee = kv_cache.dtype == torch.float32
    _decode_attn_kernel[(nb, hkv, splits)](
        q, kv_cache, block_table, seq_lens, part, lse,
        q.stride(0), q.stride(1), q.stride(2), *kv_cache.stride(),
        block_table.stride(0), block_table.stride(1), *part.stride(), *lse.stride(),
        scale, bt, split_len, g, d,
        D=d_pad, G_PAD=max(16, triton.next_power_of_2(g)), BLOCK_N=block_n, IEEE=ieee,
        INTERPRET=INTERPRET, ITERS=split_len // block_n if INTERPRET else 0, num_warps=4,
    )
    _decode_reduce_kernel[(nb, hq)](
        part, lse, out, *part.stride(), *lse.stride(), *out.stride(), splits, d,
        D=d_pad, S_PAD=max(2, triton.next_power_of_2(splits)),
    )
    return out
