"""Mamba2 SSD chunked scan for prefill as Triton kernels, beside `ssd.ssd_prefill_ref`.

Owns `ssd_prefill_triton` (the reference's signature), `ssd_chunk_metadata` and `SsdChunks`.
A packed varlen batch (fresh and continuing sequences mixed) is cut into chunks aligned to
each sequence's start, so no chunk spans two sequences; the chunk list is built on the device
with a fixed upper bound on its length (T // Q + B, both host ints), so building it needs no
device->host sync and nothing at run time loops over chunks or requests in Python. The
standard SSD decomposition (Dao & Gu, "Transformers are SSMs", 2024), in four steps:

1. per chunk: dt = softplus(dt_raw + dt_bias) and the in-chunk cumulative sum of dt * A;
2. per chunk: the chunk's own end state  sum_l exp(cum_last - cum_l) dt_l x_l B_l^T;
3. per sequence: the state entering each of its chunks (initial state from the pool slot where
   has_initial_state, else zero), left in place of the chunk states, and the final state
   written back to the pool slot in the pool's dtype;
4. per chunk: y = (C B^T * exp(segsum) * dt) x + exp(cum) C state_in + D x.

By default steps 2 and 3 run as one kernel (`fused_state`): one program per (sequence, head, P
slice) walks the sequence's chunks computing each chunk's own state on the fly, so no fp32
chunk-state buffer is written and read back; only the entering states are stored, in the dtype
the chunk scan's dot reads.

Everything accumulates in float32. The pool view (num_blocks, H, P, N) and every input are
read through their strides, in place. Knows nothing of requests, the scheduler, the pool's
byte layout or the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from hybridpd.kernels.triton_common import (
    check_device,
    check_shape,
    dot_precision,
    interpreting,
    pow2,
)


@dataclass(frozen=True)
class SsdChunks:
    """Chunk-aligned metadata of one varlen batch (all on the batch's device)."""

    chunk_size: int  # Q, tokens per chunk (host int)
    num_chunks: int  # grid bound T // Q + B (host int); chunks past the real ones are empty
    chunk_start: Tensor  # (num_chunks,) int32 first token of each chunk
    chunk_len: Tensor  # (num_chunks,) int32 tokens in each chunk (0 for padding chunks)
    seq_chunk_start: Tensor  # (B+1,) int32 first chunk of each sequence


def ssd_chunk_metadata(query_start_loc: Tensor, num_tokens: int, chunk_size: int) -> SsdChunks:
    """Chunks of at most `chunk_size` tokens, each inside one sequence, built on the device
    (no device->host sync). query_start_loc: (B+1,) starting at 0; num_tokens: T."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    num_seqs = query_start_loc.shape[0] - 1
    dev = query_start_loc.device
    loc = query_start_loc.to(torch.int64)
    per_seq = (loc[1:] - loc[:-1] + chunk_size - 1) // chunk_size  # (B,)
    seq_chunk_start = torch.zeros(num_seqs + 1, dtype=torch.int64, device=dev)
    torch.cumsum(per_seq, 0, out=seq_chunk_start[1:])
    num_chunks = num_tokens // chunk_size + num_seqs  # >= sum(ceil(len_b / Q))
    c = torch.arange(num_chunks, device=dev)
    seq = torch.searchsorted(seq_chunk_start[1:].contiguous(), c, right=True)  # B past the end
    real = seq < num_seqs
    seq = seq.clamp(max=max(num_seqs - 1, 0))
    start = loc[seq] + (c - seq_chunk_start[seq]) * chunk_size
    length = torch.minimum(loc[seq + 1] - start, torch.full_like(start, chunk_size))
    length = torch.where(real, length.clamp(min=0), torch.zeros_like(length))
    return SsdChunks(chunk_size=chunk_size, num_chunks=num_chunks,
                     chunk_start=start.to(torch.int32), chunk_len=length.to(torch.int32),
                     seq_chunk_start=seq_chunk_start.to(torch.int32))


@triton.jit
def _dt_cumsum_kernel(dt_raw_ptr, dt_bias_ptr, a_ptr, chunk_start_ptr, chunk_len_ptr,
                      dt_out_ptr, cum_out_ptr, num_heads, stride_dt_t, stride_dt_h,
                      BLOCK_Q: tl.constexpr, BLOCK_H: tl.constexpr):
    c = tl.program_id(0)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_q = tl.arange(0, BLOCK_Q)
    start = tl.load(chunk_start_ptr + c).to(tl.int64)
    clen = tl.load(chunk_len_ptr + c)
    h_mask = offs_h < num_heads
    mask = (offs_q[:, None] < clen) & h_mask[None, :]
    raw = tl.load(dt_raw_ptr + (start + offs_q)[:, None] * stride_dt_t
                  + offs_h[None, :] * stride_dt_h, mask=mask, other=0.0).to(tl.float32)
    v = raw + tl.load(dt_bias_ptr + offs_h, mask=h_mask, other=0.0)[None, :]
    dt = tl.where(v > 20.0, v, tl.log(1.0 + tl.exp(tl.minimum(v, 20.0))))  # softplus
    dt = tl.where(mask, dt, 0.0)  # padding adds nothing: cum stays flat past the chunk's end
    cum = tl.cumsum(dt * tl.load(a_ptr + offs_h, mask=h_mask, other=0.0)[None, :], axis=0)
    out = (c * num_heads + offs_h[None, :]).to(tl.int64) * BLOCK_Q + offs_q[:, None]
    tl.store(dt_out_ptr + out, dt, mask=h_mask[None, :])
    tl.store(cum_out_ptr + out, cum, mask=h_mask[None, :])


@triton.jit
def _chunk_state_kernel(x_ptr, b_ptr, dt_ptr, cum_ptr, chunk_start_ptr, chunk_len_ptr,
                        states_ptr, num_heads, head_dim, state_size, heads_per_group,
                        stride_xt, stride_xh, stride_xp, stride_bt, stride_bg, stride_bn,
                        BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
                        PREC: tl.constexpr, LOWP_DOT: tl.constexpr):
    c = tl.program_id(0)
    h = tl.program_id(1)
    clen = tl.load(chunk_len_ptr + c)
    if clen > 0:
        start = tl.load(chunk_start_ptr + c).to(tl.int64)
        g = h // heads_per_group
        offs_q = tl.arange(0, BLOCK_Q)
        offs_p = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
        offs_n = tl.arange(0, BLOCK_N)
        q_mask = offs_q < clen
        p_mask = offs_p < head_dim
        n_mask = offs_n < state_size
        rows = start + offs_q
        x = tl.load(x_ptr + rows[:, None] * stride_xt + h * stride_xh
                    + offs_p[None, :] * stride_xp, mask=q_mask[:, None] & p_mask[None, :],
                    other=0.0)  # (Q, P)
        bm = tl.load(b_ptr + rows[:, None] * stride_bt + g * stride_bg
                     + offs_n[None, :] * stride_bn, mask=q_mask[:, None] & n_mask[None, :],
                     other=0.0)  # (Q, N)
        base = (c * num_heads + h).to(tl.int64) * BLOCK_Q
        dt = tl.load(dt_ptr + base + offs_q)
        cum = tl.load(cum_ptr + base + offs_q)
        last = tl.load(cum_ptr + base + BLOCK_Q - 1)
        xw = x.to(tl.float32) * (tl.exp(last - cum) * dt)[:, None]  # (Q, P)
        if LOWP_DOT:  # operands in B's half precision, fp32 accumulation
            st = tl.dot(tl.trans(xw.to(bm.dtype)), bm)  # (P, N)
        else:
            st = tl.dot(tl.trans(xw), bm.to(tl.float32), input_precision=PREC)
        out = (states_ptr + (c * num_heads + h).to(tl.int64) * head_dim * state_size
               + offs_p[:, None] * state_size + offs_n[None, :])
        tl.store(out, st, mask=p_mask[:, None] & n_mask[None, :])


@triton.jit
def _state_passing_kernel(states_ptr, cum_ptr, seq_chunk_start_ptr, pool_ptr, state_ids_ptr,
                          has_init_ptr, num_heads, pn_size, state_size,
                          stride_pb, stride_ph, stride_pp, stride_pn,
                          BLOCK_Q: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < pn_size
    sid = tl.load(state_ids_ptr + b).to(tl.int64)
    has_init = tl.load(has_init_ptr + b) != 0
    slot = (pool_ptr + sid * stride_pb + h * stride_ph + (offs // state_size) * stride_pp
            + (offs % state_size) * stride_pn)
    s = tl.load(slot, mask=mask & has_init, other=0.0).to(tl.float32)  # garbage never read
    c0 = tl.load(seq_chunk_start_ptr + b)
    c1 = tl.load(seq_chunk_start_ptr + b + 1)
    for c in range(c0, c1):
        decay = tl.exp(tl.load(cum_ptr + (c * num_heads + h).to(tl.int64) * BLOCK_Q
                               + BLOCK_Q - 1))
        ptrs = states_ptr + (c * num_heads + h).to(tl.int64) * pn_size + offs
        own = tl.load(ptrs, mask=mask, other=0.0)
        tl.store(ptrs, s, mask=mask)  # the state entering chunk c
        s = s * decay + own
    tl.store(slot, s.to(pool_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _fused_state_kernel(x_ptr, b_ptr, dt_ptr, cum_ptr, seq_chunk_start_ptr, chunk_start_ptr,
                        chunk_len_ptr, states_in_ptr, pool_ptr, state_ids_ptr, has_init_ptr,
                        num_heads, head_dim, state_size, heads_per_group,
                        stride_xt, stride_xh, stride_xp, stride_bt, stride_bg, stride_bn,
                        stride_pb, stride_ph, stride_pp, stride_pn,
                        BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
                        PREC: tl.constexpr, LOWP_DOT: tl.constexpr):
    """Kernels 2 + 3 in one: per (sequence, head, P slice), walk the sequence's chunks,
    computing each chunk's own state on the fly, so no chunk-state buffer is written/read."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    g = h // heads_per_group
    offs_q = tl.arange(0, BLOCK_Q)
    offs_p = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    p_mask = offs_p < head_dim
    n_mask = offs_n < state_size
    pn_mask = p_mask[:, None] & n_mask[None, :]
    sid = tl.load(state_ids_ptr + b).to(tl.int64)
    has_init = tl.load(has_init_ptr + b) != 0
    slot = (pool_ptr + sid * stride_pb + h * stride_ph + offs_p[:, None] * stride_pp
            + offs_n[None, :] * stride_pn)
    s = tl.load(slot, mask=pn_mask & has_init, other=0.0).to(tl.float32)  # (P, N)
    c0 = tl.load(seq_chunk_start_ptr + b)
    c1 = tl.load(seq_chunk_start_ptr + b + 1)
    for c in range(c0, c1):
        start = tl.load(chunk_start_ptr + c).to(tl.int64)
        q_mask = offs_q < tl.load(chunk_len_ptr + c)
        rows = start + offs_q
        x = tl.load(x_ptr + rows[:, None] * stride_xt + h * stride_xh
                    + offs_p[None, :] * stride_xp, mask=q_mask[:, None] & p_mask[None, :],
                    other=0.0)  # (Q, P)
        bm = tl.load(b_ptr + rows[:, None] * stride_bt + g * stride_bg
                     + offs_n[None, :] * stride_bn, mask=q_mask[:, None] & n_mask[None, :],
                     other=0.0)  # (Q, N)
        base = (c * num_heads + h).to(tl.int64) * BLOCK_Q
        dt = tl.load(dt_ptr + base + offs_q)
        cum = tl.load(cum_ptr + base + offs_q)
        last = tl.load(cum_ptr + base + BLOCK_Q - 1)
        xw = x.to(tl.float32) * (tl.exp(last - cum) * dt)[:, None]
        if LOWP_DOT:
            own = tl.dot(tl.trans(xw.to(bm.dtype)), bm)
        else:
            own = tl.dot(tl.trans(xw), bm.to(tl.float32), input_precision=PREC)
        tl.store(states_in_ptr + (c * num_heads + h).to(tl.int64) * head_dim * state_size
                 + offs_p[:, None] * state_size + offs_n[None, :],
                 s.to(states_in_ptr.dtype.element_ty), mask=pn_mask)  # state entering c
        s = s * tl.exp(last) + own
    tl.store(slot, s.to(pool_ptr.dtype.element_ty), mask=pn_mask)


@triton.jit
def _chunk_scan_kernel(x_ptr, b_ptr, c_ptr, d_ptr, dt_ptr, cum_ptr, states_ptr,
                       chunk_start_ptr, chunk_len_ptr, y_ptr, num_heads, head_dim,
                       state_size, heads_per_group,
                       stride_xt, stride_xh, stride_xp, stride_bt, stride_bg, stride_bn,
                       stride_ct, stride_cg, stride_cn, stride_yt, stride_yh, stride_yp,
                       BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
                       PREC: tl.constexpr, DOT_F32: tl.constexpr, LOWP_DOT: tl.constexpr):
    c = tl.program_id(0)
    h = tl.program_id(1)
    clen = tl.load(chunk_len_ptr + c)
    if clen > 0:
        start = tl.load(chunk_start_ptr + c).to(tl.int64)
        g = h // heads_per_group
        offs_q = tl.arange(0, BLOCK_Q)
        offs_p = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
        offs_n = tl.arange(0, BLOCK_N)
        q_mask = offs_q < clen
        p_mask = offs_p < head_dim
        n_mask = offs_n < state_size
        rows = start + offs_q
        qn_mask = q_mask[:, None] & n_mask[None, :]
        cm = tl.load(c_ptr + rows[:, None] * stride_ct + g * stride_cg
                     + offs_n[None, :] * stride_cn, mask=qn_mask, other=0.0)  # (Q, N)
        bm = tl.load(b_ptr + rows[:, None] * stride_bt + g * stride_bg
                     + offs_n[None, :] * stride_bn, mask=qn_mask, other=0.0)  # (Q, N)
        x = tl.load(x_ptr + rows[:, None] * stride_xt + h * stride_xh
                    + offs_p[None, :] * stride_xp, mask=q_mask[:, None] & p_mask[None, :],
                    other=0.0)  # (Q, P)
        if DOT_F32:
            cm = cm.to(tl.float32)
            bm = bm.to(tl.float32)
            x = x.to(tl.float32)
        base = (c * num_heads + h).to(tl.int64) * BLOCK_Q
        dt = tl.load(dt_ptr + base + offs_q)
        cum = tl.load(cum_ptr + base + offs_q)
        cb = tl.dot(cm, tl.trans(bm), input_precision=PREC)  # (Q, Q) fp32
        causal = offs_q[:, None] >= offs_q[None, :]
        decay = tl.exp(tl.where(causal, cum[:, None] - cum[None, :], float("-inf")))
        m = cb * decay * dt[None, :]
        y = tl.dot(m.to(x.dtype), x, input_precision=PREC)  # (Q, P) within the chunk
        s_in = tl.load(states_ptr + (c * num_heads + h).to(tl.int64) * head_dim * state_size
                       + offs_p[None, :] * state_size + offs_n[:, None],
                       mask=n_mask[:, None] & p_mask[None, :], other=0.0)  # (N, P)
        if LOWP_DOT:  # the entering state rounded to C's half precision for the dot
            y_off = tl.dot(cm, s_in.to(cm.dtype))
        else:
            y_off = tl.dot(cm.to(tl.float32), s_in.to(tl.float32), input_precision=PREC)
        y += tl.exp(cum)[:, None] * y_off
        y += tl.load(d_ptr + h) * x.to(tl.float32)
        tl.store(y_ptr + rows[:, None] * stride_yt + h * stride_yh + offs_p[None, :] * stride_yp,
                 y.to(y_ptr.dtype.element_ty), mask=q_mask[:, None] & p_mask[None, :])


# launch choices, the fastest of sweeps on an H200 at 8B shapes (docs/benchmarks.md, runs 2-3):
# lowp_dot: the state dots take half-precision operands (fp32 accumulation) for half-precision
# models, as tensor cores want (1.57 -> 1.22 ms at 8k tokens); fused_state: kernels 2 + 3 in
# one walk per (sequence, head, fused_p slice of P) (1.03 -> 0.53 ms); the unfused path stays
# for comparison (pass_* and state_warps apply to it only)
_TUNE = dict(lowp_dot=True, fused_state=True, fused_p=32, fused_warps=4, fused_stages=2,
             scan_warps=8, state_warps=4, pass_block=512, pass_warps=4, pass_stages=3)


def ssd_prefill_triton(x: Tensor, dt_raw: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor,
                       dt_bias: Tensor, ssm_states: Tensor, state_ids: Tensor,
                       query_start_loc: Tensor, has_initial_state: Tensor,
                       chunk_size: int = 128, max_len: int | None = None,
                       chunks: SsdChunks | None = None, tune: dict | None = None) -> Tensor:
    """Same contract as `ssd_prefill_ref` (x (T, H, P), dt_raw (T, H), A/D/dt_bias (H,),
    B/C (T, G, N), ssm_states (num_blocks, H, P, N) pool view, state_ids/has_initial_state
    (B,), query_start_loc (B+1,) from 0) -> y (T, H, P) in x's dtype, final states written
    to ssm_states[state_ids]. `chunks` (from `ssd_chunk_metadata`, built once per step) saves
    rebuilding the chunk list per layer; `max_len` is accepted for the reference's signature
    and not needed. `tune` overrides launch choices (keys of `_TUNE`; for benchmarks)."""
    op = "ssd_prefill_triton"
    if x.dim() != 3 or B.dim() != 3:
        raise ValueError(f"{op}: x must be (T, H, P) and B (T, G, N); got {tuple(x.shape)}, "
                         f"{tuple(B.shape)}")
    num_tokens, num_heads, head_dim = x.shape
    num_groups, state_size = B.shape[1], B.shape[2]
    num_seqs = state_ids.shape[0]
    check_shape(op, "dt_raw", dt_raw, (num_tokens, num_heads))
    for name, t in (("A", A), ("D", D), ("dt_bias", dt_bias)):
        check_shape(op, name, t, (num_heads,))
    check_shape(op, "B", B, (num_tokens, num_groups, state_size))
    check_shape(op, "C", C, (num_tokens, num_groups, state_size))
    check_shape(op, "ssm_states", ssm_states[:0], (0, num_heads, head_dim, state_size))
    check_shape(op, "query_start_loc", query_start_loc, (num_seqs + 1,))
    check_shape(op, "has_initial_state", has_initial_state, (num_seqs,))
    if num_heads % num_groups:
        raise ValueError(f"{op}: {num_heads} heads do not split into {num_groups} groups")
    check_device(op, x, dt_raw, A, B, C, D, dt_bias, ssm_states, state_ids, query_start_loc,
                 has_initial_state)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if num_seqs == 0:
        return y
    if chunks is None:
        chunks = ssd_chunk_metadata(query_start_loc, num_tokens, chunk_size)
    elif chunks.seq_chunk_start.shape[0] != num_seqs + 1:
        raise ValueError(f"{op}: chunks were built for {chunks.seq_chunk_start.shape[0] - 1} "
                         f"sequences, batch has {num_seqs}")
    nc, block_q = chunks.num_chunks, pow2(chunks.chunk_size)
    A, D, dt_bias = A.float().contiguous(), D.float().contiguous(), dt_bias.float().contiguous()
    has_init = has_initial_state.to(torch.uint8)  # no copy when already uint8
    interp = interpreting()
    prec = dot_precision(x.dtype, interp)
    cfg = dict(_TUNE, **(tune or {}))
    lowp = bool(cfg["lowp_dot"]) and x.dtype in (torch.bfloat16, torch.float16) and not interp
    f32: dict[str, Any] = dict(dtype=torch.float32, device=x.device)
    dt = torch.empty((nc, num_heads, block_q), **f32)
    cum = torch.empty((nc, num_heads, block_q), **f32)
    block_h = 16
    _dt_cumsum_kernel[(nc, triton.cdiv(num_heads, block_h))](
        dt_raw, dt_bias, A, chunks.chunk_start, chunks.chunk_len, dt, cum, num_heads,
        *dt_raw.stride(), BLOCK_Q=block_q, BLOCK_H=block_h, num_warps=4)
    block_p, block_n = min(pow2(head_dim), 64), pow2(state_size)
    heads_per_group = num_heads // num_groups
    grid = (nc, num_heads, triton.cdiv(head_dim, block_p))
    if cfg["fused_state"]:  # entering states only, in the dtype the chunk scan's dot reads
        states = torch.empty((nc, num_heads, head_dim, state_size), device=x.device,
                             dtype=x.dtype if lowp else torch.float32)
        fused_p = min(cfg["fused_p"], block_p)
        _fused_state_kernel[(num_seqs, num_heads, triton.cdiv(head_dim, fused_p))](
            x, B, dt, cum, chunks.seq_chunk_start, chunks.chunk_start, chunks.chunk_len, states,
            ssm_states, state_ids, has_init, num_heads, head_dim, state_size, heads_per_group,
            *x.stride(), *B.stride(), *ssm_states.stride(), BLOCK_Q=block_q, BLOCK_P=fused_p,
            BLOCK_N=block_n, PREC=prec, LOWP_DOT=lowp, num_warps=cfg["fused_warps"],
            num_stages=cfg["fused_stages"])
    else:
        states = torch.empty((nc, num_heads, head_dim, state_size), **f32)
        _chunk_state_kernel[grid](
            x, B, dt, cum, chunks.chunk_start, chunks.chunk_len, states, num_heads, head_dim,
            state_size, heads_per_group, *x.stride(), *B.stride(),
            BLOCK_Q=block_q, BLOCK_P=block_p, BLOCK_N=block_n, PREC=prec, LOWP_DOT=lowp,
            num_warps=cfg["state_warps"])
        block = cfg["pass_block"]
        _state_passing_kernel[(num_seqs, num_heads, triton.cdiv(head_dim * state_size, block))](
            states, cum, chunks.seq_chunk_start, ssm_states, state_ids, has_init, num_heads,
            head_dim * state_size, state_size, *ssm_states.stride(),
            BLOCK_Q=block_q, BLOCK=block, num_warps=cfg["pass_warps"],
            num_stages=cfg["pass_stages"])
    _chunk_scan_kernel[grid](
        x, B, C, D, dt, cum, states, chunks.chunk_start, chunks.chunk_len, y, num_heads,
        head_dim, state_size, heads_per_group, *x.stride(), *B.stride(), *C.stride(),
        *y.stride(), BLOCK_Q=block_q, BLOCK_P=block_p, BLOCK_N=block_n, PREC=prec,
        DOT_F32=interp, LOWP_DOT=lowp, num_warps=cfg["scan_warps"])
    return y
