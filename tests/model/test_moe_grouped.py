"""The routed experts' grouped-GEMM path (used on CUDA) equals the reference expert loop."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from hybridpd.config import ModelConfig  # noqa: E402
from hybridpd.model.moe import RoutedExperts, TopkRouter  # noqa: E402
from hybridpd.model.parallel import SINGLE  # noqa: E402

torch.set_num_threads(1)
pytestmark = pytest.mark.skipif(not hasattr(F, "grouped_mm"), reason="needs grouped_mm")


def _cfg(experts: int, k: int) -> ModelConfig:
    raw = {"model_type": "nemotron_h", "hybrid_override_pattern": "E", "hidden_size": 32,
           "n_routed_experts": experts, "num_experts_per_tok": k, "moe_intermediate_size": 48,
           "n_group": 1, "topk_group": 1, "vocab_size": 64}
    return ModelConfig.from_hf_dict(raw)


@pytest.mark.parametrize("tokens,experts,k", [(1, 8, 2), (5, 8, 2), (33, 16, 6), (7, 128, 6)])
def test_grouped_equals_loop(tokens: int, experts: int, k: int) -> None:
    g = torch.Generator().manual_seed(tokens * experts + k)
    cfg = _cfg(experts, k)
    moe = RoutedExperts(cfg, SINGLE, torch.float32, torch.device("cpu"))
    moe.up.copy_(torch.randn(moe.up.shape, generator=g) / 6)
    moe.down.copy_(torch.randn(moe.down.shape, generator=g) / 7)
    router = TopkRouter(cfg, torch.device("cpu"))
    router.weight.copy_(torch.randn(router.weight.shape, generator=g))
    router.e_score_correction_bias.zero_()
    x = torch.randn(tokens, 32, generator=g)
    weights, ids = router(x)
    loop = moe.forward_loop(x, weights, ids)
    grouped = moe.forward_grouped(x, weights, ids)
    assert loop.abs().sum() > 0
    torch.testing.assert_close(grouped, loop, rtol=1e-5, atol=1e-6)
