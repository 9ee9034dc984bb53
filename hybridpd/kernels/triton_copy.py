"""Triton byte-range gather: `dst[d_i : d_i + n_i] = src[s_i : s_i + n_i]` for many ranges in
one launch (the same-GPU transport's READ, `disagg/cuda_ipc.py`: one `copy_` per range costs
~20 µs of host time each, which made a 95-range 8B READ host-bound at 6.6% of a device copy).

Owns `copy_ranges_triton(src, dst, src_off, dst_off, length)`: programs over (range, chunk of
`BLOCK` words), moving 8-byte words when every offset and length is a multiple of 8 (the page
layout's are multiples of 16), else bytes. Offsets are int64 device tensors; a range's
programs past its length exit at once. Checked against `kernels/copy.py: copy_ranges_ref` in
tests/kernels/test_triton_copy.py. Imports triton at import: reached on CUDA only (or under
TRITON_INTERPRET=1). Knows nothing of pools, plans or peers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK = 2048  # words per program (16 KiB of 8-byte words)


@triton.jit
def _copy_ranges_kernel(src_ptr, dst_ptr, soff_ptr, doff_ptr, len_ptr, BLOCK: tl.constexpr):
    r = tl.program_id(0)
    c = tl.program_id(1)
    n = tl.load(len_ptr + r)
    start = c.to(tl.int64) * BLOCK
    if start < n:
        offs = start + tl.arange(0, BLOCK).to(tl.int64)
        m = offs < n
        vals = tl.load(src_ptr + tl.load(soff_ptr + r) + offs, mask=m)
        tl.store(dst_ptr + tl.load(doff_ptr + r) + offs, vals, mask=m)


def copy_ranges_triton(src: Tensor, dst: Tensor, src_off: Tensor, dst_off: Tensor,
                       length: Tensor, max_length: int, words: bool) -> None:
    """One launch for every range. src, dst: uint8 1-D on one device; src_off, dst_off,
    length: int64 (R,) on that device, in bytes (all multiples of 8 when `words`);
    `max_length`: the longest range, host int (sizes the grid)."""
    if src.dtype != torch.uint8 or dst.dtype != torch.uint8 or src.dim() != 1 or dst.dim() != 1:
        raise ValueError("copy_ranges_triton: src and dst must be uint8 1-D tensors")
    if not (src_off.shape == dst_off.shape == length.shape) or src_off.dim() != 1:
        raise ValueError("copy_ranges_triton: offsets and lengths must be (R,) alike")
    if src_off.numel() == 0 or max_length <= 0:
        return
    if words:
        if src.numel() % 8 or dst.numel() % 8:
            raise ValueError("copy_ranges_triton: word copies need pools of whole words")
        src, dst = src.view(torch.int64), dst.view(torch.int64)
        src_off, dst_off, length, max_length = src_off // 8, dst_off // 8, length // 8, \
            max_length // 8
    grid = (src_off.numel(), triton.cdiv(max_length, BLOCK))
    _copy_ranges_kernel[grid](src, dst, src_off, dst_off, length, BLOCK=BLOCK, num_warps=4)
