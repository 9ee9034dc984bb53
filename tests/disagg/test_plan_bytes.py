"""Descriptor math checked by copying bytes between real pools (tiny shapes).

Covers N = 1, 2, < kb, exactly one logical block, several blocks; r = 1 and r > 1; P and D with
different kernel block sizes (so different r, block_tokens and page sizes); consecutive and
non-consecutive block ids; an SSM alignment gap; models without attention or without Mamba.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "cache"))

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from cache_testlib import TINY, TINY_GAP, TINY_PATTERN, model  # noqa: E402
from test_plan_harness import Transfer, run_transfer  # noqa: E402

from hybridpd.cache.geometry import CacheGeometry  # noqa: E402
from hybridpd.disagg.params import PeerGeometry  # noqa: E402
from hybridpd.disagg.plan import coalesce, plan_read  # noqa: E402


def _ids(geo: CacheGeometry, n: int, pool_blocks: int, consecutive: bool,
         seed: int) -> list[list[int]]:
    """Block ids per group for an n-token request (attention groups, then Mamba groups)."""
    need = sum(geo.attn_blocks_for_tokens(n) for _ in geo.attention_groups)
    need += len(geo.mamba_groups)
    pick = list(range(1, need + 1))
    if not consecutive:
        rng = np.random.default_rng(seed)
        pick = [int(b) for b in rng.permutation(np.arange(1, pool_blocks))[:need]]
    out, at = [], 0
    for _ in geo.attention_groups:
        k = geo.attn_blocks_for_tokens(n)
        out.append(pick[at : at + k])
        at += k
    return out + [[b] for b in pick[at:]]


# (P kb, D kb): TINY kernel page is 32*kb bytes, Mamba page 208 bytes ->
# kb 2: r=4, T=8;  kb 3: r=3, T=9;  kb 1: r=7, T=7;  kb 16: r=1, T=16;  kb 4: r=2, T=8
KB_PAIRS = [(2, 2), (1, 3), (16, 4), (3, 16)]


@pytest.mark.parametrize("kbs", KB_PAIRS)
@pytest.mark.parametrize("n_kind", ["one", "two", "below_kb", "one_block", "several"])
@pytest.mark.parametrize("consecutive", [True, False])
def test_tp1_byte_copy(kbs, n_kind, consecutive):
    m = model(TINY, TINY_PATTERN)
    p_geo = CacheGeometry.build(m, kernel_block_size=kbs[0])
    d_geo = CacheGeometry.build(m, kernel_block_size=kbs[1])
    n = {"one": 1, "two": 2, "below_kb": max(1, kbs[0] - 1), "one_block": p_geo.block_tokens,
         "several": 3 * p_geo.block_tokens + 2}[n_kind]
    blocks = 16
    p_ids = _ids(p_geo, n, blocks, consecutive, seed=1)
    d_ids = _ids(d_geo, n, blocks + 3, consecutive, seed=2)
    run_transfer(m, Transfer(1, 1, kbs[0], kbs[1], n, p_ids, d_ids, blocks, blocks + 3))


@pytest.mark.parametrize("p_tp, d_tp", [(1, 2), (2, 1), (1, 4), (4, 1), (2, 4), (4, 2)])
@pytest.mark.parametrize("n", [1, 11, 30])
def test_tiny_heterogeneous_tp_byte_copy(p_tp, d_tp, n):
    m = model(TINY, TINY_PATTERN)  # 2 KV heads: TP 4 replicates them
    p_geo = CacheGeometry.build(m, p_tp, 0, kernel_block_size=2)
    d_geo = CacheGeometry.build(m, d_tp, 0, kernel_block_size=3)
    p_ids = _ids(p_geo, n, 20, consecutive=False, seed=n)
    d_ids = _ids(d_geo, n, 20, consecutive=False, seed=n + 1)
    run_transfer(m, Transfer(p_tp, d_tp, 2, 3, n, p_ids, d_ids, 20, 20))


@pytest.mark.parametrize("p_tp, d_tp", [(1, 1), (1, 2), (2, 1)])
def test_alignment_gap_and_odd_head_dim(p_tp, d_tp):
    m = model(TINY_GAP, TINY_PATTERN, dtype="float16")
    p_geo = CacheGeometry.build(m, p_tp, 0, kernel_block_size=4, kv_dtype="float32")
    d_geo = CacheGeometry.build(m, d_tp, 0, kernel_block_size=5, kv_dtype="float32")
    assert p_geo.ssm_offset > p_geo.conv_bytes  # the gap exists and must never be read
    assert p_geo.block_tokens != d_geo.block_tokens
    n = 2 * p_geo.block_tokens + 5
    p_ids = _ids(p_geo, n, 12, consecutive=True, seed=0)
    d_ids = _ids(d_geo, n, 12, consecutive=False, seed=3)
    run_transfer(m, Transfer(p_tp, d_tp, 4, 5, n, p_ids, d_ids, 12, 12), kv_dtype="float32")


@pytest.mark.parametrize("pattern", ["M-M-MM", "*-*-*"])
def test_models_with_one_kind_of_layer(pattern):
    m = model(TINY, pattern)
    n = 9
    for p_tp, d_tp in ((1, 2), (2, 1)):
        p_ids = _ids(CacheGeometry.build(m, p_tp, 0, 2), n, 8, consecutive=False, seed=5)
        d_ids = _ids(CacheGeometry.build(m, d_tp, 0, 2), n, 8, consecutive=True, seed=0)
        run_transfer(m, Transfer(p_tp, d_tp, 2, 2, n, p_ids, d_ids, 8, 8))


def test_same_geometry_consecutive_blocks_coalesce_to_few_descriptors():
    m = model(TINY, TINY_PATTERN)
    geo = CacheGeometry.build(m, kernel_block_size=2)
    n = 4 * geo.block_tokens  # four full logical blocks
    ids = [[1, 2, 3, 4], [5], [6], [7]]
    peer = PeerGeometry.from_cache(geo, 10, 0)
    plan = plan_read(peer, ids, peer, ids, n)
    # attention: 4 consecutive full blocks of both regions = one range, and block 5 (Mamba
    # group 0, first layer, region 0) follows it directly; Mamba pages are padded (208 of 256
    # bytes), so every other Mamba layer is its own range: 1 + 4.
    assert geo.mamba_page_bytes == 208 and geo.page_bytes == 256
    assert plan.num_descriptors == 1 + 4
    assert plan.src_offset[0] == geo.page_offset(1, 0)
    assert plan.length[0] == 4 * geo.block_bytes + 208
    spread = plan_read(peer, [[1, 2, 3, 4], [6], [8], [9]], peer, ids, n)
    assert spread.num_descriptors == 1 + 5 and spread.length[0] == 4 * geo.block_bytes


def test_coalesce_merges_only_ranges_adjacent_on_both_sides():
    src = np.array([30, 0, 10, 20, 50], dtype=np.int64)
    dst = np.array([130, 100, 110, 125, 140], dtype=np.int64)
    ln = np.array([10, 10, 10, 5, 0], dtype=np.int64)
    s, d, l = coalesce(src, dst, ln)
    assert s.tolist() == [0, 20, 30] and d.tolist() == [100, 125, 130]
    assert l.tolist() == [20, 5, 10]


def test_plan_rejects_bad_input():
    m = model(TINY, TINY_PATTERN)
    geo = CacheGeometry.build(m, kernel_block_size=2)
    peer = PeerGeometry.from_cache(geo, 10, 0)
    ok = [[1, 2], [3], [4], [5]]
    with pytest.raises(ValueError, match="needs 2"):
        plan_read(peer, [[1], [3], [4], [5]], peer, ok, 9)
    with pytest.raises(ValueError, match="outside"):
        plan_read(peer, [[1, 10], [3], [4], [5]], peer, ok, 9)
    with pytest.raises(ValueError, match="outside"):
        plan_read(peer, ok, peer, [[0, 2], [3], [4], [5]], 9)
    with pytest.raises(ValueError, match="repeat"):
        plan_read(peer, [[1, 2], [3], [2], [5]], peer, ok, 9)
    with pytest.raises(ValueError, match="groups"):
        plan_read(peer, ok[:3], peer, ok, 9)
    other = PeerGeometry.from_cache(CacheGeometry.build(m, kv_dtype="float32"), 10, 0)
    with pytest.raises(ValueError, match="incompatible"):
        plan_read(other, ok, peer, ok, 9)
    d1 = PeerGeometry.from_cache(CacheGeometry.build(m, 2, 1, kernel_block_size=2), 10, 0)
    with pytest.raises(ValueError, match="does not read"):
        plan_read(d1, ok, PeerGeometry.from_cache(CacheGeometry.build(m, 4, 0), 10, 0), ok, 9)
