"""Mamba2 SSD reference ops vs a naive per-token recurrence."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from hybridpd.kernels import ssd_decode_ref, ssd_prefill_ref  # noqa: E402

torch.set_num_threads(1)
P, N = 3, 5


def _qsl(lens: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], device=device)


def _inputs(num_tokens: int, H: int, G: int, device: torch.device, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(device)

    return dict(x=r(num_tokens, H, P), dt_raw=r(num_tokens, H), A=-torch.exp(r(H) * 0.5),
                B=r(num_tokens, G, N), C=r(num_tokens, G, N), D=r(H), dt_bias=r(H) * 0.5)


def _naive(inp: dict, seg: slice, init: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence, token by token in float64: returns (y (L, H, P), final state (H, P, N))."""
    H = inp["x"].shape[1]
    rep = H // inp["B"].shape[1]
    state = init.double().clone()
    ys = []
    for t in range(seg.start, seg.stop):
        dt = F.softplus(inp["dt_raw"][t].double() + inp["dt_bias"].double())  # (H,)
        y_t = torch.empty(H, P, dtype=torch.float64, device=state.device)
        for h in range(H):
            b_vec = inp["B"][t, h // rep].double()
            c_vec = inp["C"][t, h // rep].double()
            x_h = inp["x"][t, h].double()
            state[h] = state[h] * torch.exp(dt[h] * inp["A"][h].double())
            state[h] += dt[h] * torch.outer(x_h, b_vec)
            y_t[h] = state[h] @ c_vec + inp["D"][h].double() * x_h
        ys.append(y_t)
    return torch.stack(ys), state


def _run(inp: dict, states, ids, qsl, has_init, chunk_size: int) -> torch.Tensor:
    return ssd_prefill_ref(inp["x"], inp["dt_raw"], inp["A"], inp["B"], inp["C"], inp["D"],
                           inp["dt_bias"], states, ids, qsl, has_init, chunk_size=chunk_size)


@pytest.mark.parametrize("H,G", [(4, 2), (4, 1), (2, 2)])
@pytest.mark.parametrize("chunk_size", [4, 128])
def test_prefill_matches_naive(device, H, G, chunk_size):
    lens = [1, 3, 9, 4, 13]  # 1, < chunk, several chunks, exactly one chunk, ragged tail
    inp = _inputs(sum(lens), H, G, device)
    nb = 8
    states = torch.randn(nb, H, P, N, device=device)
    before = states.clone()
    ids = torch.tensor([5, 1, 7, 2, 3], device=device)
    has_init = torch.tensor([True, False, True, False, True], device=device)
    qsl = _qsl(lens, device)

    y = _run(inp, states, ids, qsl, has_init, chunk_size)

    assert y.shape == inp["x"].shape and y.dtype == inp["x"].dtype
    for b in range(len(lens)):
        init = before[ids[b]] if has_init[b] else torch.zeros(H, P, N, device=device)
        seg = slice(int(qsl[b]), int(qsl[b + 1]))
        ref_y, ref_state = _naive(inp, seg, init)
        torch.testing.assert_close(y[seg].double(), ref_y, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(states[ids[b]].double(), ref_state, atol=1e-4, rtol=1e-4)
    untouched = [i for i in range(nb) if i not in ids.tolist()]
    torch.testing.assert_close(states[untouched], before[untouched], atol=0, rtol=0)


def test_prefill_ignores_garbage_without_initial_state(device):
    inp = _inputs(6, 4, 2, device)
    states = torch.full((2, 4, P, N), float("nan"), device=device)
    y = _run(inp, states, torch.tensor([1], device=device), _qsl([6], device),
             torch.tensor([False], device=device), 4)
    assert torch.isfinite(y).all() and torch.isfinite(states[1]).all()


@pytest.mark.parametrize("chunk_size", [4, 128])
def test_chunked_prefill_equals_one_pass(device, chunk_size):
    """Two prefill pieces with the state carried == one pass (fp32, 1e-5)."""
    H, G = 4, 2
    lens, first = [13, 9, 6], [5, 4, 1]
    inp = _inputs(sum(lens), H, G, device, seed=3)
    qsl = _qsl(lens, device)
    ids = torch.tensor([2, 0, 1], device=device)
    init = torch.randn(3, H, P, N, device=device)
    has_init = torch.tensor([False, True, False], device=device)

    s_one = init.clone()
    y_one = _run(inp, s_one, ids, qsl, has_init, chunk_size)

    pos = torch.arange(sum(lens), device=device) - torch.repeat_interleave(
        qsl[:-1], torch.tensor(lens, device=device))
    in_first = pos < torch.repeat_interleave(torch.tensor(first, device=device),
                                             torch.tensor(lens, device=device))
    s_two = init.clone()
    part1 = {k: (v[in_first] if v.shape[0] == sum(lens) else v) for k, v in inp.items()}
    part2 = {k: (v[~in_first] if v.shape[0] == sum(lens) else v) for k, v in inp.items()}
    y1 = _run(part1, s_two, ids, _qsl(first, device), has_init, chunk_size)
    second = [n - f for n, f in zip(lens, first)]
    y2 = _run(part2, s_two, ids, _qsl(second, device), torch.ones_like(has_init), chunk_size)

    torch.testing.assert_close(y1, y_one[in_first], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y2, y_one[~in_first], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s_two, s_one, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("H,G", [(4, 2), (4, 4)])
def test_decode_matches_naive(device, H, G):
    nseq = 3
    inp = _inputs(nseq, H, G, device, seed=4)
    states = torch.randn(5, H, P, N, device=device)
    before = states.clone()
    ids = torch.tensor([4, 0, 2], device=device)
    y = ssd_decode_ref(inp["x"], inp["dt_raw"], inp["A"], inp["B"], inp["C"], inp["D"],
                       inp["dt_bias"], states, ids)
    for b in range(nseq):
        ref_y, ref_state = _naive(inp, slice(b, b + 1), before[ids[b]])
        torch.testing.assert_close(y[b].double(), ref_y[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(states[ids[b]].double(), ref_state, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(states[[1, 3]], before[[1, 3]], atol=0, rtol=0)


def test_bf16_state_dtype_preserved(device):
    H, G = 4, 2
    inp = _inputs(7, H, G, device, seed=5)
    states = torch.zeros(3, H, P, N, dtype=torch.bfloat16, device=device)
    ptr = states.data_ptr()
    ids = torch.tensor([2], device=device)
    _run(inp, states, ids, _qsl([7], device), torch.tensor([False], device=device), 4)
    _, ref_state = _naive(inp, slice(0, 7), torch.zeros(H, P, N, device=device))
    assert states.dtype == torch.bfloat16 and states.data_ptr() == ptr
    torch.testing.assert_close(states[2].double(), ref_state, atol=2e-2, rtol=2e-2)
    one = _inputs(1, H, G, device, seed=6)
    y = ssd_decode_ref(one["x"].bfloat16(), one["dt_raw"], one["A"], one["B"], one["C"],
                       one["D"], one["dt_bias"], states, ids)
    assert y.dtype == torch.bfloat16 and states.dtype == torch.bfloat16
