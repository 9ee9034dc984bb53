"""Triton causal conv1d prefill vs `causal_conv1d_prefill_ref` on fresh random inputs.

Runs on CUDA where present, else in Triton's CPU interpreter; skips without triton. Grid:
varlen batches mixing fresh and continuing sequences (1 token, fewer than K-1 tokens, many),
bias or none, kernel widths, x as a column slice of a wider buffer, NaN in slots read without
an initial state, fp32 and bf16 pools.
"""

from __future__ import annotations

import pytest
import torch
from triton_setup import DEVICE, qsl, rel_err

pytest.importorskip("triton")

from hybridpd.kernels.conv1d import causal_conv1d_prefill_ref  # noqa: E402
from hybridpd.kernels.triton_conv1d import causal_conv1d_prefill_triton  # noqa: E402


def _case(lens, C, K, has_init, dtype, state_dtype, use_bias, seed):
    g = torch.Generator().manual_seed(seed)
    nb = 2 * len(lens) + 2
    wide = torch.randn(sum(lens), C + 7, generator=g).to(dtype)
    x = wide.to(DEVICE)[:, 3:3 + C]  # strided: a slice of in_proj's output
    weight = torch.randn(C, K, generator=g).to(dtype).to(DEVICE)
    bias = torch.randn(C, generator=g).to(dtype).to(DEVICE) if use_bias else None
    ids = torch.randperm(nb - 1, generator=g)[: len(lens)] + 1
    states = torch.full((nb, C, K - 1), float("nan"), dtype=state_dtype)
    for i, h in zip(ids.tolist(), has_init):
        if h:
            states[i] = torch.randn(C, K - 1, generator=g).to(state_dtype)
    return (x, weight, bias, states.to(DEVICE), ids.to(DEVICE), qsl(lens),
            torch.tensor(has_init, device=DEVICE))


GRID = [  # (lens, C, K, has_init)
    ([37], 40, 4, [False]),
    ([5, 1, 2, 40, 1], 72, 4, [True, False, True, False, True]),  # short ones keep old inputs
    ([9, 3], 33, 2, [True, True]),  # K = 2
    ([1, 17, 6], 64, 5, [True, True, False]),  # K - 1 = 4
]


@pytest.mark.parametrize("lens,C,K,has_init", GRID)
@pytest.mark.parametrize("dtype,state_dtype", [(torch.float32, torch.float32),
                                               (torch.bfloat16, torch.bfloat16),
                                               (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("use_bias", [True, False])
def test_matches_reference(lens, C, K, has_init, dtype, state_dtype, use_bias):
    x, w, b, states, ids, loc, hi = _case(lens, C, K, has_init, dtype, state_dtype, use_bias,
                                          seed=sum(lens) + C + K)
    ref_states = states.clone()
    ref = causal_conv1d_prefill_ref(x, w, b, ref_states, ids, loc, hi)
    out = causal_conv1d_prefill_triton(x, w, b, states, ids, loc, hi)
    assert out.shape == ref.shape and out.dtype == dtype
    assert rel_err(out, ref) < (1e-6 if dtype == torch.float32 else 1e-2)
    torch.testing.assert_close(states[ids], ref_states[ids], atol=0, rtol=0)  # copies only
    others = torch.ones(states.shape[0], dtype=torch.bool, device=DEVICE)
    others[ids] = False
    assert torch.isnan(states[others]).all()  # untouched slots keep their bytes


def test_bad_shapes_are_refused():
    x, w, b, states, ids, loc, hi = _case([4], 16, 4, [False], torch.float32, torch.float32,
                                          True, 0)
    with pytest.raises(ValueError, match="conv_states"):
        causal_conv1d_prefill_triton(x, w, b, states[:, :, :2], ids, loc, hi)
    with pytest.raises(ValueError, match="bias"):
        causal_conv1d_prefill_triton(x, w, b[:8], states, ids, loc, hi)


@pytest.mark.gpu
@pytest.mark.parametrize("C", [10240, 6144])  # conv_dim of 8B and 30B-A3B
def test_model_shapes_on_gpu(C):
    lens, has_init = [1500, 1, 2, 700, 33], [False, True, True, True, False]
    x, w, b, states, ids, loc, hi = _case(lens, C, 4, has_init, torch.bfloat16, torch.bfloat16,
                                          True, seed=C)
    ref_states = states.clone()
    ref = causal_conv1d_prefill_ref(x, w, b, ref_states, ids, loc, hi)
    out = causal_conv1d_prefill_triton(x, w, b, states, ids, loc, hi)
    assert rel_err(out, ref) < 1e-2
    torch.testing.assert_close(states[ids], ref_states[ids], atol=0, rtol=0)


@pytest.mark.parametrize("config", [(8, 16, 1), (64, 64, 4)])
def test_tile_configs_agree(config):
    x, w, b, states, ids, loc, hi = _case([5, 1, 30], 40, 4, [True, True, False], torch.float32,
                                          torch.float32, True, seed=9)
    ref_states = states.clone()
    ref = causal_conv1d_prefill_ref(x, w, b, ref_states, ids, loc, hi)
    out = causal_conv1d_prefill_triton(x, w, b, states, ids, loc, hi, config=config)
    assert rel_err(out, ref) < 1e-6
    torch.testing.assert_close(states[ids], ref_states[ids], atol=0, rtol=0)
