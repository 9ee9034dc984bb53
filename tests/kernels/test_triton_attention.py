"""Triton paged prefill attention vs `paged_attention_ref` on fresh random inputs.

Runs on CUDA where present, else in Triton's CPU interpreter (small shapes); skips without
triton. Grid: GQA ratios, head dims, block sizes that are not multiples of the kernel tile,
varlen batches mixing fresh prefills, continuing prefills (cached prefix) and decode rows,
scattered block ids, NaN in every pool byte a sequence does not own.
"""

from __future__ import annotations

import pytest
import torch
from triton_setup import DEVICE, HAS_CUDA, qsl, rel_err

pytest.importorskip("triton")

from hybridpd.kernels.attention import paged_attention_ref, write_kv_ref  # noqa: E402
from hybridpd.kernels.triton_attention import paged_attention_triton  # noqa: E402


def _case(hq: int, hkv: int, d: int, bt: int, ctx: list[int], new: list[int],
          dtype: torch.dtype, seed: int):
    """q, a NaN-poisoned cache holding each sequence's context + new K/V, block table etc."""
    g = torch.Generator().manual_seed(seed)
    nseq = len(ctx)
    width = max(-(-(c + n) // bt) for c, n in zip(ctx, new)) + 1  # one spare column
    nb = nseq * width + 3
    perm = torch.randperm(nb - 1, generator=g)[: nseq * width] + 1  # never block 0
    block_table = perm.view(nseq, width).clone()
    block_table[:, -1] = 0  # spare column -> the NaN null block
    kv = torch.full((nb, hkv, 2, bt, d), float("nan"), dtype=dtype)
    for b, (c, n) in enumerate(zip(ctx, new)):
        pos = torch.arange(c + n)
        slots = block_table[b, pos // bt] * bt + pos % bt
        write_kv_ref(torch.randn(c + n, hkv, d, generator=g),
                     torch.randn(c + n, hkv, d, generator=g), kv, slots)
    q = torch.randn(sum(new), hq, d, generator=g).to(dtype)
    seq_lens = torch.tensor([c + n for c, n in zip(ctx, new)], dtype=torch.int64)
    return (q.to(DEVICE), kv.to(DEVICE), block_table.to(DEVICE), qsl(new),
            seq_lens.to(DEVICE))


GRID = [  # (hq, hkv, d, bt, ctx, new)
    (4, 2, 16, 3, [0], [37]),  # one fresh prefill over several tiles, tiny blocks
    (4, 2, 16, 20, [5, 0, 40, 17], [20, 33, 1, 1]),  # continuing, fresh, decode rows
    (2, 2, 32, 16, [0, 31], [16, 17]),  # block = tile, MHA
    (6, 1, 16, 7, [9, 0, 3], [30, 5, 18]),  # group 6
    (8, 2, 24, 10, [13, 0], [19, 26]),  # head dim not a power of two
    (4, 2, 8, 7, [3, 0], [12, 9]),  # head dim 8 (the tiny test models), padded to 16
]


@pytest.mark.parametrize("hq,hkv,d,bt,ctx,new", GRID)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference(hq, hkv, d, bt, ctx, new, dtype):
    q, kv, table, loc, seq_lens = _case(hq, hkv, d, bt, ctx, new, dtype, seed=hq * 7 + bt)
    scale = d ** -0.5
    ref = paged_attention_ref(q, kv, table, loc, seq_lens, scale)
    out = paged_attention_triton(q, kv, table, loc, seq_lens, scale, max_query_len=max(new))
    assert out.shape == q.shape and out.dtype == q.dtype
    assert rel_err(out, ref) < (1e-5 if dtype == torch.float32 else 1e-2)


def test_max_query_len_is_optional_and_strided_q_is_read_in_place():
    q, kv, table, loc, seq_lens = _case(4, 2, 16, 5, [3, 0], [9, 12], torch.float32, seed=1)
    wide = torch.randn(q.shape[0], 4, 2 * 16, device=DEVICE)
    wide[..., :16] = q  # q as a strided view (row stride 2 * Hq * D)
    ref = paged_attention_ref(q, kv, table, loc, seq_lens, 0.25)
    out = paged_attention_triton(wide[..., :16], kv, table, loc, seq_lens, 0.25)
    assert rel_err(out, ref) < 1e-5


def test_bad_shapes_are_refused():
    q, kv, table, loc, seq_lens = _case(4, 2, 16, 5, [0], [4], torch.float32, seed=2)
    with pytest.raises(ValueError, match="head_dim"):
        paged_attention_triton(q[..., :8], kv, table, loc, seq_lens, 0.25)
    with pytest.raises(ValueError, match="disagree"):
        paged_attention_triton(q, kv, table, loc[:1], seq_lens, 0.25)


@pytest.mark.skipif(HAS_CUDA, reason="CPU tensors are refused only outside the interpreter")
def test_cpu_tensors_need_the_interpreter(monkeypatch):
    q, kv, table, loc, seq_lens = _case(4, 2, 16, 5, [0], [4], torch.float32, seed=3)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CUDA"):
        paged_attention_triton(q, kv, table, loc, seq_lens, 0.25)


@pytest.mark.gpu
@pytest.mark.parametrize("hq,hkv", [(32, 8), (32, 2), (40, 8)])  # 8B, 30B-A3B, Nano-9B
def test_model_shapes_on_gpu(hq, hkv):
    ctx, new = [0, 2100, 1039, 0, 500], [1500, 700, 1, 3, 1041]
    q, kv, table, loc, seq_lens = _case(hq, hkv, 128, 1040, ctx, new, torch.bfloat16, seed=hq)
    ref = paged_attention_ref(q, kv, table, loc, seq_lens, 128 ** -0.5)
    out = paged_attention_triton(q, kv, table, loc, seq_lens, 128 ** -0.5, max(new))
    assert rel_err(out, ref) < 1e-2


@pytest.mark.parametrize("config", [(16, 16, 4, 1, True), (32, 16, 4, 1, False)])
def test_tile_configs_agree(config):
    """Other tilings (K loaded as rows, taller query tiles) compute the same function."""
    q, kv, table, loc, seq_lens = _case(4, 2, 16, 7, [9, 0], [30, 21], torch.float32, seed=5)
    ref = paged_attention_ref(q, kv, table, loc, seq_lens, 0.25)
    out = paged_attention_triton(q, kv, table, loc, seq_lens, 0.25, 30, config=config)
    assert rel_err(out, ref) < 1e-5
