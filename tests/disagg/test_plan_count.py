"""Few descriptors: full Nemotron-H-8B geometry, 8192-token request, bf16 KV, fp32 SSM, kb 16.

Geometry-only (no buffers): counts and total bytes of the plans. The byte-level correctness of
the same planner is proven in test_plan_bytes.py / test_plan_tp.py.
"""

from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "cache"))

import pytest  # noqa: E402
from cache_testlib import EIGHT_B, PATTERN_8B, model  # noqa: E402

from hybridpd.cache.geometry import CacheGeometry  # noqa: E402
from hybridpd.disagg.params import PeerGeometry  # noqa: E402
from hybridpd.disagg.plan import ReadPlan, plan_reads  # noqa: E402

N = 8192
POOL = 400


def _request_ids(geo: CacheGeometry, consecutive: bool, seed: int = 0) -> list[list[int]]:
    k = geo.attn_blocks_for_tokens(N)  # 8 logical blocks of 1040 tokens
    need = k + len(geo.mamba_groups)
    ids = list(range(1, need + 1))
    if not consecutive:
        ids = [int(b) for b in np.random.default_rng(seed).permutation(np.arange(1, POOL))[:need]]
    return [ids[:k]] + [[b] for b in ids[k:]]


def _plans(p_tp: int, d_tp: int, d_rank: int, consecutive: bool) -> list[ReadPlan]:
    m = model(EIGHT_B, PATTERN_8B)
    p_peers = [PeerGeometry.from_cache(CacheGeometry.build(m, p_tp, p), POOL, 0)
               for p in range(p_tp)]
    d_geo = CacheGeometry.build(m, d_tp, d_rank)
    d_peer = PeerGeometry.from_cache(d_geo, POOL, 0)
    p_ids = _request_ids(p_peers[0].geometry, consecutive, seed=1)
    d_ids = _request_ids(d_geo, consecutive, seed=2)
    return plan_reads(d_peer, d_ids, p_peers, p_ids, N)


def _exact_bytes(d_tp: int) -> int:
    kv = N * 4 * 8 * 2 * 128 * 2  # tokens x attention layers x heads x K,V x head_dim x bf16
    mamba = 24 * (10240 * 3 * 2 + 128 * 64 * 128 * 4)  # conv bf16 + SSM fp32 per layer
    return (kv + mamba) // d_tp


def test_8b_tp1_to_tp1_few_descriptors():
    plans = _plans(1, 1, 0, consecutive=True)
    assert len(plans) == 1
    assert plans[0].total_bytes == _exact_bytes(1) == 236_355_584
    # 7 full logical blocks (all 4 layers) + the first partial K row of block 8: 1 range; the
    # other partial rows of block 8 (4 layers x 8 heads x K,V - 1): 63; 24 Mamba pages (padded,
    # so never adjacent): 24.
    assert plans[0].num_descriptors <= 200
    assert plans[0].num_descriptors == 88


@pytest.mark.parametrize("p_tp, d_tp", [(1, 4), (4, 1)])
def test_8b_heterogeneous_tp_few_descriptors(p_tp, d_tp):
    for d in range(d_tp):
        plans = _plans(p_tp, d_tp, d, consecutive=True)
        assert sum(p.total_bytes for p in plans) == _exact_bytes(d_tp)
        assert sum(p.num_descriptors for p in plans) <= 1000


@pytest.mark.parametrize("p_tp, d_tp", [(1, 1), (1, 4), (4, 1)])
def test_8b_non_consecutive_blocks_stay_reasonable(p_tp, d_tp):
    plans = _plans(p_tp, d_tp, 0, consecutive=False)
    assert sum(p.total_bytes for p in plans) == _exact_bytes(d_tp)
    count = sum(p.num_descriptors for p in plans)
    consecutive = sum(p.num_descriptors for p in _plans(p_tp, d_tp, 0, consecutive=True))
    # one logical block can no longer merge with the next: at most one more range per block
    # boundary per region (7 boundaries x 4 regions), and each Mamba page is one range anyway.
    assert consecutive <= count <= consecutive + 7 * 4 * max(1, p_tp // d_tp)
