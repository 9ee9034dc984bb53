"""Triton byte-range gather: `dst[d_i : d_i + n_i] = src[s_i : s_i + n_i]` for many ranges in
one launch (the same-GPU transport's READ, `disagg/cuda_ipc.py`: one `copy_` per range costs
~20 µs of host time each, which made a 95-range 8B READ host-bound at 6.6% of a device copy).

Owns `copy_pieces_triton(src, dst, src_off, dst_off, length, words)`: one program per piece,
each piece at most `BLOCK` elements (the caller cuts ranges into such pieces on the host, so
the grid has exactly the programs the bytes need), moving 8-byte words when every offset and
length is a multiple of 8 (the page layout's are multiples of 16), else bytes. Offsets are
int64 device tensors. Checked against `kernels/copy.py: copy_ranges_ref` in
tests/kernels/test_triton_copy.py. Imports triton at import: reached on CUDA only (or under
TRITON_INTERPRET=1). Knows nothing of pools, plans or peers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK = 4096  # elements per piece: 32 KiB of 8-byte words (4 KiB on the byte path)


@triton.jit
def _copy_pieces_kernel(src_ptr, dst_ptr, soff_ptr, doff_ptr, len_ptr, BLOCK: tl.constexpr):
    p = tl.program_id(0)
    offs = tl.arange(0, BLOCK).to(tl.int64)
    m = offs < tl.load(len_ptr + p)
    vals = tl.load(src_ptr + tl.load(soff_ptr + p) + offs, mask=m)
    tl.store(dst_ptr + tl.load(doff_ptr + p) + offs, vals, mask=m)


def piece_bytes(words: bool) -> int:
    """The longest piece a program copies, in bytes."""
    return BLOCK * (8 if words else 1)


def copy_pieces_triton(src: Tensor, dst: Tensor, src_off: Tensor, dst_off: Tensor,
                       length: Tensor, words: bool) -> None:
    """One launch for every piece. src, dst: uint8 1-D on one device; src_off, dst_off,
    length: int64 (R,) on that device, in bytes, each length at most `piece_bytes(words)`
    (all multiples of 8 when `words`)."""
    if src.dtype != torch.uint8 or dst.dtype != torch.uint8 or src.dim() != 1 or dst.dim() != 1:
        raise ValueError("copy_pieces_triton: src and dst must be uint8 1-D tensors")
    if not (src_off.shape == dst_off.shape == length.shape) or src_off.dim() != 1:
        raise ValueError("copy_pieces_triton: offsets and lengths must be (R,) alike")
    if src_off.numel() == 0:
        return
    if words:
        if src.numel() % 8 or dst.numel() % 8:
            raise ValueError("copy_pieces_triton: word copies need pools of whole words")
        src, dst = src.view(torch.int64), dst.view(torch.int64)
        src_off, dst_off, length = src_off // 8, dst_off // 8, length // 8
    _copy_pieces_kernel[(src_off.numel(),)](src, dst, src_off, dst_off, length, BLOCK=BLOCK,
                                           num_warps=8)


def warm_up(device: torch.device) -> None:
    """Compile both variants now (a first READ would otherwise pay the JIT, tens of ms, and
    the pair's calibration would time it)."""
    buf = torch.zeros(64, dtype=torch.uint8, device=device)
    offs = torch.tensor([0], dtype=torch.int64, device=device)
    for words, n in ((True, 8), (False, 3)):
        copy_pieces_triton(buf[:32], buf[32:], offs, offs, offs + n, words)
