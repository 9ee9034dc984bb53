"""The KV write by slot as one Triton kernel (K and V together), beside `write_kv_ref`.

Owns `write_kv_triton`, with the signature of `attention.write_kv_ref`: k, v (T, Hkv, D), any
strides (e.g. column slices of a fused projection), stored at slot `block_id * block_tokens +
offset` of the head-major page view `(num_blocks, Hkv, 2, block_tokens, D)` in the cache's
dtype, in place, through its strides. One launch instead of the reference's index arithmetic and
two indexed stores; nothing but the T slots is written. Graph-safe (no host sync, fixed grid
for a fixed T). Knows nothing of requests, the scheduler, the pool's byte layout or the model.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from hybridpd.kernels.triton_common import check_device, check_last_dim_contiguous, pow2


@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, kv_ptr, slot_ptr, num_kv_heads, head_dim, block_tokens,
                     stride_kt, stride_kh, stride_kd, stride_vt, stride_vh, stride_vd,
                     stride_cb, stride_ch, stride_ckv, stride_ct, stride_cd,
                     BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    blk = slot // block_tokens
    off = slot - blk * block_tokens
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h[:, None] < num_kv_heads) & (offs_d[None, :] < head_dim)
    k = tl.load(k_ptr + t * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :] * stride_kd,
                mask=mask)
    v = tl.load(v_ptr + t * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :] * stride_vd,
                mask=mask)
    dst = (kv_ptr + blk * stride_cb + offs_h[:, None] * stride_ch + off * stride_ct
           + offs_d[None, :] * stride_cd)
    tl.store(dst, k.to(kv_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + stride_ckv, v.to(kv_ptr.dtype.element_ty), mask=mask)


def write_kv_triton(k: Tensor, v: Tensor, kv_cache: Tensor, slot_mapping: Tensor) -> None:
    """Same contract as `write_kv_ref`: k, v (T, Hkv, D) stored at `slot_mapping` (T,) of
    kv_cache (num_blocks, Hkv, 2, block_tokens, D), in kv_cache's dtype."""
    op = "write_kv_triton"
    if k.dim() != 3 or kv_cache.dim() != 5 or kv_cache.shape[2] != 2:
        raise ValueError(f"{op}: k must be (T, Hkv, D) and kv_cache (nb, Hkv, 2, bt, D); got "
                         f"{tuple(k.shape)} and {tuple(kv_cache.shape)}")
    num_tokens, num_kv_heads, head_dim = k.shape
    if tuple(v.shape) != tuple(k.shape) or slot_mapping.shape != (num_tokens,) \
            or (kv_cache.shape[1], kv_cache.shape[4]) != (num_kv_heads, head_dim):
        raise ValueError(f"{op}: k {tuple(k.shape)}, v {tuple(v.shape)}, slot_mapping "
                         f"{tuple(slot_mapping.shape)} and kv_cache {tuple(kv_cache.shape)} "
                         "disagree")
    check_device(op, k, v, kv_cache, slot_mapping)
    check_last_dim_contiguous(op, "kv_cache", kv_cache)
    if num_tokens == 0:
        return
    _write_kv_kernel[(num_tokens,)](
        k, v, kv_cache, slot_mapping, num_kv_heads, head_dim, kv_cache.shape[3], *k.stride(),
        *v.stride(), *kv_cache.stride(), BLOCK_H=pow2(num_kv_heads, minimum=1),
        BLOCK_D=pow2(head_dim), num_warps=4 if num_kv_heads * head_dim >= 1024 else 1)
