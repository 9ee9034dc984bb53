"""PoolTensors: one uint8 buffer; every view writes exactly the documented bytes."""

from __future__ import annotations

import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402
import torch  # noqa: E402
from cache_testlib import EIGHT_B, PATTERN_8B, TINY, TINY_GAP, TINY_PATTERN, model  # noqa: E402

from hybridpd.cache.geometry import CacheGeometry  # noqa: E402
from hybridpd.cache.tensors import TORCH_DTYPES, PoolTensors, num_blocks_for_budget  # noqa: E402

torch.set_num_threads(1)


def _bytes_of(value: float, dtype: str) -> torch.Tensor:
    return torch.tensor([value], dtype=TORCH_DTYPES[dtype]).view(torch.uint8)


def _poke(pool: PoolTensors, view: torch.Tensor, index: tuple, offset: int, dtype: str) -> None:
    """Write 1.75 at view[index]; exactly its bytes at `offset` of the flat buffer change."""
    flat = pool.buffer.view(-1)
    before = flat.clone()
    view[index] = 1.75
    expect = _bytes_of(1.75, dtype).to(flat.device)
    size = expect.numel()
    assert torch.equal(flat[offset : offset + size], expect)
    changed = torch.nonzero(flat != before).flatten().cpu()
    assert changed.min() >= offset and changed.max() < offset + size
    view[index] = 0.0


@pytest.mark.parametrize("shape, dtype, kb", [(TINY, "bfloat16", 2), (TINY_GAP, "float16", 3)])
def test_views_hit_documented_offsets(shape, dtype, kb, device):
    geo = CacheGeometry.build(model(shape, TINY_PATTERN, dtype=dtype), kernel_block_size=kb)
    pool = PoolTensors(geo, 5, device)
    assert pool.buffer.shape == (5, geo.num_regions, geo.page_bytes)
    assert pool.buffer.dtype == torch.uint8 and int(pool.buffer.count_nonzero()) == 0
    S, page, T, hd = geo.num_regions, geo.page_bytes, geo.block_tokens, geo.head_dim
    kvb, cb, sb = geo.kv_itemsize, geo.conv_itemsize, geo.ssm_itemsize
    for layer in (2, 7):
        region = geo.layer_location(layer)[1]
        kv = pool.kv_view(layer)
        assert kv.shape == (5, geo.kv_heads_local, 2, T, hd) and kv.dtype == TORCH_DTYPES[dtype]
        for b, h, c, t, d in ((3, 0, 1, T - 1, hd - 1), (1, geo.kv_heads_local - 1, 0, 1, 0)):
            off = (b * S + region) * page + (((h * 2 + c) * T + t) * hd + d) * kvb
            _poke(pool, kv, (b, h, c, t, d), off, dtype)
    K1 = geo.conv_state_len
    for layer in (0, 8, 9):
        region = geo.layer_location(layer)[1]
        conv, ssm = pool.conv_view(layer), pool.ssm_view(layer)
        assert conv.shape == (5, geo.conv_channels_local, K1)
        assert ssm.shape == (5, geo.mamba_heads_local, geo.mamba_head_dim, geo.ssm_state_size)
        base = (4 * S + region) * page
        ch = geo.conv_channels_local - 1
        _poke(pool, conv, (4, ch, K1 - 1), base + (ch * K1 + K1 - 1) * cb, dtype)
        P, N = geo.mamba_head_dim, geo.ssm_state_size
        h, p, n = geo.mamba_heads_local - 1, P - 1, 1
        _poke(pool, ssm, (4, h, p, n), base + geo.ssm_offset + ((h * P + p) * N + n) * sb,
              "float32")


def test_views_alias_the_one_buffer_and_group_index():
    geo = CacheGeometry.build(model(TINY, TINY_PATTERN), kernel_block_size=2)
    pool = PoolTensors(geo, 4)
    ptr, end = pool.data_ptr(), pool.data_ptr() + pool.nbytes
    for v in (pool.kv_view(2), pool.conv_view(9), pool.ssm_view(5)):
        assert ptr <= v.data_ptr() < end
    assert pool.kv_view(2) is pool.kv_view(2)
    assert [pool.group_index(layer) for layer in (2, 7, 0, 3, 5, 8, 9)] == [0, 0, 0, 0, 1, 1, 2]
    with pytest.raises(KeyError):
        pool.kv_view(0)
    with pytest.raises(KeyError):
        pool.ssm_view(2)


def test_regions_are_disjoint_and_groups_share_pages():
    geo = CacheGeometry.build(model(TINY, TINY_PATTERN), kernel_block_size=2)
    pool = PoolTensors(geo, 3)
    group0 = (0, 3)  # Mamba group 0: regions 0 and 1
    for i, layer in enumerate(group0):
        pool.conv_view(layer).fill_(i + 1)
        pool.ssm_view(layer).fill_(10 * (i + 1))
    for i, layer in enumerate(group0):
        assert bool((pool.conv_view(layer) == i + 1).all())
        assert bool((pool.ssm_view(layer) == 10 * (i + 1)).all())
    # Layer 5 (Mamba group 1, region 0) and layer 2 (attention, region 0) use the same pages
    # as layer 0: one block id holds one group's page at a time.
    assert pool.conv_view(5).data_ptr() == pool.conv_view(0).data_ptr()
    assert pool.kv_view(2).data_ptr() == pool.conv_view(0).data_ptr()
    pool.kv_view(7).fill_(5.0)  # region 1 only
    assert bool((pool.conv_view(0) == 1).all()) and bool((pool.ssm_view(0) == 10).all())


def test_8b_buffer_budget():
    geo = CacheGeometry.build(model(EIGHT_B, PATTERN_8B))
    assert num_blocks_for_budget(geo, 10 * geo.block_bytes + 5) == 10
    assert num_blocks_for_budget(geo, geo.block_bytes - 1) == 0
    assert geo.block_bytes == 4 * 65 * 65536
