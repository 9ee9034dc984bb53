"""The seed's descriptor scheme vs our planner: same bytes, many more descriptors."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from hybridpd.bench.seed_plan import seed_read  # noqa: E402
from hybridpd.bench.transfer_case import TransferCase, model_from_preset  # noqa: E402
from hybridpd.disagg.plan import coalesce, plan_read  # noqa: E402

MODEL = model_from_preset("nemotron-h-8b", num_layers=10)  # M-M-M-M*-M: 1 attn, 5 Mamba layers


def _plans(case: TransferCase):
    d = case.d_side()
    out = []
    for p_rank in case.p_ranks:
        p = case.p_side(p_rank)
        args = (d.peer(), d.block_ids, p.peer(), p.block_ids, case.num_tokens)
        out.append((p, d, plan_read(*args), seed_read(*args)))
    return out


def _in_bounds_and_disjoint(plan, src_side, dst_side) -> None:
    assert np.all(plan.length > 0)
    assert plan.src_offset.min() >= 0 and plan.dst_offset.min() >= 0
    src_limit = src_side.num_blocks * src_side.geometry.block_bytes
    dst_limit = dst_side.num_blocks * dst_side.geometry.block_bytes
    assert (plan.src_offset + plan.length).max() <= src_limit
    assert (plan.dst_offset + plan.length).max() <= dst_limit
    order = np.argsort(plan.dst_offset)
    ends = (plan.dst_offset + plan.length)[order]
    assert np.all(plan.dst_offset[order][1:] >= ends[:-1])  # no byte written twice


def test_tp1_seed_covers_the_same_bytes_as_ours() -> None:
    geo = TransferCase(MODEL, 16).d_side().geometry
    tokens = 2 * geo.block_tokens  # whole logical blocks: both schemes cover whole pages
    (p, d, ours, seed), = _plans(TransferCase(MODEL, tokens))
    kernel_blocks = tokens // geo.kernel_block_size
    attn_layers = sum(len(g) for g in geo.attention_groups)
    mamba_layers = sum(len(g) for g in geo.mamba_groups)
    assert seed.num_descriptors == attn_layers * kernel_blocks * 2 + mamba_layers * 4
    merged = coalesce(seed.src_offset, seed.dst_offset, seed.length)
    for a, b in zip(merged, (ours.src_offset, ours.dst_offset, ours.length)):
        np.testing.assert_array_equal(a, b)
    assert ours.num_descriptors * 10 < seed.num_descriptors
    _in_bounds_and_disjoint(seed, p, d)


@pytest.mark.parametrize("p_tp,d_tp", [(1, 1), (1, 2), (2, 1), (2, 4), (4, 2), (1, 8)])
def test_heterogeneous_tp_same_bytes(p_tp: int, d_tp: int) -> None:
    tokens = 8192  # a multiple of the kernel block: both schemes move exactly the same bytes
    total_ours = total_seed = 0
    for d_rank in range(d_tp):
        for p, d, ours, seed in _plans(TransferCase(MODEL, tokens, p_tp, d_tp, d_rank)):
            assert seed.total_bytes == ours.total_bytes
            assert seed.num_descriptors > ours.num_descriptors
            _in_bounds_and_disjoint(seed, p, d)
            total_ours += ours.total_bytes
            total_seed += seed.total_bytes
    one = sum(ours.total_bytes for *_, ours, _ in _plans(TransferCase(MODEL, tokens)))
    if d_tp <= MODEL.num_key_value_heads:  # no replicated heads: every byte is read once
        assert total_ours == one
    assert total_seed == total_ours


def test_seed_reads_whole_kernel_blocks() -> None:
    (_, d, ours, seed), = _plans(TransferCase(MODEL, 17))
    geo = d.geometry
    row = geo.head_dim * geo.kv_itemsize * geo.kv_heads_local * 2  # one token, K and V
    attn_layers = sum(len(g) for g in geo.attention_groups)
    assert seed.total_bytes - ours.total_bytes == attn_layers * (32 - 17) * row
