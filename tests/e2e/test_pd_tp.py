"""Heterogeneous tensor parallelism end to end on CPU with real NIXL: a tiny model with
2 KV heads (< 4: replicated at TP 4) and n_groups = 4; for every (P_TP, D_TP) pair below,
greedy output through the proxy equals a co-located TP = 1 instance, and each D rank moves
exactly its shard's bytes (per-rank byte counts in the request's transfer stats)."""

from __future__ import annotations

import os

import pytest

from .cluster import block_tokens, completion, state_bytes, wait_pool_free

# In an order that lets the pool (conftest.POOL_MAX_RANKS) start each (role, TP, hand-off)
# instance once: 12 instances for the 16 cases instead of 32; n-1 first, so the first-token
# 1P1D pair is still up for the modules after this one.
PAIRS = [(1, 4), (2, 4), (1, 2), (1, 1), (2, 1), (2, 2), (4, 1), (4, 2)]


def _cases():
    for handoff in ("n-1", "first-token"):
        for p_tp, d_tp in PAIRS:
            yield pytest.param(p_tp, d_tp, handoff, id=f"P{p_tp}-D{d_tp}-{handoff}")


@pytest.mark.parametrize(("p_tp", "d_tp", "handoff"), list(_cases()))
def test_hetero_tp_matches_tp1(p_tp, d_tp, handoff, e2e_models, references, pool):
    import torch

    if torch.cuda.is_available() and max(p_tp, d_tp) > torch.cuda.device_count():
        pytest.skip(f"instances run on CUDA here: TP {max(p_tp, d_tp)} needs as many GPUs")
    path = e2e_models["tiny"]
    name = os.path.basename(path)
    dep = pool.deployment(path, prefill_tp=p_tp, decode_tp=d_tp, handoff=handoff)
    bt = block_tokens(path, max(p_tp, d_tp))
    for i, n in enumerate([1, 3, bt + 2]):
        prompt = [(17 * j + i) % 300 + 3 for j in range(n)]
        _, want = completion(references["tiny"].url, name, prompt, 10)
        status, got = completion(dep.url, name, prompt, 10)
        assert status == 200, got
        assert got["choices"][0]["token_ids"] == want["choices"][0]["token_ids"], n
        state = n if handoff == "first-token" else n - 1
        if state:
            stats = got["kv_transfer_stats"]
            assert stats["outcome"] == "ok" and stats["ranks"] == d_tp
            assert stats["rank_bytes"] == state_bytes(path, state, d_tp)
    for child in dep.prefill + dep.decode:
        free = wait_pool_free(child.url)
        assert free["free_blocks"] == free["total_blocks"], (child.name, free)
