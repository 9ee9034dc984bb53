"""Paged attention and KV write reference ops vs a naive per-query softmax."""

from __future__ import annotations

import math
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from hybridpd.kernels import paged_attention_ref, write_kv_ref  # noqa: E402

torch.set_num_threads(1)
D = 4


def _slots(block_table: torch.Tensor, positions: list[int], b: int, bt: int) -> list[int]:
    return [int(block_table[b, p // bt]) * bt + p % bt for p in positions]


def _naive(q, k_all, v_all, ctx: int, scale: float) -> torch.Tensor:
    """One sequence: q (L, Hq, D) at positions ctx..ctx+L-1; k_all, v_all (ctx+L, Hkv, D)."""
    hq, hkv = q.shape[1], k_all.shape[1]
    out = torch.empty(q.shape, dtype=torch.float64)
    for i in range(q.shape[0]):
        pos = ctx + i
        for h in range(hq):
            kv_h = h // (hq // hkv)
            s = [float(q[i, h].double() @ k_all[j, kv_h].double()) * scale for j in range(pos + 1)]
            m = max(s)
            w = [math.exp(v - m) for v in s]
            acc = sum(w[j] * v_all[j, kv_h].double() for j in range(pos + 1))
            out[i, h] = acc / sum(w)
    return out


def _case(hq, hkv, bt, ctx, new, device, cache_dtype=torch.float32, seed=0):
    """Cache (NaN where unused) holding each sequence's context, plus this step's q, k, v."""
    g = torch.Generator().manual_seed(seed)
    nseq, nb = len(ctx), 24
    max_blocks = max(-(-(c + n) // bt) for c, n in zip(ctx, new)) + 1  # one spare column
    perm = torch.randperm(nb - 1, generator=g)[: nseq * max_blocks] + 1
    block_table = perm.view(nseq, max_blocks).clone()  # non-consecutive logical block ids
    block_table[:, -1] = 0  # spare column points at the NaN-filled null block
    kv_cache = torch.full((nb, hkv, 2, bt, D), float("nan"), dtype=cache_dtype)
    k_all = [torch.randn(c + n, hkv, D, generator=g) for c, n in zip(ctx, new)]
    v_all = [torch.randn(c + n, hkv, D, generator=g) for c, n in zip(ctx, new)]
    for b, c in enumerate(ctx):  # the prefix from earlier steps
        s = torch.tensor(_slots(block_table, list(range(c)), b, bt), dtype=torch.int64)
        write_kv_ref(k_all[b][:c], v_all[b][:c], kv_cache, s)
    q = torch.randn(sum(new), hq, D, generator=g)
    k_new = torch.cat([k[c:] for k, c in zip(k_all, ctx)])
    v_new = torch.cat([v[c:] for v, c in zip(v_all, ctx)])
    slots = sum((_slots(block_table, list(range(c, c + n)), b, bt)
                 for b, (c, n) in enumerate(zip(ctx, new))), [])
    qsl = torch.tensor([0, *torch.tensor(new).cumsum(0).tolist()])
    seq_lens = torch.tensor([c + n for c, n in zip(ctx, new)])
    to = {k: v.to(device) for k, v in dict(
        q=q, k_new=k_new, v_new=v_new, kv_cache=kv_cache, block_table=block_table,
        slots=torch.tensor(slots, dtype=torch.int64), qsl=qsl, seq_lens=seq_lens).items()}
    return to, k_all, v_all


@pytest.mark.parametrize("hq,hkv", [(4, 2), (2, 2), (6, 1)])
@pytest.mark.parametrize("bt", [3, 4])
def test_paged_attention_matches_naive(device, hq, hkv, bt):
    ctx = [4, 0, 7, 2]  # decode with context, pure prefill, prefill after prefix, decode
    new = [1, 5, 3, 1]
    t, k_all, v_all = _case(hq, hkv, bt, ctx, new, device)
    scale = D ** -0.5
    write_kv_ref(t["k_new"], t["v_new"], t["kv_cache"], t["slots"])
    out = paged_attention_ref(t["q"], t["kv_cache"], t["block_table"], t["qsl"],
                              t["seq_lens"], scale)
    assert out.shape == t["q"].shape and torch.isfinite(out).all()
    for b, c in enumerate(ctx):
        seg = slice(int(t["qsl"][b]), int(t["qsl"][b + 1]))
        ref = _naive(t["q"][seg].cpu(), k_all[b], v_all[b], c, scale)
        torch.testing.assert_close(out[seg].cpu().double(), ref, atol=1e-5, rtol=1e-5)


def test_write_kv_lands_at_slots(device):
    bt, hkv = 3, 2
    kv_cache = torch.zeros(5, hkv, 2, bt, D, device=device)
    k = torch.randn(4, hkv, D, device=device)
    v = torch.randn(4, hkv, D, device=device)
    slots = torch.tensor([3 * bt + 2, 1 * bt + 0, 4 * bt + 1, 3 * bt + 0], device=device)
    write_kv_ref(k, v, kv_cache, slots)
    for i, s in enumerate(slots.tolist()):
        torch.testing.assert_close(kv_cache[s // bt, :, 0, s % bt], k[i], atol=0, rtol=0)
        torch.testing.assert_close(kv_cache[s // bt, :, 1, s % bt], v[i], atol=0, rtol=0)
    assert int((kv_cache != 0).any(dim=-1).sum()) == 4 * hkv * 2  # nothing else written


def test_bf16_cache(device):
    t, k_all, v_all = _case(4, 2, 3, [5, 0], [1, 4], device, cache_dtype=torch.bfloat16)
    write_kv_ref(t["k_new"], t["v_new"], t["kv_cache"], t["slots"])
    assert t["kv_cache"].dtype == torch.bfloat16
    q = t["q"].bfloat16()
    out = paged_attention_ref(q, t["kv_cache"], t["block_table"], t["qsl"], t["seq_lens"], 0.5)
    assert out.dtype == torch.bfloat16
    ref = _naive(q[:1].float().cpu(), k_all[0].bfloat16().float(), v_all[0].bfloat16().float(),
                 5, 0.5)
    torch.testing.assert_close(out[:1].cpu().double(), ref, atol=2e-2, rtol=2e-2)
