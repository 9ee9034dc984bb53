"""P/D with two in-process engines and real NIXL over UCX loopback (no HTTP).

Greedy output through prefill -> transfer -> decode equals a co-located engine token for
token; bytes moved are exactly the request's state; both pools end exactly fully free.
"""

from __future__ import annotations

import pytest

from hybridpd.engine.args import EngineArgs
from hybridpd.engine.core import Engine
from hybridpd.engine.protocol import GenerateRequest

from .pd_helpers import assert_pools_free, greedy, pd_generate, run_all, tokens


def _engines(model_dir, handoff, device="cpu", kb=4):
    common = dict(model_dir=model_dir, device=str(device), kernel_block_size=kb,
                  cache_memory=8 << 20, handoff=handoff)
    return (Engine(EngineArgs(role="both", **common)),
            Engine(EngineArgs(role="prefill", **common)),
            Engine(EngineArgs(role="decode", **common)))


def _expected_bytes(engine: Engine, n: int) -> int:
    """K and V of n tokens per attention layer + conv and SSM state per Mamba layer."""
    g = engine.executor.geometry
    attn_layers = sum(len(x) for x in g.attention_groups)
    mamba_layers = sum(len(x) for x in g.mamba_groups)
    kv_per_token = 2 * g.kv_heads_local * g.head_dim * g.kv_itemsize
    return attn_layers * n * kv_per_token + mamba_layers * (g.conv_bytes + g.ssm_bytes)


@pytest.mark.parametrize("handoff", ["first-token", "n-1"])
def test_pd_matches_colocated(tiny_model, handoff, device):
    both, p, d = _engines(tiny_model, handoff, device)
    try:
        bt = both.executor.geometry.block_tokens
        for i, n in enumerate([1, 2, 3, bt, 2 * bt + 5]):
            prompt = [(7 * j + i) % 300 + 3 for j in range(n)]
            params = greedy(12)
            ref = tokens(run_all(both, [GenerateRequest(f"c{i}", tuple(prompt), params)])[f"c{i}"])
            got, d_outs = pd_generate(p, d, f"r{i}", prompt, params)
            assert got == ref, f"prompt length {n}"
            stats = [o.transfer_stats for o in d_outs if o.transfer_stats]
            if handoff == "n-1" and n == 1:
                assert not stats
                continue
            assert len(stats) == 1 and stats[0]["outcome"] == "ok"
            state_tokens = n if handoff == "first-token" else n - 1
            assert stats[0]["num_tokens"] == state_tokens
            assert stats[0]["bytes"] == _expected_bytes(p, state_tokens)
        assert_pools_free(both, p, d)
    finally:
        for e in (both, p, d):
            e.shutdown()
