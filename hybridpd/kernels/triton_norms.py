"""Triton fused RMS norms: the block/final `rmsnorm` and the Mamba gated, grouped one.

Owns two kernels + launchers with the seam's signatures (`kernels/ops.py`), each one launch per
call instead of the reference's chain of elementwise ops (which dominates a graph-captured decode
step at batch 1 once the big GEMMs are at bandwidth). Same formulas as `rmsnorm_ref` /
`gated_rmsnorm_ref` (fp32 math; the gated norm's weight multiply in the input dtype), checked in
tests/kernels/test_triton_norms.py. Imports triton at import: reached only through the seam on
CUDA or under TRITON_INTERPRET=1. Knows nothing of the model.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _rmsnorm_kernel(x_ptr, w_ptr, out_ptr, sx, so, n, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    m = offs < n
    x = tl.load(x_ptr + row * sx + offs, mask=m, other=0.0).to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n + eps)
    w = tl.load(w_ptr + offs, mask=m, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * so + offs, (w * (x * inv)).to(out_ptr.dtype.element_ty), mask=m)


def rmsnorm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """weight * x / rms(x) over the last dim, fp32 math, x's dtype. x: (T, H) with unit stride."""
    if x.dim() != 2 or x.stride(1) != 1 or weight.shape != (x.shape[1],):
        raise ValueError(f"rmsnorm: x{tuple(x.shape)} stride {x.stride()} w{tuple(weight.shape)}")
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if x.shape[0]:
        block = triton.next_power_of_2(x.shape[1])
        _rmsnorm_kernel[(x.shape[0],)](x, weight, out, x.stride(0), out.stride(0), x.shape[1],
                                       eps, BLOCK=block, num_warps=8 if block >= 4096 else 4)
    return out


@triton.jit
def _gated_kernel(y_ptr, z_ptr, w_ptr, out_ptr, sy, sz, so, group, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    g = tl.program_id(1)
    offs = g * group + tl.arange(0, BLOCK)
    m = tl.arange(0, BLOCK) < group
    y = tl.load(y_ptr + row * sy + offs, mask=m, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + row * sz + offs, mask=m, other=0.0).to(tl.float32)
    h = y * (z / (1.0 + tl.exp(-z)))  # y * silu(z)
    inv = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / group + eps)
    normed = (h * inv).to(out_ptr.dtype.element_ty).to(tl.float32)  # cast, then weight
    w = tl.load(w_ptr + offs, mask=m, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * so + offs, (w * normed).to(out_ptr.dtype.element_ty), mask=m)


def gated_rmsnorm(y: Tensor, z: Tensor, weight: Tensor, group_size: int, eps: float) -> Tensor:
    """Same contract as `gated_rmsnorm_ref`: y, z (T, d) (z may be a strided slice), weight (d,)
    in y's dtype; returns (T, d) in y's dtype."""
    t, d = y.shape
    if (z.shape != y.shape or weight.shape != (d,) or d % group_size or y.stride(1) != 1
            or z.stride(1) != 1 or weight.dtype != y.dtype):
        raise ValueError(f"gated_rmsnorm: y{tuple(y.shape)} z{tuple(z.shape)} "
                         f"w{tuple(weight.shape)} {weight.dtype} group {group_size}")
    out = torch.empty((t, d), dtype=y.dtype, device=y.device)
    if t:
        _gated_kernel[(t, d // group_size)](y, z, weight, out, y.stride(0), z.stride(0),
                                            out.stride(0), group_size, eps,
                                            BLOCK=triton.next_power_of_2(group_size))
    return out


@triton.jit
def _add_rmsnorm_kernel(x_ptr, d_ptr, w_ptr, out_ptr, sum_ptr, sx, sd, so, ss, n, eps,
                        BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    m = offs < n
    x = tl.load(x_ptr + row * sx + offs, mask=m, other=0.0).to(tl.float32)
    d = tl.load(d_ptr + row * sd + offs, mask=m, other=0.0).to(tl.float32)
    s = (x + d).to(sum_ptr.dtype.element_ty)  # the residual stream, rounded as `x + d` rounds
    tl.store(sum_ptr + row * ss + offs, s, mask=m)
    s32 = s.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(s32 * s32, axis=0) / n + eps)
    w = tl.load(w_ptr + offs, mask=m, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * so + offs, (w * (s32 * inv)).to(out_ptr.dtype.element_ty), mask=m)


def add_rmsnorm(x: Tensor, delta: Tensor | None, weight: Tensor,
                eps: float) -> tuple[Tensor, Tensor]:
    """Same contract as `add_rmsnorm_ref`: (rmsnorm(x + delta), x + delta) in one launch, the
    sum rounded to x's dtype before the norm (so equal to the unfused pair of ops)."""
    if delta is None:
        return rmsnorm(x, weight, eps), x
    if (x.dim() != 2 or delta.shape != x.shape or x.stride(1) != 1 or delta.stride(1) != 1
            or weight.shape != (x.shape[1],) or delta.dtype != x.dtype):
        raise ValueError(f"add_rmsnorm: x{tuple(x.shape)} delta{tuple(delta.shape)} "
                         f"{delta.dtype} w{tuple(weight.shape)}")
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    total = torch.empty_like(x, memory_format=torch.contiguous_format)
    if x.shape[0]:
        block = triton.next_power_of_2(x.shape[1])
        _add_rmsnorm_kernel[(x.shape[0],)](
            x, delta, weight, out, total, x.stride(0), delta.stride(0), out.stride(0),
            total.stride(0), x.shape[1], eps, BLOCK=block, num_warps=8 if block >= 4096 else 4)
    return out, total


@triton.jit
def _relu2_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    x = tl.maximum(tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32), 0.0)
    tl.store(out_ptr + offs, (x * x).to(out_ptr.dtype.element_ty), mask=m)


def relu2(x: Tensor) -> Tensor:
    """relu(x)² elementwise in one launch (the reference is two), x's dtype and shape."""
    x = x.contiguous()
    out = torch.empty_like(x)
    n = x.numel()
    if n:
        _relu2_kernel[(triton.cdiv(n, 1024),)](x, out, n, BLOCK=1024, num_warps=4)
    return out
