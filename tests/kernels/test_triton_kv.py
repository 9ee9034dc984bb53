"""Triton KV write by slot vs `write_kv_ref`: same bytes written, nothing else touched."""

from __future__ import annotations

import pytest
import torch
from triton_setup import DEVICE

pytest.importorskip("triton")

from hybridpd.kernels.attention import write_kv_ref  # noqa: E402
from hybridpd.kernels.triton_kv import write_kv_triton  # noqa: E402


@pytest.mark.parametrize("hkv,d,bt,cache_dtype", [(2, 16, 3, torch.float32),
                                                   (8, 128, 1040, torch.bfloat16),
                                                   (3, 24, 5, torch.bfloat16)])
def test_matches_reference(hkv, d, bt, cache_dtype):
    g = torch.Generator().manual_seed(hkv * d)
    nb, T = 6, 11
    # k, v as column slices of a fused projection, in the model (= cache) dtype
    qkv = torch.randn(T, (4 + 2) * hkv * d, generator=g).to(cache_dtype).to(DEVICE)
    k = qkv[:, 4 * hkv * d: 5 * hkv * d].view(T, hkv, d)
    v = qkv[:, 5 * hkv * d:].view(T, hkv, d)
    slots = torch.randperm((nb - 1) * bt, generator=g)[:T] + bt  # never the null block 0
    raw = torch.full((nb, 2 * hkv * 2 * bt * d), float("nan"), dtype=cache_dtype, device=DEVICE)
    kv = raw[:, : hkv * 2 * bt * d].view(nb, hkv, 2, bt, d)  # page view with a neighbour
    ref_raw = raw.clone()
    ref_kv = ref_raw[:, : hkv * 2 * bt * d].view(nb, hkv, 2, bt, d)
    write_kv_ref(k, v, ref_kv, slots.to(DEVICE))
    write_kv_triton(k, v, kv, slots.to(DEVICE))
    assert torch.equal(raw.isnan(), ref_raw.isnan())  # exactly the same elements written
    torch.testing.assert_close(raw.nan_to_num(), ref_raw.nan_to_num(), atol=0, rtol=0)


def test_bad_shapes_are_refused():
    kv = torch.zeros(3, 2, 2, 4, 16, device=DEVICE)
    k = torch.zeros(5, 2, 16, device=DEVICE)
    with pytest.raises(ValueError, match="disagree"):
        write_kv_triton(k, k[:, :1], kv, torch.zeros(5, dtype=torch.int64, device=DEVICE))
    with pytest.raises(ValueError, match="disagree"):
        write_kv_triton(k, k, kv, torch.zeros(4, dtype=torch.int64, device=DEVICE))
