"""Triton MoE GEMV (decode-sized routed experts) vs the reference expert loop.

Interpreted on CPU (TRITON_INTERPRET=1, small shapes, fp32); 30B-A3B shapes in bf16 on a GPU.
Skipped without triton."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

pytest.importorskip("triton")

from hybridpd.config import ModelConfig  # noqa: E402
from hybridpd.kernels.triton_moe import moe_experts_gemv, route_topk  # noqa: E402
from hybridpd.model.moe import RoutedExperts, TopkRouter  # noqa: E402
from hybridpd.model.parallel import SINGLE  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
CASES = [(1, 8, 2, 32, 48, torch.float32), (5, 16, 6, 40, 24, torch.float32)]
if CUDA:
    CASES += [(t, 128, 6, 2688, 1856, torch.bfloat16) for t in (1, 4, 10)]


def _cfg(experts: int, k: int, hidden: int, inter: int) -> ModelConfig:
    raw = {"model_type": "nemotron_h", "hybrid_override_pattern": "E", "hidden_size": hidden,
           "n_routed_experts": experts, "num_experts_per_tok": k,
           "moe_intermediate_size": inter, "n_group": 1, "topk_group": 1, "vocab_size": 64}
    return ModelConfig.from_hf_dict(raw)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("tokens,experts,k,hidden,inter,dtype", CASES)
def test_gemv_equals_loop(tokens, experts, k, hidden, inter, dtype) -> None:
    g = torch.Generator().manual_seed(tokens * experts + hidden)
    cfg = _cfg(experts, k, hidden, inter)
    moe = RoutedExperts(cfg, SINGLE, dtype, DEV)
    moe.up.copy_((torch.randn(moe.up.shape, generator=g) / hidden ** 0.5).to(DEV, dtype))
    moe.down.copy_((torch.randn(moe.down.shape, generator=g) / inter ** 0.5).to(DEV, dtype))
    router = TopkRouter(cfg, DEV)
    router.weight.copy_(torch.randn(router.weight.shape, generator=g).to(DEV))
    router.e_score_correction_bias.zero_()
    x = torch.randn(tokens, hidden, generator=g).to(DEV, dtype)
    weights, ids = router(x)
    want = moe.forward_loop(x, weights, ids)
    got = moe_experts_gemv(x, moe.up, moe.down, weights, ids)
    assert got.dtype == torch.float32 and got.shape == (tokens, hidden)
    assert rel_err(got, want) < (1e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("tokens,experts,k,norm", [(1, 8, 2, True), (7, 20, 6, True),
                                                   (3, 16, 4, False)]
                         + ([(64, 128, 6, True)] if CUDA else []))
def test_route_topk_equals_router(tokens, experts, k, norm) -> None:
    g = torch.Generator().manual_seed(tokens * 31 + experts + k)
    logits = torch.randn(tokens, experts, generator=g).to(DEV)
    cfg = _cfg(experts, k, 16, 8)
    router = TopkRouter(cfg, DEV)
    router.norm_topk_prob, router.scaling = norm, 2.5
    router.e_score_correction_bias.copy_(torch.randn(experts, generator=g).to(DEV) / 4)
    want_w, want_ids = router.select(logits)
    got_w, got_ids = route_topk(logits, router.e_score_correction_bias, k, norm, 2.5)
    assert got_ids.dtype == torch.int64 and got_w.dtype == torch.float32
    for row in range(tokens):  # the same experts with the same weights (order is free)
        want = dict(zip(want_ids[row].tolist(), want_w[row].tolist()))
        got = dict(zip(got_ids[row].tolist(), got_w[row].tolist()))
        assert got.keys() == want.keys()
        for e in want:
            assert got[e] == pytest.approx(want[e], rel=1e-5)


def test_gemv_stores_in_the_asked_dtype() -> None:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 32, generator=g).to(DEV)
    up = torch.randn(4, 16, 32, generator=g).to(DEV)
    down = torch.randn(4, 32, 16, generator=g).to(DEV)
    weights = torch.rand(3, 2, generator=g).to(DEV)
    ids = torch.tensor([[0, 3], [1, 2], [3, 1]], device=DEV)
    fp32 = moe_experts_gemv(x, up, down, weights, ids)
    half = moe_experts_gemv(x, up, down, weights, ids, out_dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16  # the fp32 sum, cast once (the interpreter truncates)
    torch.testing.assert_close(half.float(), fp32, rtol=2 ** -7, atol=0)
    shared = torch.randn(3, 32, generator=g).to(DEV)
    summed = moe_experts_gemv(x, up, down, weights, ids, out_dtype=torch.float32, add=shared)
    torch.testing.assert_close(summed, fp32 + shared, rtol=1e-6, atol=1e-5)  # the shared add


def test_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="moe_experts_gemv"):
        moe_experts_gemv(torch.zeros(2, 8, device=DEV), torch.zeros(4, 6, 8, device=DEV),
                         torch.zeros(4, 6, 8, device=DEV), torch.zeros(2, 2, device=DEV),
                         torch.zeros(2, 2, dtype=torch.int64, device=DEV))
