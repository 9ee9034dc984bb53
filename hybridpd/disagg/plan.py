"""Transfer planning: which byte ranges a D rank reads from each P rank (pure offset math).

Owns `ReadPlan`, `plan_read` / `plan_reads` and the rank pairing rules (`source_p_ranks`,
`readers_of_p_rank`, `readers_per_p_rank`). Input: both sides' `PeerGeometry` (layout per
docs/architecture.md "The page pool"), block ids per group (attention groups, then Mamba
groups) and the number of tokens N in the state. Output: (src_offset, dst_offset, length) int64
arrays relative to each side's buffer base, coalesced so that ranges adjacent on both sides are
one descriptor. Padding and bytes outside the request are never described.

Heterogeneous TP (see DESIGN.md §4): every component (x, B, C channels of the conv state, SSM
heads, KV heads) is a contiguous byte range per rank, cut in equal chunks by TP rank. A P rank's
slice and a D rank's slice are intervals of the same "global" (TP = 1) component; a read is
their intersection. With KV head replication (TP > heads) a D rank reads each of its heads from
the lowest-numbered source P rank that holds it.

Knows nothing of NIXL, torch, the model code or requests.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from hybridpd.cache.geometry import CacheGeometry, kv_head_range
from hybridpd.disagg.params import PeerGeometry

BlockIds = Sequence[Sequence[int]]


@dataclass(frozen=True, eq=False)
class ReadPlan:
    """The descriptors one D rank reads from one P rank (offsets from each buffer base)."""

    p_rank: int
    src_offset: np.ndarray  # (n,) int64, into the P rank's buffer
    dst_offset: np.ndarray  # (n,) int64, into the D rank's buffer
    length: np.ndarray  # (n,) int64 bytes

    @property
    def num_descriptors(self) -> int:
        return int(self.length.shape[0])

    @property
    def total_bytes(self) -> int:
        return int(self.length.sum())


# ---- rank pairing ----------------------------------------------------------------------------
def _tp_ratio(p_tp: int, d_tp: int) -> None:
    if p_tp < 1 or d_tp < 1 or (p_tp % d_tp and d_tp % p_tp):
        raise ValueError(f"P tp_size={p_tp} and D tp_size={d_tp}: one must divide the other")


def source_p_ranks(d_rank: int, p_tp: int, d_tp: int) -> tuple[int, ...]:
    """P ranks D rank `d_rank` reads from (and must notify, even with nothing to read)."""
    _tp_ratio(p_tp, d_tp)
    if d_tp >= p_tp:
        return (d_rank // (d_tp // p_tp),)
    k = p_tp // d_tp
    return tuple(range(d_rank * k, d_rank * k + k))


def readers_of_p_rank(p_rank: int, p_tp: int, d_tp: int) -> tuple[int, ...]:
    """D ranks that read from (and notify) P rank `p_rank`."""
    _tp_ratio(p_tp, d_tp)
    if d_tp >= p_tp:
        t = d_tp // p_tp
        return tuple(range(p_rank * t, p_rank * t + t))
    return (p_rank // (p_tp // d_tp),)


def readers_per_p_rank(p_tp: int, d_tp: int) -> tuple[int, ...]:
    """Per P rank: how many D-rank notifications it must receive before freeing the blocks."""
    return tuple(len(readers_of_p_rank(p, p_tp, d_tp)) for p in range(p_tp))


# ---- validation ------------------------------------------------------------------------------
def _check_blocks(geo: CacheGeometry, num_blocks: int, block_ids: BlockIds, num_tokens: int,
                  side: str) -> None:
    if len(block_ids) != geo.num_groups:
        raise ValueError(f"{side}: {len(block_ids)} block-id groups, geometry has {geo.num_groups}")
    need = geo.attn_blocks_for_tokens(num_tokens)
    for g, ids in enumerate(block_ids):
        if any(not 0 < b < num_blocks for b in ids):
            raise ValueError(f"{side}: group {g} has block ids outside 1..{num_blocks - 1}: {ids}")
        minimum = need if g < len(geo.attention_groups) else 1
        if len(ids) < minimum:
            raise ValueError(f"{side}: group {g} has {len(ids)} blocks, needs {minimum}")


def _check_pair(src: PeerGeometry, dst: PeerGeometry) -> None:
    if src.compat_hash != dst.compat_hash:
        raise ValueError(
            f"incompatible layouts: P {src.geometry.compat_key()} vs D {dst.geometry.compat_key()}"
        )
    s, d = src.geometry, dst.geometry
    if (s.attention_groups, s.mamba_groups) != (d.attention_groups, d.mamba_groups):
        raise ValueError("P and D group the layers differently")
    if s.tp_rank not in source_p_ranks(d.tp_rank, s.tp_size, d.tp_size):
        raise ValueError(f"D rank {d.tp_rank}/{d.tp_size} does not read from P rank "
                         f"{s.tp_rank}/{s.tp_size}")


# ---- attention -------------------------------------------------------------------------------
def _token_segments(num_tokens: int, t_src: int, t_dst: int) -> tuple[np.ndarray, np.ndarray]:
    """Token runs that stay inside one logical block on both sides: (starts, lengths)."""
    cuts = np.union1d(np.arange(0, num_tokens, t_src), np.arange(0, num_tokens, t_dst))
    bounds = np.append(cuts, num_tokens).astype(np.int64)  # (n+1,)
    return bounds[:-1], np.diff(bounds)


def _heads_to_read(src: CacheGeometry, dst: CacheGeometry) -> list[int]:
    """Global KV heads D reads from this P rank: its own heads that this rank serves first."""
    sources = source_p_ranks(dst.tp_rank, src.tp_size, dst.tp_size)
    heads = []
    for h in range(dst.kv_head_start, dst.kv_head_start + dst.kv_heads_local):
        for p in sources:
            start, count = kv_head_range(src.num_kv_heads, src.tp_size, p)
            if start <= h < start + count:
                if p == src.tp_rank:
                    heads.append(h)
                break
    return heads


def _attention_ranges(src: CacheGeometry, dst: CacheGeometry, src_ids: BlockIds,
                      dst_ids: BlockIds, num_tokens: int) -> list[tuple[np.ndarray, ...]]:
    heads = _heads_to_read(src, dst)
    if num_tokens == 0 or not heads:
        return []
    starts, lengths = _token_segments(num_tokens, src.block_tokens, dst.block_tokens)
    token_bytes = dst.head_dim * dst.kv_itemsize
    out: list[tuple[np.ndarray, ...]] = []
    for g, layers in enumerate(src.attention_groups):
        s_blk = np.asarray(src_ids[g], dtype=np.int64)[starts // src.block_tokens]  # (n,)
        d_blk = np.asarray(dst_ids[g], dtype=np.int64)[starts // dst.block_tokens]
        s_tok = (starts % src.block_tokens) * token_bytes
        d_tok = (starts % dst.block_tokens) * token_bytes
        for region in range(len(layers)):
            s_page = (s_blk * src.group_size + region) * src.page_bytes + s_tok
            d_page = (d_blk * dst.group_size + region) * dst.page_bytes + d_tok
            for h in heads:
                for kv in (0, 1):
                    s_row = ((h - src.kv_head_start) * 2 + kv) * src.kv_row_bytes
                    d_row = ((h - dst.kv_head_start) * 2 + kv) * dst.kv_row_bytes
                    out.append((s_page + s_row, d_page + d_row, lengths * token_bytes))
    return out


# ---- Mamba -----------------------------------------------------------------------------------
def _components(geo: CacheGeometry) -> list[tuple[int, int]]:
    """(offset in page, local bytes) of x, B, C and SSM: each a TP chunk of a global range."""
    return [(geo.x_offset, geo.x_bytes), (geo.b_offset, geo.bc_bytes),
            (geo.c_offset, geo.bc_bytes), (geo.ssm_offset, geo.ssm_bytes)]


def _mamba_ranges(src: CacheGeometry, dst: CacheGeometry, src_ids: BlockIds,
                  dst_ids: BlockIds) -> list[tuple[np.ndarray, ...]]:
    first = len(src.attention_groups)
    out: list[tuple[np.ndarray, ...]] = []
    for g, layers in enumerate(src.mamba_groups):
        s_blk, d_blk = src_ids[first + g][0], dst_ids[first + g][0]
        for region in range(len(layers)):
            s_page = (s_blk * src.group_size + region) * src.page_bytes
            d_page = (d_blk * dst.group_size + region) * dst.page_bytes
            for (s_off, s_len), (d_off, d_len) in zip(_components(src), _components(dst)):
                lo = max(src.tp_rank * s_len, dst.tp_rank * d_len)  # global component bytes
                hi = min((src.tp_rank + 1) * s_len, (dst.tp_rank + 1) * d_len)
                if hi > lo:
                    src_at = s_page + s_off + lo - src.tp_rank * s_len
                    dst_at = d_page + d_off + lo - dst.tp_rank * d_len
                    out.append((np.array([src_at]), np.array([dst_at]), np.array([hi - lo])))
    return out


# ---- coalescing and entry points -------------------------------------------------------------
def coalesce(src: np.ndarray, dst: np.ndarray, length: np.ndarray) -> tuple[np.ndarray, ...]:
    """Sort by source, then merge runs adjacent on both sides. Returns int64 arrays."""
    keep = length > 0
    src, dst, length = src[keep], dst[keep], length[keep]
    if src.size == 0:
        return src, dst, length
    order = np.lexsort((dst, src))
    src, dst, length = src[order], dst[order], length[order]
    brk = np.ones(src.size, dtype=bool)  # (n,) True where a new descriptor starts
    brk[1:] = (src[1:] != src[:-1] + length[:-1]) | (dst[1:] != dst[:-1] + length[:-1])
    starts = np.flatnonzero(brk)
    return src[starts], dst[starts], np.add.reduceat(length, starts)


def plan_read(dst: PeerGeometry, dst_block_ids: BlockIds, src: PeerGeometry,
              src_block_ids: BlockIds, num_tokens: int) -> ReadPlan:
    """Descriptors for D rank `dst` to read the request's state from P rank `src`."""
    if num_tokens < 0:
        raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
    _check_pair(src, dst)
    s, d = src.geometry, dst.geometry
    _check_blocks(s, src.num_blocks, src_block_ids, num_tokens, "P")
    _check_blocks(d, dst.num_blocks, dst_block_ids, num_tokens, "D")
    flat_d = [b for g in dst_block_ids for b in g]
    if len(set(flat_d)) != len(flat_d):
        raise ValueError(f"D block ids repeat: {dst_block_ids}")
    parts = _attention_ranges(s, d, src_block_ids, dst_block_ids, num_tokens)
    parts += _mamba_ranges(s, d, src_block_ids, dst_block_ids)
    empty = np.zeros(0, dtype=np.int64)
    cols = [np.concatenate([p[i] for p in parts]).astype(np.int64) if parts else empty
            for i in range(3)]
    src_off, dst_off, length = coalesce(*cols)
    return ReadPlan(s.tp_rank, src_off, dst_off, length)


def plan_reads(dst: PeerGeometry, dst_block_ids: BlockIds, sources: Sequence[PeerGeometry],
               src_block_ids: BlockIds, num_tokens: int) -> list[ReadPlan]:
    """One ReadPlan per source P rank of `dst` (`sources` holds every P rank's geometry)."""
    by_rank = {p.geometry.tp_rank: p for p in sources}
    ranks = source_p_ranks(dst.geometry.tp_rank, sources[0].geometry.tp_size,
                           dst.geometry.tp_size)
    missing = [r for r in ranks if r not in by_rank]
    if missing:
        raise ValueError(f"no geometry for P ranks {missing}")
    return [plan_read(dst, dst_block_ids, by_rank[r], src_block_ids, num_tokens) for r in ranks]
