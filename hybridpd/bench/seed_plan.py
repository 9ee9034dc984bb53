"""The seed's descriptor scheme (DESIGN.md §4), emulated over our pool, for the transfer bench.

Owns `seed_read`: the descriptors the seed would issue for one request, as a `ReadPlan`.
Attention: for every attention group and region (layer), every kernel block of the request's
tokens and each of K and V, one descriptor of the D rank's head slice, placed as in the seed's
layout ([K | V] per kernel block, heads outermost in each half, kernel block j of logical block
L at `page_offset(L, region) + j * kernel_page`). Mamba: for every Mamba group and region, one
descriptor per component (x, B, C, SSM). Nothing is coalesced. The descriptors address our
registered buffer with the seed's count and sizes, so they measure what the seed's scheme costs
on the wire; the bytes they land are not our layout (only `plan_read`'s are). Each side uses its
own r (kernel blocks per logical block). Knows nothing of NIXL, torch or the model code.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from hybridpd.cache.geometry import CacheGeometry, cdiv, kv_head_range
from hybridpd.disagg.params import PeerGeometry
from hybridpd.disagg.plan import ReadPlan, source_p_ranks

BlockIds = Sequence[Sequence[int]]


def _head_slice(src: CacheGeometry, dst: CacheGeometry) -> tuple[int, int] | None:
    """(first global head, count) that D reads from this P rank, None when nothing.

    With replicated heads a D head is read from the lowest-numbered source P rank holding it.
    """
    lo = max(src.kv_head_start, dst.kv_head_start)
    hi = min(src.kv_head_start + src.kv_heads_local, dst.kv_head_start + dst.kv_heads_local)
    if hi <= lo:
        return None
    for p in source_p_ranks(dst.tp_rank, src.tp_size, dst.tp_size):
        start, count = kv_head_range(src.num_kv_heads, src.tp_size, p)
        if start <= lo < start + count:
            return (lo, hi - lo) if p == src.tp_rank else None
    return None


def _kernel_block_offsets(geo: CacheGeometry, ids: Sequence[int], region: int,
                          num_kernel_blocks: int) -> np.ndarray:
    """(n,) byte offset of each of the request's kernel blocks in one region (seed layout)."""
    k = np.arange(num_kernel_blocks, dtype=np.int64)  # (n,) kernel block index in the request
    logical = np.asarray(ids, dtype=np.int64)[k // geo.r]  # (n,)
    page = (logical * geo.group_size + region) * geo.page_bytes
    return page + (k % geo.r) * geo.kernel_page_bytes


def _slice_in_kernel_page(geo: CacheGeometry, half: int, first_head: int) -> int:
    """Offset of head `first_head` in the K (half 0) or V (half 1) half of a kernel page."""
    head_bytes = geo.kernel_block_size * geo.head_dim * geo.kv_itemsize
    return half * geo.kernel_page_bytes // 2 + (first_head - geo.kv_head_start) * head_bytes


def _attention(src: CacheGeometry, dst: CacheGeometry, src_ids: BlockIds, dst_ids: BlockIds,
               num_tokens: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    heads = _head_slice(src, dst)
    if heads is None or num_tokens == 0:
        return []
    first, count = heads
    nkb = cdiv(num_tokens, src.kernel_block_size)
    head_bytes = src.kernel_block_size * src.head_dim * src.kv_itemsize  # one head, one half
    out = []
    for g, layers in enumerate(src.attention_groups):
        for region in range(len(layers)):
            s_kb = _kernel_block_offsets(src, src_ids[g], region, nkb)
            d_kb = _kernel_block_offsets(dst, dst_ids[g], region, nkb)
            for half in (0, 1):
                s_at = s_kb + _slice_in_kernel_page(src, half, first)
                d_at = d_kb + _slice_in_kernel_page(dst, half, first)
                out.append((s_at, d_at, np.full(nkb, count * head_bytes, dtype=np.int64)))
    return out


def _mamba(src: CacheGeometry, dst: CacheGeometry, src_ids: BlockIds,
           dst_ids: BlockIds) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    first = len(src.attention_groups)
    comps = [(src.x_offset, dst.x_offset, src.x_bytes, dst.x_bytes),
             (src.b_offset, dst.b_offset, src.bc_bytes, dst.bc_bytes),
             (src.c_offset, dst.c_offset, src.bc_bytes, dst.bc_bytes),
             (src.ssm_offset, dst.ssm_offset, src.ssm_bytes, dst.ssm_bytes)]
    out = []
    for g, layers in enumerate(src.mamba_groups):
        for region in range(len(layers)):
            s_page = src.page_offset(src_ids[first + g][0], region)
            d_page = dst.page_offset(dst_ids[first + g][0], region)
            for s_off, d_off, s_len, d_len in comps:
                lo = max(src.tp_rank * s_len, dst.tp_rank * d_len)
                hi = min((src.tp_rank + 1) * s_len, (dst.tp_rank + 1) * d_len)
                if hi > lo:
                    out.append((np.array([s_page + s_off + lo - src.tp_rank * s_len]),
                                np.array([d_page + d_off + lo - dst.tp_rank * d_len]),
                                np.array([hi - lo])))
    return out


def seed_read(dst: PeerGeometry, dst_block_ids: BlockIds, src: PeerGeometry,
              src_block_ids: BlockIds, num_tokens: int) -> ReadPlan:
    """The seed's descriptors for D rank `dst` reading one request from P rank `src`."""
    s, d = src.geometry, dst.geometry
    if s.kernel_block_size != d.kernel_block_size:
        raise ValueError("the seed's scheme needs the same kernel block size on both sides")
    parts = _attention(s, d, src_block_ids, dst_block_ids, num_tokens)
    parts += _mamba(s, d, src_block_ids, dst_block_ids)
    cols = [np.concatenate([p[i] for p in parts]).astype(np.int64) if parts
            else np.zeros(0, dtype=np.int64) for i in range(3)]
    return ReadPlan(s.tp_rank, cols[0], cols[1], cols[2])
