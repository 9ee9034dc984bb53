"""Byte-range copies, the pure-torch reference (the CPU path and the Triton kernel's oracle).

Owns `copy_ranges_ref(src, dst, src_off, dst_off, length)`: one slice copy per range of uint8
1-D tensors. The one-launch GPU version is `kernels/triton_copy.py`. Knows nothing of pools,
plans or peers.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor


def copy_ranges_ref(src: Tensor, dst: Tensor, src_off: Sequence[int], dst_off: Sequence[int],
                    length: Sequence[int]) -> None:
    """dst[d_i : d_i + n_i] = src[s_i : s_i + n_i] for every range (uint8 1-D tensors)."""
    for s, d, n in zip(src_off, dst_off, length, strict=True):
        dst[d:d + n].copy_(src[s:s + n])
