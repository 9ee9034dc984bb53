"""The vectorised sampler: batch truncation equals the per-row rule, seeds reproduce per token."""

from __future__ import annotations

import torch

from hybridpd.engine.sampler import Sampler, _truncate_rows
from hybridpd.request import SamplingParams


def _one_row(row: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """The per-row rule, written plainly: top-k (ties kept), then the top-p nucleus."""
    row = row.clone()
    if 0 < top_k < row.numel():
        kth = row.topk(top_k).values[-1]
        row[row < kth] = float("-inf")
    if top_p < 1.0:
        vals, order = row.sort(descending=True)
        probs = torch.softmax(vals, dim=-1)
        drop = probs.cumsum(-1) - probs >= top_p
        row[order[drop]] = float("-inf")
    return row


def test_batch_truncation_equals_the_row_rule() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 50, generator=g) * 3
    logits[3, :10] = 1.5  # ties at the k-th value
    ks = [0, 1, 5, 10, 49, 50, -1]
    ps = [1.0, 0.5, 0.9, 0.3, 1.0, 0.01, 0.75]
    got = _truncate_rows(logits, ks, ps)
    for r in range(7):
        want = _one_row(logits[r], ks[r], ps[r])
        assert torch.equal(got[r].isinf(), want.isinf()), r
        assert torch.equal(got[r][~got[r].isinf()], want[~want.isinf()])
    assert got[1].isfinite().sum() == 1  # top_k 1
    assert got[0].isfinite().all()  # no truncation


def test_seeded_rows_reproduce_and_differ_by_output_index() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 300, generator=g)
    seeded = SamplingParams(max_tokens=4, temperature=1.0, seed=11)
    free = SamplingParams(max_tokens=4, temperature=1.0)
    params = [seeded, free, seeded, SamplingParams(max_tokens=4, temperature=0.0)]
    a = Sampler(0).sample(logits, params, [0, 0, 5, 0]).token_ids
    b = Sampler(0).sample(logits, params, [0, 0, 5, 0]).token_ids
    assert torch.equal(a, b)  # same global seed, same per-request seeds
    assert a[3] == logits[3].argmax()  # greedy row
    draws = {int(Sampler(9).sample(logits[:1], [seeded], [i]).token_ids[0]) for i in range(40)}
    assert len(draws) > 5  # token i's generator depends on i
    alone = Sampler(3).sample(logits[2:3], [seeded], [5]).token_ids
    assert alone[0] == a[2]  # a seeded row does not depend on its batch neighbours
