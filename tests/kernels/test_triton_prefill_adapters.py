"""The seam adapters of the Triton prefill ops: reference results from a real PrefillMeta,
and per-step metadata (SSD chunk list, flag bytes) built once and reused by later layers."""

from __future__ import annotations

import pytest
import torch
from triton_setup import DEVICE, qsl, rel_err

pytest.importorskip("triton")

from hybridpd.kernels.conv1d import causal_conv1d_prefill_ref  # noqa: E402
from hybridpd.kernels.metadata import build_prefill_meta  # noqa: E402
from hybridpd.kernels.ssd import ssd_prefill_ref  # noqa: E402
from hybridpd.kernels.triton_prefill import conv1d_prefill, ssd_prefill  # noqa: E402


def test_adapters_match_references_and_build_step_metadata_once():
    g = torch.Generator().manual_seed(0)
    lens, ctx = [9, 21], [0, 5]
    T, H, G, P, N, C, K = sum(lens), 4, 2, 16, 16, 40, 4
    loc = qsl(lens)
    ctx_t = torch.tensor(ctx, device=DEVICE)
    meta = build_prefill_meta(loc, ctx_t + loc.diff(), ctx_t, ctx_t > 0, max(lens),
                              max(c + n for c, n in zip(ctx, lens)), T)
    ids = torch.tensor([2, 1], device=DEVICE)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(DEVICE)

    x, w, b = r(T, C), r(C, K), r(C)
    conv = r(3, C, K - 1)
    conv_ref = conv.clone()
    out = conv1d_prefill(x, w, b, conv, ids, meta)
    ref = causal_conv1d_prefill_ref(x, w, b, conv_ref, ids, loc, meta.has_initial_state)
    assert rel_err(out, ref) < 1e-6 and torch.equal(conv, conv_ref)

    xs, dt, B, Cm = r(T, H, P), r(T, H), r(T, G, N), r(T, G, N)
    A, D, dtb = -torch.exp(r(H) * 0.5), r(H), r(H) * 0.5
    ssm = r(3, H, P, N)
    ssm_ref, ssm_before = ssm.clone(), ssm.clone()
    y = ssd_prefill(xs, dt, A, B, Cm, D, dtb, ssm, ids, meta, 8)
    chunks = meta.extra[("ssd_chunks", 8)]
    y2 = ssd_prefill(xs, dt, A, B, Cm, D, dtb, ssm_before, ids, meta, 8)  # a later layer
    assert meta.extra[("ssd_chunks", 8)] is chunks  # reused, not rebuilt
    assert sorted(map(str, meta.extra)) == sorted(map(str, [("ssd_chunks", 8), "has_init_u8"]))
    ref_y = ssd_prefill_ref(xs, dt, A, B, Cm, D, dtb, ssm_ref, ids, loc, meta.has_initial_state,
                            chunk_size=8)
    assert rel_err(y, ref_y) < 1e-5 and rel_err(ssm[ids], ssm_ref[ids]) < 1e-5
    assert torch.equal(y, y2)
