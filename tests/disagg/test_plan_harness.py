"""Byte-copy harness for the read planner, and proof that the harness catches wrong plans.

`run_transfer` builds real P pools (random bytes, then a full TP = 1 state written through each
P rank's views, sharded by rank), plans every D rank's reads, executes them by copying bytes,
and checks independently of the planner:
  * reading D through its views gives exactly the D rank's shard of the full state;
  * the dst ranges cover exactly the request's bytes on D, each once (no overlap, no gap);
  * every other D byte is untouched;
  * src ranges do not overlap and lie inside the request's bytes on P (padding never read);
  * total bytes == the size of the D rank's shard computed from the model numbers.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "cache"))

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from cache_testlib import (  # noqa: E402
    TINY,
    TINY_PATTERN,
    kv_heads_of_rank,
    model,
    owned_mask,
    random_bytes,
    random_state,
    read_state,
    shard,
    write_state,
)

from hybridpd.cache.geometry import CacheGeometry  # noqa: E402
from hybridpd.cache.tensors import PoolTensors  # noqa: E402
from hybridpd.config import DTYPE_BYTES, LayerKind, ModelConfig  # noqa: E402
from hybridpd.disagg.params import PeerGeometry  # noqa: E402
from hybridpd.disagg.plan import ReadPlan, plan_reads  # noqa: E402

torch.set_num_threads(1)
Mutate = Callable[[list[ReadPlan]], list[ReadPlan]]


@dataclass(frozen=True)
class Transfer:
    p_tp: int
    d_tp: int
    p_kb: int
    d_kb: int
    num_tokens: int
    p_ids: list[list[int]]  # per group: attention groups, then Mamba groups
    d_ids: list[list[int]]
    p_blocks: int  # pool sizes (null block included)
    d_blocks: int


def expected_bytes(m: ModelConfig, kv_dtype: str, d_tp: int, d_rank: int, n: int) -> int:
    """Bytes of D rank `d_rank`'s shard of an n-token state, from the model numbers."""
    heads = len(kv_heads_of_rank(m.num_key_value_heads, d_tp, d_rank))
    kv = n * heads * 2 * m.head_dim * DTYPE_BYTES[kv_dtype]
    conv = m.conv_dim // d_tp * (m.conv_kernel - 1) * DTYPE_BYTES[m.dtype]
    ssm = m.mamba_num_heads // d_tp * m.mamba_head_dim * m.ssm_state_size * DTYPE_BYTES[
        m.ssm_state_dtype]
    return (kv * len(m.layers_of(LayerKind.ATTENTION))
            + (conv + ssm) * len(m.layers_of(LayerKind.MAMBA)))


def _range_mask(offsets: np.ndarray, lengths: np.ndarray, nbytes: int) -> np.ndarray:
    """uint8 mask of the union of ranges; asserts they are in bounds and do not overlap."""
    order = np.argsort(offsets, kind="stable")
    off, ln = offsets[order], lengths[order]
    assert (ln > 0).all(), "empty descriptor"
    assert off.size == 0 or (off[0] >= 0 and off[-1] + ln[-1] <= nbytes), "out of bounds"
    assert (off[1:] >= off[:-1] + ln[:-1]).all(), "two ranges overlap"
    mask = np.zeros(nbytes, dtype=np.uint8)
    for o, l in zip(off.tolist(), ln.tolist()):
        mask[o : o + l] = 1
    return mask


def _build_p(m: ModelConfig, t: Transfer, kv_dtype: str, seed: int):
    state = random_state(m, t.num_tokens, kv_dtype, seed)
    pools, peers = [], []
    for p in range(t.p_tp):
        geo = CacheGeometry.build(m, t.p_tp, p, t.p_kb, kv_dtype)
        pool = PoolTensors(geo, t.p_blocks)
        random_bytes(pool, seed + 100 + p)
        write_state(pool, shard(m, state, t.p_tp, p), t.p_ids, t.num_tokens)
        pools.append(pool)
        peers.append(PeerGeometry.from_cache(geo, t.p_blocks, pool.data_ptr()))
    return state, pools, peers


def run_transfer(m: ModelConfig, t: Transfer, kv_dtype: str | None = None, seed: int = 0,
                 mutate: Mutate | None = None) -> list[list[ReadPlan]]:
    """Plan and execute every D rank's reads; assert the checks above. Returns the plans."""
    kv_dtype = kv_dtype or m.dtype
    state, p_pools, p_peers = _build_p(m, t, kv_dtype, seed)
    p_owned = [owned_mask(pool.geometry, t.p_blocks, t.p_ids, t.num_tokens) for pool in p_pools]
    all_plans = []
    for d in range(t.d_tp):
        geo = CacheGeometry.build(m, t.d_tp, d, t.d_kb, kv_dtype)
        pool = PoolTensors(geo, t.d_blocks)
        random_bytes(pool, seed + 200 + d)
        before = pool.buffer.numpy().reshape(-1).copy()
        me = PeerGeometry.from_cache(geo, t.d_blocks, pool.data_ptr())
        plans = plan_reads(me, t.d_ids, p_peers, t.p_ids, t.num_tokens)
        plans = mutate(plans) if mutate else plans
        dst = pool.buffer.numpy().reshape(-1)
        for plan in plans:
            src = p_pools[plan.p_rank].buffer.numpy().reshape(-1)
            assert plan.src_offset.dtype == plan.dst_offset.dtype == np.int64
            src_mask = _range_mask(plan.src_offset, plan.length, src.size)
            assert not (src_mask & (p_owned[plan.p_rank] == 0)).any(), "read outside request"
            for s, o, l in zip(plan.src_offset.tolist(), plan.dst_offset.tolist(),
                               plan.length.tolist()):
                dst[o : o + l] = src[s : s + l]
        offs = np.concatenate([p.dst_offset for p in plans])
        lens = np.concatenate([p.length for p in plans])
        written = _range_mask(offs, lens, dst.size)
        owned = owned_mask(geo, t.d_blocks, t.d_ids, t.num_tokens)
        assert np.array_equal(written, owned), "dst ranges != the request's bytes on D"
        assert np.array_equal(dst[owned == 0], before[owned == 0]), "a foreign byte changed"
        assert sum(p.total_bytes for p in plans) == expected_bytes(m, kv_dtype, t.d_tp, d,
                                                                   t.num_tokens)
        want = shard(m, state, t.d_tp, d)
        got = read_state(pool, want, t.d_ids, t.num_tokens)
        for kind in ("kv", "conv", "ssm"):
            for layer, tensor in getattr(want, kind).items():
                assert torch.equal(getattr(got, kind)[layer], tensor), (kind, layer)
        all_plans.append(plans)
    return all_plans


def tiny_transfer(p_tp: int = 1, d_tp: int = 1, n: int = 13) -> Transfer:
    """TINY model, 3 Mamba groups + 1 attention group; P blocks non-consecutive."""
    geo = CacheGeometry.build(model(TINY, TINY_PATTERN), kernel_block_size=2)
    k = geo.attn_blocks_for_tokens(n)
    p_ids = [[9, 3, 7, 1][:k], [2], [5], [8]]
    d_ids = [[2, 4, 6, 8][:k], [7], [1], [3]]
    return Transfer(p_tp, d_tp, 2, 2, n, p_ids, d_ids, 10, 9)


# ---- the harness is able to fail ---------------------------------------------------------
def _shift_dst(plans: list[ReadPlan]) -> list[ReadPlan]:
    p = plans[0]
    return [ReadPlan(p.p_rank, p.src_offset, p.dst_offset + 1, p.length), *plans[1:]]


def _drop_last(plans: list[ReadPlan]) -> list[ReadPlan]:
    p = plans[-1]
    return [*plans[:-1], ReadPlan(p.p_rank, p.src_offset[:-1], p.dst_offset[:-1], p.length[:-1])]


def _read_padding(plans: list[ReadPlan]) -> list[ReadPlan]:
    p = plans[0]
    length = p.length.copy()
    length[np.argmax(p.length)] += 4  # one byte range too long: reads past the state
    return [ReadPlan(p.p_rank, p.src_offset, p.dst_offset, length), *plans[1:]]


def _swap_sources(plans: list[ReadPlan]) -> list[ReadPlan]:
    p = plans[0]
    return [ReadPlan(p.p_rank, p.src_offset[::-1].copy(), p.dst_offset, p.length), *plans[1:]]


@pytest.mark.parametrize("mutate", [_shift_dst, _drop_last, _read_padding, _swap_sources])
def test_harness_rejects_a_wrong_plan(mutate):
    m = model(TINY, TINY_PATTERN)
    run_transfer(m, tiny_transfer(1, 2))  # the real plan passes
    with pytest.raises(AssertionError):
        run_transfer(m, tiny_transfer(1, 2), mutate=mutate)
