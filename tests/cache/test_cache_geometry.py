"""CacheGeometry: groups, page sizes, offsets, TP shards and validation at real model shapes."""

from __future__ import annotations

import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402
from cache_testlib import (  # noqa: E402
    EIGHT_B,
    NANO_30B,
    PATTERN_8B,
    PATTERN_30B,
    TINY,
    TINY_GAP,
    TINY_PATTERN,
    model,
)

from hybridpd.cache.geometry import CacheGeometry  # noqa: E402

MiB = 1 << 20


def test_8b_groups_and_regions():
    m = model(EIGHT_B, PATTERN_8B)
    geo = CacheGeometry.build(m)
    attn = [i for i, c in enumerate(PATTERN_8B) if c == "*"]
    mamba = [i for i, c in enumerate(PATTERN_8B) if c == "M"]
    assert geo.num_regions == 4
    assert geo.attention_groups == (tuple(attn),)
    assert len(geo.mamba_groups) == 6
    assert [layer for g in geo.mamba_groups for layer in g] == mamba
    assert all(len(g) == 4 for g in geo.mamba_groups)
    assert geo.layer_location(attn[2]) == (0, 2)
    assert geo.layer_location(mamba[9]) == (2, 1)  # 10th Mamba layer: group 2, region 1
    assert geo.group_index(mamba[23]) == 5
    with pytest.raises(KeyError):
        geo.layer_location(1)  # an MLP layer has no cache


def test_8b_page_sizes_bf16_kv_fp32_ssm():
    geo = CacheGeometry.build(model(EIGHT_B, PATTERN_8B), kernel_block_size=16)
    assert geo.kernel_page_bytes == 64 * 1024  # 16 tok * 2 * 8 heads * 128 * 2 B
    assert geo.r == 65 and geo.block_tokens == 1040
    assert geo.x_bytes == 8192 * 3 * 2 and geo.bc_bytes == 1024 * 3 * 2
    assert (geo.x_offset, geo.b_offset, geo.c_offset) == (0, 49152, 55296)
    assert geo.conv_bytes == 10240 * 3 * 2 == 61440
    assert geo.ssm_offset == 61440
    assert geo.ssm_bytes == 4 * MiB
    assert geo.mamba_page_bytes == 61440 + 4 * MiB
    assert geo.page_bytes == 65 * 64 * 1024
    assert geo.page_bytes - geo.mamba_page_bytes == 4096  # padding at the end
    assert geo.attention_page_bytes == geo.page_bytes  # no attention padding
    assert geo.block_bytes == 4 * geo.page_bytes
    assert geo.page_offset(3, 2) == (3 * 4 + 2) * geo.page_bytes


def test_8b_kernel_block_size_changes_r_not_the_token_capacity_rule():
    m = model(EIGHT_B, PATTERN_8B)
    for kb in (1, 8, 32, 64, 2048):
        geo = CacheGeometry.build(m, kernel_block_size=kb)
        assert geo.page_bytes >= geo.mamba_page_bytes
        assert geo.page_bytes - geo.kernel_page_bytes < geo.mamba_page_bytes or geo.r == 1
        assert geo.block_tokens == geo.r * kb


def test_30b_groups_replicated_kv_and_sizes():
    m = model(NANO_30B, PATTERN_30B)
    geo = CacheGeometry.build(m)
    assert geo.num_regions == 6
    assert len(geo.attention_groups) == 1
    assert [len(g) for g in geo.mamba_groups] == [6, 6, 6, 5]  # last one padded
    assert geo.conv_bytes == (4096 + 2 * 1024) * 3 * 2
    assert geo.ssm_bytes == 64 * 64 * 128 * 4
    assert geo.kernel_page_bytes == 16 * 2 * 2 * 128 * 2
    assert geo.r == -(-(geo.conv_bytes + geo.ssm_bytes) // geo.kernel_page_bytes) == 131
    for tp, expect in ((2, [0, 1]), (4, [0, 0, 1, 1]), (8, [0, 0, 0, 0, 1, 1, 1, 1])):
        ranks = [CacheGeometry.build(m, tp, q) for q in range(tp)]
        assert [g.kv_head_start for g in ranks] == expect
        assert all(g.kv_heads_local == 1 for g in ranks)
        assert all(g.mamba_heads_local == 64 // tp for g in ranks)
        assert all(g.x_channels_local == 4096 // tp and g.bc_channels_local == 1024 // tp
                   for g in ranks)


def test_8b_tp4_local_sizes():
    m = model(EIGHT_B, PATTERN_8B)
    geos = [CacheGeometry.build(m, 4, q) for q in range(4)]
    assert [g.kv_head_start for g in geos] == [0, 2, 4, 6]
    g = geos[1]
    assert g.kv_heads_local == 2 and g.mamba_heads_local == 32
    assert g.x_bytes == 2048 * 6 and g.bc_bytes == 256 * 6
    assert g.ssm_bytes == MiB
    assert g.r == 65  # every piece shrank by 4


@pytest.mark.parametrize(
    "over, tp, words",
    [
        (dict(num_attention_heads=30), 4, ["num_attention_heads=30", "tp_size=4"]),
        (dict(mamba_num_heads=126), 4, ["mamba_num_heads=126", "tp_size=4"]),
        (dict(n_groups=6), 4, ["n_groups=6", "tp_size=4"]),
        (dict(num_key_value_heads=6, num_attention_heads=24), 4,
         ["num_key_value_heads=6", "tp_size=4"]),
    ],
)
def test_tp_validation_names_the_numbers(over, tp, words):
    m = model(dict(EIGHT_B, **over), PATTERN_8B)
    with pytest.raises(ValueError) as err:
        CacheGeometry.build(m, tp, 0)
    assert all(w in str(err.value) for w in words), str(err.value)


def test_kv_heads_replicable_when_tp_exceeds_them():
    m = model(dict(EIGHT_B, n_groups=16), PATTERN_8B)
    geos = [CacheGeometry.build(m, 16, q) for q in range(16)]
    assert [g.kv_head_start for g in geos] == [q // 2 for q in range(16)]
    with pytest.raises(ValueError):
        CacheGeometry.build(m, 4, 4)  # rank out of range


def test_models_without_attention_or_without_mamba():
    only_mamba = CacheGeometry.build(model(TINY, "M-M-MM"))
    assert only_mamba.num_regions == 4 and only_mamba.attention_groups == ()
    assert only_mamba.mamba_groups == ((0, 2, 4, 5),)
    assert only_mamba.r == 1 and only_mamba.page_bytes >= only_mamba.mamba_page_bytes
    assert only_mamba.page_bytes % 16 == 0
    only_attn = CacheGeometry.build(model(TINY, "*-*-*"), kernel_block_size=4)
    assert only_attn.num_regions == 3 and only_attn.mamba_groups == ()
    assert only_attn.r == 1
    assert only_attn.page_bytes == only_attn.kernel_page_bytes == 4 * 2 * 2 * 4 * 2
    assert only_attn.mamba_page_bytes == 0
    with pytest.raises(ValueError):
        CacheGeometry.build(model(TINY, "--"))


def test_tiny_padded_group_and_ssm_alignment_gap():
    geo = CacheGeometry.build(model(TINY, TINY_PATTERN), kernel_block_size=2)
    assert geo.attention_groups == ((2, 7),)
    assert geo.mamba_groups == ((0, 3), (5, 8), (9,))
    assert geo.layer_location(9) == (2, 0)
    gap = CacheGeometry.build(model(TINY_GAP, TINY_PATTERN, dtype="float16"), kernel_block_size=4)
    assert gap.conv_bytes == 12 * 3 * 2 == 72
    assert gap.ssm_offset == 80 and gap.mamba_page_bytes == 80 + 2 * 2 * 2 * 4
    assert gap.r == 3 and gap.page_bytes == 3 * 4 * 2 * 1 * 3 * 2


def test_compat_hash_ignores_tp_and_block_sizes_but_not_bytes():
    m = model(EIGHT_B, PATTERN_8B)
    base = CacheGeometry.build(m).compat_hash()
    assert len(base) == 64 and int(base, 16) >= 0
    assert CacheGeometry.build(m, 4, 3, kernel_block_size=64).compat_hash() == base
    differs = [
        CacheGeometry.build(m, kv_dtype="float32"),
        CacheGeometry.build(model(EIGHT_B, PATTERN_8B, ssm="bfloat16")),
        CacheGeometry.build(model(EIGHT_B, PATTERN_8B, dtype="float16")),
        CacheGeometry.build(model(dict(EIGHT_B, ssm_state_size=64), PATTERN_8B)),
        CacheGeometry.build(model(dict(EIGHT_B, num_key_value_heads=4), PATTERN_8B)),
        CacheGeometry.build(model(EIGHT_B, PATTERN_8B[1:] + "M")),
    ]
    hashes = {g.compat_hash() for g in differs}
    assert base not in hashes and len(hashes) == len(differs)
