"""Triton MoE GEMV for decode-sized batches: routed experts without grouping or sorting.

Owns `moe_experts_gemv(x, up, down, weights, ids)`: for each (token, expert) assignment, one
program per block of output rows reads only that expert's weight rows (so a batch of a few tokens
reads ~k experts per token once, with enough programs to fill the GPU, where a grouped GEMM
launches a few tiles per group and leaves most SMs idle), relu² fused into the up projection and
the routing weight into the down projection; the per-token sum is one `index_add_`. No host
sync, so it captures in a CUDA graph. Checked against the reference expert loop in
tests/kernels/test_triton_moe.py. Imports triton at import (reached on CUDA only, or under
TRITON_INTERPRET=1). Knows nothing of routing or the model.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _expert_gemv_kernel(x_ptr, w_ptr, rows_ptr, exp_ptr, scale_ptr, out_ptr,
                        sxr, sxk, swe, swn, swk, soa, son,
                        N: tl.constexpr, K: tl.constexpr, RELU2: tl.constexpr,
                        SCALE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    a = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mn = offs_n < N
    row = tl.load(rows_ptr + a).to(tl.int64)
    e = tl.load(exp_ptr + a).to(tl.int64)
    acc = tl.zeros([BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mk = offs_k < K
        xv = tl.load(x_ptr + row * sxr + offs_k * sxk, mask=mk, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + e * swe + offs_n[:, None] * swn + offs_k[None, :] * swk,
                    mask=mn[:, None] & mk[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(w * xv[None, :], axis=1)
    if RELU2:
        acc = tl.maximum(acc, 0.0)
        acc = acc * acc
    if SCALE:
        acc = acc * tl.load(scale_ptr + a).to(tl.float32)
    tl.store(out_ptr + a * soa + offs_n * son, acc.to(out_ptr.dtype.element_ty), mask=mn)


def _gemv(x: Tensor, w: Tensor, rows: Tensor, experts: Tensor, scale: Tensor | None,
          out: Tensor, relu2: bool) -> None:
    n, k = w.shape[1], w.shape[2]
    block_n = 32 if n >= 1024 else 16
    grid = (rows.shape[0], triton.cdiv(n, block_n))
    _expert_gemv_kernel[grid](
        x, w, rows, experts, scale if scale is not None else out, out,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), w.stride(2),
        out.stride(0), out.stride(1),
        N=n, K=k, RELU2=relu2, SCALE=scale is not None, BLOCK_N=block_n,
        BLOCK_K=min(256, triton.next_power_of_2(k)), num_warps=4,
    )


def moe_experts_gemv(x: Tensor, up: Tensor, down: Tensor, weights: Tensor,
                     ids: Tensor) -> Tensor:
    """x (T, hidden); up (E, I, hidden); down (E, hidden, I); weights (T, k) fp32; ids (T, k).
    Returns this rank's routed partial (T, hidden) in weights' dtype (fp32)."""
    t, hidden = x.shape
    e, inter = up.shape[0], up.shape[1]
    if up.shape[2] != hidden or down.shape != (e, hidden, inter) or ids.shape != weights.shape:
        raise ValueError(f"moe_experts_gemv: x{tuple(x.shape)} up{tuple(up.shape)} "
                         f"down{tuple(down.shape)} ids{tuple(ids.shape)}")
    k = ids.shape[1]
    flat = ids.reshape(-1)  # (A,) expert of each assignment, token-major
    tokens = torch.arange(t, device=x.device).repeat_interleave(k)  # (A,)
    out = torch.zeros((t, hidden), dtype=weights.dtype, device=x.device)
    if t == 0:
        return out
    h = torch.empty((flat.shape[0], inter), dtype=x.dtype, device=x.device)  # (A, I)
    _gemv(x, up, tokens, flat, None, h, relu2=True)
    part = torch.empty((flat.shape[0], hidden), dtype=weights.dtype, device=x.device)
    _gemv(h, down, torch.arange(flat.shape[0], device=x.device), flat,
          weights.reshape(-1).contiguous(), part, relu2=False)
    return out.index_add_(0, tokens, part)
