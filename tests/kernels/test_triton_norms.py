"""Triton fused norms vs `rmsnorm_ref` / `gated_rmsnorm_ref` on fresh random inputs.

Interpreted on CPU (TRITON_INTERPRET=1, small shapes); 8B / 30B-A3B widths on a GPU. Skipped
without triton."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

pytest.importorskip("triton")

from hybridpd.kernels.ops import (  # noqa: E402
    add_rmsnorm_ref,
    gated_rmsnorm_ref,
    relu2_ref,
    rmsnorm_ref,
)
from hybridpd.kernels.triton_norms import (  # noqa: E402
    add_rmsnorm,
    gated_rmsnorm,
    relu2,
    rmsnorm,
)

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
DTYPES = [torch.float32] + ([torch.bfloat16] if CUDA else [])


def _close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> None:
    if dtype == torch.float32:
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    else:  # one bf16 rounding step apart at most
        torch.testing.assert_close(a.float(), b.float(), rtol=1.6e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,h", [(3, 48)] + ([(1, 4096), (65, 4096), (7, 2688)] if CUDA else []))
def test_rmsnorm_matches_ref(t, h, dtype) -> None:
    g = torch.Generator().manual_seed(t * h)
    x = (torch.randn(t, h, generator=g) * 3).to(DEV, dtype)
    w = (1 + torch.randn(h, generator=g) / 10).to(DEV, dtype)
    _close(rmsnorm(x, w, 1e-5), rmsnorm_ref(x, w, 1e-5), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,d,group", [(4, 64, 16), (2, 96, 24)]
                         + ([(1, 8192, 1024), (33, 8192, 1024), (5, 4096, 512)] if CUDA else []))
def test_gated_rmsnorm_matches_ref(t, d, group, dtype) -> None:
    g = torch.Generator().manual_seed(t + d + group)
    y = torch.randn(t, d, generator=g).to(DEV, dtype)
    zx = torch.randn(t, d + 40, generator=g).to(DEV, dtype)
    z = zx[:, 8:8 + d]  # a strided slice, as the in_proj split gives it
    w = (1 + torch.randn(d, generator=g) / 10).to(DEV, dtype)
    _close(gated_rmsnorm(y, z, w, group, 1e-5), gated_rmsnorm_ref(y, z, w, group, 1e-5), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,h", [(3, 48), (2, 40)] + ([(1, 4096), (64, 4096), (7, 2688)]
                                                      if CUDA else []))
def test_add_rmsnorm_matches_ref(t, h, dtype) -> None:
    g = torch.Generator().manual_seed(t * h + 1)
    x = (torch.randn(t, h, generator=g) * 3).to(DEV, dtype)
    delta = torch.randn(t, h, generator=g).to(DEV, dtype)
    w = (1 + torch.randn(h, generator=g) / 10).to(DEV, dtype)
    normed, total = add_rmsnorm(x, delta, w, 1e-5)
    want_normed, want_total = add_rmsnorm_ref(x, delta, w, 1e-5)
    assert torch.equal(total, want_total)  # the residual stream: exactly the unfused add
    _close(normed, want_normed, dtype)
    first, same = add_rmsnorm(x, None, w, 1e-5)  # the first block: nothing to add yet
    assert same is x
    _close(first, rmsnorm_ref(x, w, 1e-5), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 37), (1, 2050)] + ([(64, 21504)] if CUDA else []))
def test_relu2_matches_ref(shape, dtype) -> None:
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(*shape, generator=g).to(DEV, dtype)
    assert torch.equal(relu2(x), relu2_ref(x))  # one rounding of the same fp32 square


def test_launchers_reject_bad_shapes() -> None:
    with pytest.raises(ValueError, match="rmsnorm"):
        rmsnorm(torch.zeros(2, 8, device=DEV), torch.zeros(4, device=DEV), 1e-5)
    with pytest.raises(ValueError, match="add_rmsnorm"):
        add_rmsnorm(torch.zeros(2, 8, device=DEV), torch.zeros(2, 4, device=DEV),
                    torch.zeros(8, device=DEV), 1e-5)
    with pytest.raises(ValueError, match="gated_rmsnorm"):
        gated_rmsnorm(torch.zeros(2, 8, device=DEV), torch.zeros(2, 8, device=DEV),
                      torch.zeros(8, device=DEV), 3, 1e-5)
