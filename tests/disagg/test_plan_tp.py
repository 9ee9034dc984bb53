"""Heterogeneous TP at real head counts and sizes: every D rank gets exactly its shard.

Nemotron-H-8B and Nemotron-3-Nano-30B-A3B shapes, reduced to 1 Mamba + 1 attention layer, for
every (P_TP, D_TP) in {1, 2, 4, 8}^2 (one always divides the other). Real pools are filled and
copied by the plans (see test_plan_harness.py for what is checked). 30B has 2 KV heads, so TP 4
and 8 replicate KV heads on either side.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "cache"))

import pytest  # noqa: E402
from cache_testlib import EIGHT_B, NANO_30B, model  # noqa: E402
from test_plan_harness import Transfer, run_transfer  # noqa: E402

from hybridpd.cache.geometry import CacheGeometry  # noqa: E402
from hybridpd.disagg.plan import readers_of_p_rank, readers_per_p_rank, source_p_ranks  # noqa: E402

TPS = (1, 2, 4, 8)
SHAPES = {"8b": (EIGHT_B, 16, 32), "30b": (NANO_30B, 16, 16)}  # shape, P kb, D kb


@pytest.mark.parametrize("name", sorted(SHAPES))
@pytest.mark.parametrize("p_tp", TPS)
@pytest.mark.parametrize("d_tp", TPS)
def test_real_shapes_every_tp_pair(name, p_tp, d_tp):
    shape, p_kb, d_kb = SHAPES[name]
    m = model(shape, "M*")  # layer 0 Mamba, layer 1 attention: S = 1
    p_t = CacheGeometry.build(m, p_tp, 0, p_kb).block_tokens
    d_t = CacheGeometry.build(m, d_tp, 0, d_kb).block_tokens
    n = max(p_t, d_t) + 9  # at least two logical blocks on both sides
    kp, kd = -(-n // p_t), -(-n // d_t)
    assert min(kp, kd) >= 2
    # non-consecutive and out of order; the Mamba state block sits between attention blocks
    p_ids = [[2 * i + 1 for i in range(kp)][::-1], [2]]
    d_ids = [[kd + 1 - i for i in range(kd)], [1]]
    t = Transfer(p_tp, d_tp, p_kb, d_kb, n, p_ids, d_ids, 2 * kp + 1, kd + 2)
    plans = run_transfer(m, t, seed=p_tp)
    for d, rank_plans in enumerate(plans):
        assert [p.p_rank for p in rank_plans] == list(source_p_ranks(d, p_tp, d_tp))
        assert all(p.num_descriptors <= 64 for p in rank_plans)


@pytest.mark.parametrize("p_tp", TPS)
@pytest.mark.parametrize("d_tp", TPS)
def test_reader_counts_match_source_ranks(p_tp, d_tp):
    readers = {p: [] for p in range(p_tp)}
    for d in range(d_tp):
        for p in source_p_ranks(d, p_tp, d_tp):
            readers[p].append(d)
    assert all(readers_of_p_rank(p, p_tp, d_tp) == tuple(readers[p]) for p in range(p_tp))
    assert readers_per_p_rank(p_tp, d_tp) == tuple(len(readers[p]) for p in range(p_tp))
    assert sum(readers_per_p_rank(p_tp, d_tp)) == max(p_tp, d_tp)


def test_tp_pairs_that_do_not_divide_are_refused():
    with pytest.raises(ValueError, match="divide"):
        source_p_ranks(0, 2, 3)
    with pytest.raises(ValueError, match="divide"):
        readers_per_p_rank(4, 6)
