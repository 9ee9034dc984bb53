"""Causal conv1d reference ops vs a naive per-token loop."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from hybridpd.kernels import causal_conv1d_prefill_ref, causal_conv1d_update_ref  # noqa: E402

torch.set_num_threads(1)
C, K = 6, 4


def _qsl(lens: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], device=device)


def _naive(x_seq, weight, bias, init):
    """One sequence: x_seq (L, C), init (C, K-1) -> (out (L, C), last K-1 inputs (C, K-1))."""
    hist = [init[:, j].double() for j in range(init.shape[1])]
    outs = []
    for t in range(x_seq.shape[0]):
        hist.append(x_seq[t].double())
        acc = sum(weight[:, k].double() * hist[len(hist) - K + k] for k in range(K))
        if bias is not None:
            acc = acc + bias.double()
        outs.append(F.silu(acc))
    out = torch.stack(outs) if outs else x_seq.new_zeros((0, x_seq.shape[1])).double()
    return out, torch.stack(hist[-(K - 1):], dim=1)


@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("lens", [[5, 1, 2, 9], [1], [2, 3]])
def test_prefill_matches_naive(device, use_bias, lens):
    g = torch.Generator().manual_seed(0)
    nb = 8
    x = torch.randn(sum(lens), C, generator=g).to(device)
    weight = torch.randn(C, K, generator=g).to(device)
    bias = torch.randn(C, generator=g).to(device) if use_bias else None
    states = torch.randn(nb, C, K - 1, generator=g).to(device)
    before = states.clone()
    ids = torch.tensor([6, 2, 7, 4][: len(lens)], device=device)
    has_init = torch.tensor([True, False, True, False][: len(lens)], device=device)
    qsl = _qsl(lens, device)

    out = causal_conv1d_prefill_ref(x, weight, bias, states, ids, qsl, has_init)

    assert out.shape == (sum(lens), C)
    for b in range(len(lens)):
        init = before[ids[b]] if has_init[b] else torch.zeros(C, K - 1, device=device)
        seg = slice(int(qsl[b]), int(qsl[b + 1]))
        ref_out, ref_state = _naive(x[seg], weight, bias, init)
        torch.testing.assert_close(out[seg].double(), ref_out, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(states[ids[b]].double(), ref_state, atol=1e-6, rtol=1e-6)
    untouched = [i for i in range(nb) if i not in ids.tolist()]
    torch.testing.assert_close(states[untouched], before[untouched], atol=0, rtol=0)


def test_prefill_short_sequence_keeps_older_inputs_from_initial_state(device):
    """A 1-token sequence with an initial state shifts it by one column."""
    states = torch.arange(2 * C * (K - 1), dtype=torch.float32, device=device)
    states = states.view(2, C, K - 1).clone()
    old = states[1].clone()
    x = torch.full((1, C), -3.0, device=device)
    causal_conv1d_prefill_ref(x, torch.ones(C, K, device=device), None, states,
                              torch.tensor([1], device=device), _qsl([1], device),
                              torch.tensor([True], device=device))
    torch.testing.assert_close(states[1, :, :-1], old[:, 1:])
    torch.testing.assert_close(states[1, :, -1], x[0])


def test_prefill_ignores_garbage_without_initial_state(device):
    states = torch.full((3, C, K - 1), float("nan"), device=device)
    x = torch.randn(4, C, device=device)
    out = causal_conv1d_prefill_ref(x, torch.randn(C, K, device=device), None, states,
                                    torch.tensor([2], device=device), _qsl([4], device),
                                    torch.tensor([False], device=device))
    assert torch.isfinite(out).all()
    assert torch.isfinite(states[2]).all()


def test_update_matches_naive_and_continues_prefill(device):
    """prefill(n) then update(x_n) == prefill(n+1): outputs and stored state."""
    g = torch.Generator().manual_seed(1)
    lens = [3, 1, 6]
    x = torch.randn(sum(lens) + len(lens), C, generator=g).to(device)
    weight = torch.randn(C, K, generator=g).to(device)
    bias = torch.randn(C, generator=g).to(device)
    ids = torch.tensor([3, 1, 2], device=device)
    has_init = torch.tensor([True, True, False], device=device)
    init = torch.randn(4, C, K - 1, generator=g).to(device)

    full_lens = [n + 1 for n in lens]
    full_qsl = _qsl(full_lens, device)
    s_full = init.clone()
    out_full = causal_conv1d_prefill_ref(x, weight, bias, s_full, ids, full_qsl, has_init)

    last = full_qsl[1:] - 1
    keep = torch.ones(x.shape[0], dtype=torch.bool, device=device)
    keep[last] = False
    s_step = init.clone()
    causal_conv1d_prefill_ref(x[keep], weight, bias, s_step, ids, _qsl(lens, device), has_init)
    out_step = causal_conv1d_update_ref(x[last], weight, bias, s_step, ids)

    torch.testing.assert_close(out_step, out_full[last], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s_step, s_full, atol=1e-6, rtol=1e-6)


def test_bf16_state_dtype_preserved(device):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, C, generator=g).to(device)
    weight = torch.randn(C, K, generator=g).to(device)
    states = torch.zeros(2, C, K - 1, dtype=torch.bfloat16, device=device)
    ptr = states.data_ptr()
    ids = torch.tensor([1], device=device)
    causal_conv1d_prefill_ref(x, weight, None, states, ids, _qsl([5], device),
                              torch.tensor([False], device=device))
    assert states.dtype == torch.bfloat16 and states.data_ptr() == ptr
    torch.testing.assert_close(states[1], x[-(K - 1):].T.to(torch.bfloat16), atol=0, rtol=0)
    out = causal_conv1d_update_ref(x[:1].to(torch.bfloat16), weight, None, states, ids)
    assert out.dtype == torch.bfloat16 and states.dtype == torch.bfloat16
