"""Triton MoE kernels for decode-sized batches: routing and routed experts with no glue ops.

Owns
- `route_topk(logits, bias, k, normalize, scaling)`: the sigmoid router's selection after its
  fp32 linear — sigmoid, correction bias for selection only, top-k, weights from the un-biased
  scores, normalisation, scaling — one program per token, one launch (the torch chain is ~9
  launches per MoE layer, which dominate a graph-replayed decode step at batch 1);
- `moe_experts_gemv(x, up, down, weights, ids)`: for each (token, expert) assignment, programs
  over blocks of output rows read only that expert's weight rows (a batch of a few tokens reads
  ~k experts per token once, with enough programs to fill the GPU, where a grouped GEMM
  launches a few tiles per group and leaves most SMs idle); relu² fused into the up projection;
  the down projection sums a token's k assignments, each times its routing weight, inside one
  program, so there is no per-assignment buffer, zero-fill or scatter-add.
No host sync, so both capture in a CUDA graph. Checked against the reference router and expert
loop in tests/kernels/test_triton_moe.py. Imports triton at import (reached on CUDA only, or
under TRITON_INTERPRET=1). Knows nothing of the model.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

# (BLOCK_N, BLOCK_K, num_warps, num_stages) of the up and down GEMVs (bench/moe_decode_micro.py
# sweeps them on a GPU; these were the fastest at one token, 30B-A3B shapes, H200:
# docs/benchmarks.md)
UP_CONFIG = (16, 128, 8, 3)
DOWN_CONFIG = (16, 512, 4, 3)


@triton.jit
def _route_kernel(logit_ptr, bias_ptr, w_ptr, id_ptr, sl, sw, si, E, scaling,
                  TOPK: tl.constexpr, NORM: tl.constexpr, BLOCK_E: tl.constexpr):
    t = tl.program_id(0)
    offs = tl.arange(0, BLOCK_E)
    me = offs < E
    logit = tl.load(logit_ptr + t * sl + offs, mask=me, other=0.0).to(tl.float32)
    score = 1.0 / (1.0 + tl.exp(-logit))  # (BLOCK_E,) sigmoid
    choice = tl.where(me, score + tl.load(bias_ptr + offs, mask=me, other=0.0), float("-inf"))
    picked = tl.zeros([BLOCK_E], tl.float32)  # the scores of the chosen experts, else 0
    for j in tl.static_range(TOPK):
        best = tl.max(choice, axis=0)
        idx = tl.min(tl.where(choice == best, offs, BLOCK_E), axis=0)  # lowest index of a tie
        hit = offs == idx
        picked = tl.where(hit, score, picked)
        choice = tl.where(hit, float("-inf"), choice)
        tl.store(id_ptr + t * si + j, idx.to(tl.int64))
    total = tl.sum(picked, axis=0) + 1e-20
    for j in tl.static_range(TOPK):
        idx = tl.load(id_ptr + t * si + j)
        w = tl.sum(tl.where(offs == idx, picked, 0.0), axis=0)
        if NORM:
            w = w / total
        tl.store(w_ptr + t * sw + j, w * scaling)


def route_topk(logits: Tensor, bias: Tensor, k: int, normalize: bool,
               scaling: float) -> tuple[Tensor, Tensor]:
    """logits (T, E) fp32 of the router's linear; bias (E,) fp32 -> (weights (T, k) fp32,
    ids (T, k) int64), as the reference router (one group) computes them."""
    t, e = logits.shape
    if bias.shape != (e,) or not 0 < k <= e:
        raise ValueError(f"route_topk: logits{tuple(logits.shape)} bias{tuple(bias.shape)} k={k}")
    weights = torch.empty((t, k), dtype=torch.float32, device=logits.device)
    ids = torch.empty((t, k), dtype=torch.int64, device=logits.device)
    if t:
        _route_kernel[(t,)](logits, bias, weights, ids, logits.stride(0), weights.stride(0),
                            ids.stride(0), e, scaling, TOPK=k, NORM=normalize,
                            BLOCK_E=triton.next_power_of_2(e), num_warps=1)
    return weights, ids


@triton.jit
def _rows_dot(v_ptr, svk, w_ptr, swn, swk, offs_n, mn, K: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr):
    """(BLOCK_N,) fp32: rows `offs_n` of one expert's weight matrix times the vector at v_ptr."""
    acc = tl.zeros([BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mk = offs_k < K
        v = tl.load(v_ptr + offs_k * svk, mask=mk, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + offs_n[:, None] * swn + offs_k[None, :] * swk,
                    mask=mn[:, None] & mk[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(w * v[None, :], axis=1)
    return acc


@triton.jit
def _up_kernel(x_ptr, w_ptr, exp_ptr, out_ptr, sxr, sxk, swe, swn, swk, soa, son,
               N: tl.constexpr, K: tl.constexpr, TOPK: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_K: tl.constexpr):
    """h[a] = relu(W_up[e_a] @ x[a // TOPK])² for assignment a (token-major)."""
    a = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mn = offs_n < N
    row = (a // TOPK).to(tl.int64)
    e = tl.load(exp_ptr + a).to(tl.int64)
    acc = _rows_dot(x_ptr + row * sxr, sxk, w_ptr + e * swe, swn, swk, offs_n, mn, K,
                    BLOCK_N, BLOCK_K)
    acc = tl.maximum(acc, 0.0)
    tl.store(out_ptr + a * soa + offs_n * son, (acc * acc).to(out_ptr.dtype.element_ty),
             mask=mn)


@triton.jit
def _down_kernel(h_ptr, w_ptr, exp_ptr, scale_ptr, add_ptr, out_ptr, shr, shk, swe, swn, swk,
                 sat, san, sot, son, N: tl.constexpr, K: tl.constexpr, TOPK: tl.constexpr,
                 ADD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[t] = Σ_j weight[t, j] · W_down[e_tj] @ h[t·TOPK + j] (fp32 sum), stored in out's
    dtype; with ADD, then + add[t] in out's dtype (as `out.to(dtype) + add` rounds)."""
    t = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mn = offs_n < N
    total = tl.zeros([BLOCK_N], tl.float32)
    for j in tl.static_range(TOPK):
        a = t * TOPK + j
        e = tl.load(exp_ptr + a).to(tl.int64)
        acc = _rows_dot(h_ptr + a * shr, shk, w_ptr + e * swe, swn, swk, offs_n, mn, K,
                        BLOCK_N, BLOCK_K)
        total += acc * tl.load(scale_ptr + a).to(tl.float32)
    val = total.to(out_ptr.dtype.element_ty)
    if ADD:
        extra = tl.load(add_ptr + t * sat + offs_n * san, mask=mn, other=0.0)
        val = (val.to(tl.float32) + extra.to(tl.float32)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + t * sot + offs_n * son, val, mask=mn)


def moe_experts_gemv(x: Tensor, up: Tensor, down: Tensor, weights: Tensor, ids: Tensor,
                     out_dtype: torch.dtype | None = None, add: Tensor | None = None,
                     configs: tuple[tuple[int, ...], tuple[int, ...]] | None = None) -> Tensor:
    """x (T, hidden); up (E, I, hidden); down (E, hidden, I); weights (T, k) fp32; ids (T, k).
    Returns this rank's routed partial (T, hidden), summed in fp32 and stored in `out_dtype`
    (default weights' dtype), plus `add` (T, hidden) if given (the shared expert's output,
    added in `out_dtype`). `configs` overrides (UP_CONFIG, DOWN_CONFIG) (for tuning)."""
    t, hidden = x.shape
    e, inter = up.shape[0], up.shape[1]
    if up.shape[2] != hidden or down.shape != (e, hidden, inter) or ids.shape != weights.shape:
        raise ValueError(f"moe_experts_gemv: x{tuple(x.shape)} up{tuple(up.shape)} "
                         f"down{tuple(down.shape)} ids{tuple(ids.shape)}")
    if add is not None and add.shape != (t, hidden):
        raise ValueError(f"moe_experts_gemv: add{tuple(add.shape)} for x{tuple(x.shape)}")
    k = ids.shape[1]
    out = torch.empty((t, hidden), dtype=out_dtype or weights.dtype, device=x.device)
    if t == 0:
        return out
    flat = ids.reshape(-1)  # (A,) expert of each assignment, token-major (a view)
    scale = weights.reshape(-1)  # (A,)
    up_cfg, down_cfg = configs or (UP_CONFIG, DOWN_CONFIG)
    h = torch.empty((t * k, inter), dtype=x.dtype, device=x.device)  # (A, I)
    bn, bk, warps, stages = up_cfg
    _up_kernel[(t * k, triton.cdiv(inter, bn))](
        x, up, flat, h, x.stride(0), x.stride(1), *up.stride(), *h.stride(),
        N=inter, K=hidden, TOPK=k, BLOCK_N=bn, BLOCK_K=min(bk, triton.next_power_of_2(hidden)),
        num_warps=warps, num_stages=stages)
    bn, bk, warps, stages = down_cfg
    _down_kernel[(t, triton.cdiv(hidden, bn))](
        h, down, flat, scale, add if add is not None else out, out, *h.stride(),
        *down.stride(), *(add.stride() if add is not None else (0, 0)), *out.stride(),
        N=hidden, K=inter, TOPK=k, ADD=add is not None, BLOCK_N=bn,
        BLOCK_K=min(bk, triton.next_power_of_2(inter)), num_warps=warps, num_stages=stages)
    return out
