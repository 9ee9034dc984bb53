"""Triton decode kernels vs their `*_ref` oracles on fresh random inputs.

On CPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1) over small shapes; on a
GPU (`gpu` tests) over Nemotron-H-8B and 30B-A3B dimensions. Every case uses strided pool views
with scattered block/state ids, garbage (NaN) beyond the live data, lengths that are not
multiples of the block, and padded rows pointed at the null block 0. Skipped without triton.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

triton = pytest.importorskip("triton")

from hybridpd.kernels import (  # noqa: E402
    causal_conv1d_update_ref,
    paged_decode_attention_ref,
    ssd_decode_ref,
)
from hybridpd.kernels.metadata import DecodeMeta, build_decode_meta  # noqa: E402
from hybridpd.kernels.triton_decode import (  # noqa: E402
    conv1d_update,
    decode_attention,
    ssd_decode,
)

torch.set_num_threads(1)
CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _pool(nb: int, row: tuple[int, ...], dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    """A strided (nb, *row) view into a wider NaN-poisoned buffer, random where live."""
    numel = 1
    for s in row:
        numel *= s
    buf = torch.full((nb, numel + 24), float("nan"), dtype=dtype)
    view = buf[:, 8:8 + numel].view(nb, *row)
    view.copy_(torch.randn(nb, *row, generator=g).to(dtype))
    return buf.to(DEV)[:, 8:8 + numel].view(nb, *row)


def _ids(n: int, nb: int, pad: int, g: torch.Generator) -> torch.Tensor:
    ids = (torch.randperm(nb - 1, generator=g)[:n] + 1).tolist() + [0] * pad  # pads: null block
    return torch.tensor(ids, dtype=torch.int64, device=DEV)


SSD_CASES = [(3, 8, 16, 2, 16, 1, torch.float32)]
if CUDA:
    SSD_CASES += [(b, 128, 64, 8, 128, pad, dt) for b in (1, 7, 64) for pad in (0, 3)
                  for dt in (torch.float32, torch.bfloat16)]  # 8B
    SSD_CASES += [(5, 64, 64, 8, 128, 2, torch.float32)]  # 30B-A3B


@pytest.mark.parametrize("nb,h,p,grp,n,pad,state_dtype", SSD_CASES)
def test_ssd_decode_matches_ref(nb, h, p, grp, n, pad, state_dtype) -> None:
    g = torch.Generator().manual_seed(nb * 1000 + h + pad)
    rows = nb + pad
    blocks = 2 * rows + 3
    ids = _ids(nb, blocks, pad, g)
    r = lambda *s: torch.randn(*s, generator=g).to(DEV)  # noqa: E731
    x, dt, B, C = r(rows, h, p), r(rows, h), r(rows, grp, n), r(rows, grp, n)
    A, D, dtb = -torch.rand(h, generator=g).to(DEV) * 4, r(h), r(h) - 2
    st_k = _pool(blocks, (h, p, n), state_dtype, g)
    st_r = st_k.clone()
    y_k = ssd_decode(x, dt, A, B, C, D, dtb, st_k, ids)
    y_r = ssd_decode_ref(x, dt, A, B, C, D, dtb, st_r, ids)
    live = slice(0, nb)  # padded rows all write the null block: only live rows are defined
    tol = 1e-5 if state_dtype == torch.float32 else 1e-2
    assert rel_err(y_k[live], y_r[live]) < tol
    assert rel_err(st_k[ids[live]], st_r[ids[live]]) < tol
    untouched = torch.ones(blocks, dtype=torch.bool, device=DEV)
    untouched[ids] = False
    assert torch.equal(st_k[untouched].nan_to_num(7.0), st_r[untouched].nan_to_num(7.0))


CONV_CASES = [(4, 48, 4, 1, True, torch.float32)]
if CUDA:
    CONV_CASES += [(b, c, 4, pad, bias, dt) for b in (1, 9, 64) for c in (10240, 6144)
                   for pad in (0, 5) for bias in (True, False)
                   for dt in (torch.float32, torch.bfloat16)]


@pytest.mark.parametrize("nb,c,k,pad,bias,dtype", CONV_CASES)
def test_conv1d_update_matches_ref(nb, c, k, pad, bias, dtype) -> None:
    g = torch.Generator().manual_seed(nb + c + pad)
    rows, blocks = nb + pad, 2 * (nb + pad) + 2
    ids = _ids(nb, blocks, pad, g)
    x = torch.randn(rows, c, generator=g).to(DEV, dtype)
    w = torch.randn(c, k, generator=g).to(DEV, dtype)
    b = torch.randn(c, generator=g).to(DEV, dtype) if bias else None
    st_k = _pool(blocks, (c, k - 1), dtype, g)
    st_r = st_k.clone()
    out_k = conv1d_update(x, w, b, st_k, ids)
    out_r = causal_conv1d_update_ref(x, w, b, st_r, ids)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel_err(out_k[:nb], out_r[:nb]) < tol
    assert torch.equal(st_k[ids[:nb]], st_r[ids[:nb]])  # a shift: exact


ATTN_CASES = [([1, 5, 23, 40], 4, 2, 16, 7, 2, torch.float32),  # bt 7: lengths cross blocks
              ([3, 17, 30], 4, 2, 8, 7, 1, torch.float32),  # head_dim 8: padded to 16
              ([9, 22], 6, 2, 24, 5, 1, torch.float32)]  # head_dim 24: not a power of two
if CUDA:
    for dt in (torch.float32, torch.bfloat16):
        ATTN_CASES += [([1, 1040, 1041, 3000], 32, 8, 128, 1040, 3, dt),  # 8B
                       ([8191] + [17 * i + 1 for i in range(31)], 32, 8, 128, 1040, 0, dt),
                       ([5, 2081, 700], 32, 2, 128, 1040, 2, dt),  # 30B-A3B
                       ([1, 700, 1041], 16, 4, 80, 1040, 1, dt)]  # head_dim 80 (padded to 128)


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # padded rows: NaN null block
@pytest.mark.parametrize("splits", [None, 3])
@pytest.mark.parametrize("lens,hq,hkv,d,bt,pad,dtype", ATTN_CASES)
def test_decode_attention_matches_ref(lens, hq, hkv, d, bt, pad, dtype, splits) -> None:
    g = torch.Generator().manual_seed(sum(lens) + hq + pad)
    nseq = len(lens) + pad
    width = max(-(-n // bt) for n in lens) + 1  # a spare column pointing at block 0
    blocks = len(lens) * width + 2
    kv = _pool(blocks, (hkv, 2, bt, d), dtype, g)
    kv[0] = float("nan")  # the null block holds garbage
    perm = (torch.randperm(blocks - 1, generator=g) + 1)[: len(lens) * width]
    table = torch.zeros(nseq, width, dtype=torch.int64)
    for i, n in enumerate(lens):
        used = -(-n // bt)
        table[i, :used] = perm[i * width:i * width + used]
        last, off = table[i, used - 1], n - (used - 1) * bt
        kv[last, :, :, off:] = float("nan")  # beyond seq_len: other bytes
    table = table.to(DEV)
    seq_lens = torch.tensor(list(lens) + [1] * pad, device=DEV)  # pads: 1 slot of block 0
    q = torch.randn(nseq, hq, d, generator=g).to(DEV, dtype)
    meta = build_decode_meta(seq_lens, width * bt)
    if splits is not None:  # force several KV partitions (and empty ones for short rows)
        meta = DecodeMeta(seq_lens, width * bt, splits)
    got = decode_attention(q, kv, table, d ** -0.5, meta)
    want = paged_decode_attention_ref(q, kv, table, seq_lens, d ** -0.5)
    n = len(lens)
    assert not got[:n].isnan().any()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel_err(got[:n], want[:n]) < tol


def test_launchers_reject_bad_shapes() -> None:
    x = torch.zeros(2, 4, 8, device=DEV)
    with pytest.raises(ValueError, match="ssd_decode"):
        ssd_decode(x, torch.zeros(2, 3, device=DEV), x, x, x, x, x, x,
                   torch.zeros(2, dtype=torch.int64, device=DEV))
    with pytest.raises(ValueError, match="conv1d_update"):
        conv1d_update(torch.zeros(2, 8, device=DEV), torch.zeros(6, 4, device=DEV), None,
                      torch.zeros(3, 8, 3, device=DEV), torch.zeros(2, dtype=torch.int64,
                                                                       device=DEV))
