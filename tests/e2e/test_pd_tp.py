"""Heterogeneous tensor parallelism end to end on CPU with real NIXL: a tiny model with
2 KV heads (< 4: replicated at TP 4) and n_groups = 4; for every (P_TP, D_TP) pair below,
greedy output through the proxy equals a co-located TP = 1 instance, and each D rank moves
exactly its shard's bytes (per-rank byte counts in the request's transfer stats)."""

from __future__ import annotations

import os

import pytest

from .cluster import block_tokens, completion, start_deployment, state_bytes, wait_pool_free

PAIRS = [(1, 1), (1, 2), (2, 1), (2, 2), (1, 4), (4, 1), (2, 4), (4, 2)]


def _cases():
    for p_tp, d_tp in PAIRS:
        for handoff in ("first-token", "n-1"):
            yield pytest.param(p_tp, d_tp, handoff, id=f"P{p_tp}-D{d_tp}-{handoff}")


@pytest.mark.parametrize(("p_tp", "d_tp", "handoff"), list(_cases()))
def test_hetero_tp_matches_tp1(p_tp, d_tp, handoff, e2e_models, references, logs):
    import torch

    if torch.cuda.is_available() and max(p_tp, d_tp) > torch.cuda.device_count():
        pytest.skip(f"instances run on CUDA here: TP {max(p_tp, d_tp)} needs as many GPUs")
    path = e2e_models["tiny"]
    name = os.path.basename(path)
    dep = start_deployment(path, logs, prefill_tp=p_tp, decode_tp=d_tp, handoff=handoff)
    try:
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
            pool = wait_pool_free(child.url)
            assert pool["free_blocks"] == pool["total_blocks"], (child.name, pool)
    finally:
        dep.stop()
