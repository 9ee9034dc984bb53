"""Triton SSD prefill scan vs `ssd_prefill_ref` on fresh random inputs.

Runs on CUDA where present, else in Triton's CPU interpreter (small shapes); skips without
triton. Grid: head/group ratios, head and state dims that are not powers of two, lengths that
are not multiples of the chunk, varlen batches mixing fresh and continuing sequences with
scattered pool slots, NaN in slots read without an initial state, fp32 and bf16 pools.
"""

from __future__ import annotations

import pytest
import torch
from triton_setup import DEVICE, qsl, rel_err

pytest.importorskip("triton")

from hybridpd.kernels.ssd import ssd_prefill_ref  # noqa: E402
from hybridpd.kernels.triton_ssd import ssd_chunk_metadata, ssd_prefill_triton  # noqa: E402


def _inputs(lens: list[int], H: int, G: int, P: int, N: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    T = sum(lens)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(DEVICE)

    return dict(x=r(T, H, P).to(dtype), dt_raw=r(T, H).to(dtype), A=-torch.exp(r(H) * 0.5),
                B=r(T, G, N).to(dtype), C=r(T, G, N).to(dtype), D=r(H), dt_bias=r(H, scale=0.5))


def _pool(nb: int, H: int, P: int, N: int, ids: list[int], has_init: list[bool],
          dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random states in slots with an initial state, NaN everywhere else."""
    g = torch.Generator().manual_seed(seed)
    pool = torch.full((nb, H, P, N), float("nan"), dtype=dtype)
    for i, h in zip(ids, has_init):
        if h:
            pool[i] = torch.randn(H, P, N, generator=g).to(dtype)
    return pool.to(DEVICE)


def _run(fn, inp, pool, ids, loc, has_init, chunk, **kw):
    return fn(inp["x"], inp["dt_raw"], inp["A"], inp["B"], inp["C"], inp["D"], inp["dt_bias"],
              pool, ids, loc, has_init, chunk_size=chunk, **kw)


GRID = [  # (lens, H, G, P, N, chunk)
    ([37], 4, 2, 16, 16, 16),  # one fresh sequence, ragged last chunk
    ([1, 37, 16, 5, 70], 4, 2, 16, 16, 16),  # 1 token, exact chunk, several chunks
    ([20, 9, 33], 6, 3, 8, 12, 16),  # P, N not powers of two
    ([3, 40], 4, 1, 16, 16, 32),  # one group for all heads
    ([50, 2, 17], 2, 2, 16, 32, 8),  # one head per group, small chunk
]


@pytest.mark.parametrize("lens,H,G,P,N,chunk", GRID)
@pytest.mark.parametrize("dtype,state_dtype", [(torch.float32, torch.float32),
                                               (torch.bfloat16, torch.float32),
                                               (torch.bfloat16, torch.bfloat16)])
def test_matches_reference(lens, H, G, P, N, chunk, dtype, state_dtype):
    seed = sum(lens) + H * 3 + chunk
    inp = _inputs(lens, H, G, P, N, dtype, seed)
    nb = 2 * len(lens) + 3
    ids = torch.randperm(nb - 1, generator=torch.Generator().manual_seed(seed))[: len(lens)] + 1
    has_init = [i % 2 == 1 for i in range(len(lens))]  # fresh and continuing, interleaved
    pool = _pool(nb, H, P, N, ids.tolist(), has_init, state_dtype, seed)
    ids, hi, loc = ids.to(DEVICE), torch.tensor(has_init, device=DEVICE), qsl(lens)
    ref_pool = pool.clone()
    ref = _run(ssd_prefill_ref, inp, ref_pool, ids, loc, hi, chunk)
    out = _run(ssd_prefill_triton, inp, pool, ids, loc, hi, chunk)
    assert out.shape == inp["x"].shape and out.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert rel_err(out, ref) < tol
    assert pool.dtype == state_dtype
    assert rel_err(pool[ids], ref_pool[ids]) < (tol if state_dtype == torch.float32 else 2e-2)
    others = torch.ones(nb, dtype=torch.bool, device=DEVICE)
    others[ids] = False  # untouched slots keep their bytes (NaN here)
    assert torch.isnan(pool[others]).all()


def test_precomputed_chunks_and_pool_view_strides():
    """A pool slice with padding between slots (as the unified page pool has) and a chunk
    list built once give the same result as the reference."""
    lens, H, G, P, N, chunk = [13, 30], 4, 2, 16, 16, 16
    inp = _inputs(lens, H, G, P, N, torch.float32, 7)
    raw = torch.randn(5, H * P * N + 40, device=DEVICE)  # per-slot padding after the state
    pool = raw[:, :H * P * N].view(5, H, P, N)
    ids, hi, loc = (torch.tensor([4, 1], device=DEVICE), torch.tensor([True, False],
                    device=DEVICE), qsl(lens))
    ref_pool = pool.clone()
    ref = _run(ssd_prefill_ref, inp, ref_pool, ids, loc, hi, chunk)
    chunks = ssd_chunk_metadata(loc, sum(lens), chunk)
    pad_before = raw[:, H * P * N:].clone()
    out = _run(ssd_prefill_triton, inp, pool, ids, loc, hi, chunk, chunks=chunks)
    assert rel_err(out, ref) < 1e-5 and rel_err(pool[ids], ref_pool[ids]) < 1e-5
    assert torch.equal(raw[:, H * P * N:], pad_before)


def test_chunk_metadata():
    loc = qsl([5, 0, 16, 17])
    ch = ssd_chunk_metadata(loc, 38, 16)
    assert ch.num_chunks == 38 // 16 + 4
    starts, lengths = ch.chunk_start.tolist(), ch.chunk_len.tolist()
    assert starts[:4] == [0, 5, 21, 37]
    assert lengths == [5, 16, 16, 1] + [0] * (ch.num_chunks - 4)
    assert ch.seq_chunk_start.tolist() == [0, 1, 1, 2, 4]


def test_bad_shapes_are_refused():
    inp = _inputs([4], 4, 2, 16, 16, torch.float32, 0)
    pool = torch.zeros(2, 4, 16, 16, device=DEVICE)
    ids, hi = torch.tensor([1], device=DEVICE), torch.tensor([False], device=DEVICE)
    with pytest.raises(ValueError, match="ssm_states"):
        _run(ssd_prefill_triton, inp, pool[:, :, :8], ids, qsl([4]), hi, 16)
    with pytest.raises(ValueError, match="groups"):
        bad = dict(inp, B=inp["B"][:, :1].expand(4, 3, 16), C=inp["C"][:, :1].expand(4, 3, 16))
        _run(ssd_prefill_triton, bad, pool, ids, qsl([4]), hi, 16)


@pytest.mark.gpu
@pytest.mark.parametrize("H,P", [(128, 64), (64, 64), (128, 80)])  # 8B, 30B-A3B, Nano-9B
def test_model_shapes_on_gpu(H, P):
    lens, G, N, chunk = [1000, 1, 129, 300, 128], 8, 128, 128
    inp = _inputs(lens, H, G, P, N, torch.bfloat16, H + P)
    ids = torch.tensor([3, 9, 1, 6, 4], device=DEVICE)
    has_init = [True, True, False, True, False]
    pool = _pool(12, H, P, N, ids.tolist(), has_init, torch.float32, 1)
    hi, loc = torch.tensor(has_init, device=DEVICE), qsl(lens)
    ref_pool = pool.clone()
    ref = _run(ssd_prefill_ref, inp, ref_pool, ids, loc, hi, chunk)
    out = _run(ssd_prefill_triton, inp, pool, ids, loc, hi, chunk)
    assert rel_err(out, ref) < 2e-2 and rel_err(pool[ids], ref_pool[ids]) < 2e-2


@pytest.mark.parametrize("tune", [dict(fused_state=False, pass_block=256, pass_warps=2),
                                  dict(fused_state=False, lowp_dot=True, scan_warps=4,
                                       state_warps=8),
                                  dict(fused_state=True, fused_p=16),
                                  dict(fused_state=True, fused_p=32)])
def test_launch_choices_agree(tune):
    """Other launch choices compute the same function (lowp_dot only changes rounding of
    half-precision inputs; here they are fp32)."""
    lens, H, G, P, N = [20, 45, 1], 4, 2, 32, 16
    inp = _inputs(lens, H, G, P, N, torch.float32, 11)
    pool = _pool(5, H, P, N, [3, 1, 4], [True, False, True], torch.float32, 11)
    ids, hi, loc = (torch.tensor([3, 1, 4], device=DEVICE),
                    torch.tensor([True, False, True], device=DEVICE), qsl(lens))
    ref_pool = pool.clone()
    ref = _run(ssd_prefill_ref, inp, ref_pool, ids, loc, hi, 16)
    out = _run(ssd_prefill_triton, inp, pool, ids, loc, hi, 16, tune=tune)
    assert rel_err(out, ref) < 1e-5 and rel_err(pool[ids], ref_pool[ids]) < 1e-5
