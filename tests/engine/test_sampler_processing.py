"""Logit processing in the sampler on hand-made logits: each penalty, logit_bias, min_p, bad
words and allowed_token_ids picks the token its definition says, greedy rows included."""

from __future__ import annotations

import pytest
import torch

from hybridpd.engine import sampler as sampler_mod
from hybridpd.engine.sampler import HistoryRows, Sampler, _min_p_rows, process_logits
from hybridpd.request import SamplingParams

V = 12


def _greedy(**kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, **kw)


def _history(rows: list[int], outputs: list[list[int]], prompts: list[list[int]],
             tail: int = 4) -> HistoryRows:
    counts = torch.zeros((len(rows), V), dtype=torch.int32)
    seen = torch.zeros((len(rows), V), dtype=torch.bool)
    for j, (out, prompt) in enumerate(zip(outputs, prompts)):
        for t in out:
            counts[j, t] += 1
        for t in prompt:
            seen[j, t] = True
    return HistoryRows(tuple(rows), counts, seen, tuple(tuple(o[-tail:]) for o in outputs))


def _row(*vals: float) -> torch.Tensor:
    row = torch.full((V,), -5.0)
    row[: len(vals)] = torch.tensor(vals)
    return row


def _on(device: torch.device, h: HistoryRows) -> HistoryRows:
    return HistoryRows(h.rows, h.output_counts.to(device), h.prompt_seen.to(device), h.tails)


def _pick(logits: torch.Tensor, params: list[SamplingParams],
          history: HistoryRows | None = None, device: str | torch.device = "cpu") -> list[int]:
    dev = torch.device(device)
    h = None if history is None else _on(dev, history)
    return Sampler(0).sample(logits.to(dev), params, [0] * len(params), history=h) \
        .token_ids.tolist()


def test_presence_penalty_subtracts_once_per_token_of_the_output(device) -> None:
    logits = torch.stack([_row(2.0, 1.9), _row(2.0, 1.9)])
    hist = _history([0, 1], [[0], []], [[], [0]])  # row 1: token 0 only in the prompt
    got = _pick(logits, [_greedy(presence_penalty=0.5)] * 2, hist, device=device)
    assert got == [1, 0]  # 2.0 - 0.5 < 1.9; the prompt does not count
    out = process_logits(logits, [_greedy(presence_penalty=0.5)] * 2, hist)
    assert out[0, 0].item() == pytest.approx(1.5)
    assert out[0, 1].item() == pytest.approx(1.9)


def test_frequency_penalty_scales_with_the_count(device) -> None:
    logits = torch.stack([_row(2.0, 1.9), _row(2.0, 1.9)])
    hist = _history([0, 1], [[0], [0, 0, 0]], [[], []])
    got = _pick(logits, [_greedy(frequency_penalty=0.05)] * 2, hist, device=device)
    assert got == [0, 1]  # 2 - 0.05 > 1.9; 2 - 0.15 < 1.9
    favoured = _pick(torch.stack([_row(1.0, 1.9)]), [_greedy(frequency_penalty=-1.0)],
                     _history([0], [[0]], [[]]), device=device)
    assert favoured == [0]  # a negative penalty favours repeats: 1.0 + 1.0 > 1.9


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits(device) -> None:
    logits = torch.stack([_row(2.0, 1.5), _row(-1.0, -1.4, -9.0)])
    logits[1, 3:] = -9.0
    hist = _history([0, 1], [[], [0]], [[0], []])  # row 0: prompt token; row 1: output token
    p = _greedy(repetition_penalty=1.5)
    out = process_logits(logits, [p, p], hist)
    assert out[0, 0].item() == pytest.approx(2.0 / 1.5)
    assert out[1, 0].item() == pytest.approx(-1.5)
    assert out[0, 1].item() == pytest.approx(1.5)  # unseen tokens untouched
    assert _pick(logits, [p, p], hist, device=device) == [1, 1]


def test_logit_bias_plus_100_forces_a_token_even_when_sampling(device) -> None:
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(temperature=1.0, seed=s, logit_bias=((7, 100.0),)) for s in range(3)]
    assert _pick(logits, params, device=device) == [7, 7, 7]
    best = int(logits[0].argmax())
    second = int(logits[0].topk(2).indices[1])
    assert _pick(logits[:1], [_greedy(logit_bias=((best, -100.0),))], device=device) == [second]


def test_logit_bias_accepts_a_mapping_and_checks_ranges() -> None:
    p = SamplingParams(logit_bias={"3": 1.5, 1: -2})  # type: ignore[arg-type]
    assert p.logit_bias == ((1, -2.0), (3, 1.5))
    with pytest.raises(ValueError, match=r"logit_bias\[3\] must be in \[-100, 100\]"):
        SamplingParams(logit_bias=((3, 101.0),))
    with pytest.raises(ValueError, match="non-negative integers"):
        SamplingParams(logit_bias=((-1, 1.0),))


def test_min_p_keeps_only_tokens_near_the_top(device) -> None:
    probs = torch.tensor([0.5, 0.3, 0.12, 0.08])
    logits = torch.full((1, V), -1e9)
    logits[0, :4] = probs.log()
    kept = _min_p_rows(logits.clone(), [0.5]).isfinite()[0]
    assert kept.nonzero().flatten().tolist() == [0, 1]  # 0.12 < 0.5 * 0.5
    assert _min_p_rows(logits.clone(), [0.0]).isfinite().all()
    seen = {tok for s in range(60) for tok in _pick(
        logits, [SamplingParams(temperature=1.0, seed=s, min_p=0.5)], device=device)}
    assert seen == {0, 1}
    seen_all = {tok for s in range(60) for tok in _pick(
        logits, [SamplingParams(temperature=1.0, seed=s)], device=device)}
    assert {2, 3} & seen_all  # without min_p the tail is drawn


def test_single_token_bad_words_are_always_banned(device) -> None:
    logits = torch.stack([_row(1.0, 3.0, 2.0)])
    assert _pick(logits, [_greedy(bad_words_token_ids=((1,),))], device=device) == [2]


def test_a_bad_words_last_token_is_banned_after_its_prefix(device) -> None:
    logits = torch.stack([_row(1.0, 3.0, 2.0)] * 3)
    p = _greedy(bad_words_token_ids=((4, 5, 1),))
    hist = _history([0, 1, 2], [[9, 4, 5], [4, 6], [5]], [[], [], []])
    assert _pick(logits, [p] * 3, hist, device=device) == [2, 1, 1]  # only row 0 ends with 4, 5


def test_allowed_token_ids_restricts_greedy_and_sampled_rows(device) -> None:
    logits = torch.randn(1, V, generator=torch.Generator().manual_seed(4))
    allowed = (2, 9)
    want = max(allowed, key=lambda t: float(logits[0, t]))
    assert _pick(logits, [_greedy(allowed_token_ids=allowed)], device=device) == [want]
    seen = {tok for s in range(40) for tok in _pick(
        logits, [SamplingParams(seed=s, allowed_token_ids=allowed)], device=device)}
    assert seen == set(allowed)
    with pytest.raises(ValueError, match="allowed_token_ids must not be empty"):
        SamplingParams(allowed_token_ids=())


def test_rows_without_features_and_logprobs_are_untouched(monkeypatch) -> None:
    logits = torch.randn(2, V, generator=torch.Generator().manual_seed(2))
    best = int(logits[1].argmax())
    params = [_greedy(logprobs=0), _greedy(logprobs=0, logit_bias=((best, -100.0),))]
    out = Sampler(0).sample(logits, params, [0, 0])
    assert out.token_ids[0] == logits[0].argmax()
    assert out.token_ids[1] != best
    raw = torch.log_softmax(logits, dim=-1)  # logprobs are those of the model's output
    assert out.logprobs is not None
    assert out.logprobs[1].item() == pytest.approx(raw[1, out.token_ids[1]].item())

    def boom(*a, **kw):
        raise AssertionError("a batch without logit processing must not process logits")

    monkeypatch.setattr(sampler_mod, "process_logits", boom)
    plain = Sampler(0).sample(logits, [_greedy(), SamplingParams(seed=1, top_k=3)], [0, 0])
    assert plain.token_ids[0] == logits[0].argmax()


def test_penalties_without_history_are_refused() -> None:
    with pytest.raises(ValueError, match="token history"):
        _pick(torch.zeros(1, V), [_greedy(presence_penalty=1.0)])


@pytest.mark.parametrize("kw,msg", [
    ({"presence_penalty": 2.5}, r"presence_penalty must be in \[-2, 2\]"),
    ({"frequency_penalty": -3}, r"frequency_penalty must be in \[-2, 2\]"),
    ({"repetition_penalty": 0.0}, r"repetition_penalty must be in \(0, 100\]"),
    ({"min_p": 1.5}, r"min_p must be in \[0, 1\]"),
    ({"min_p": "x"}, "min_p must be a number"),
    ({"bad_words_token_ids": ((),)}, "empty word"),
    ({"bad_words_token_ids": ("ab",)}, "token id lists"),
    ({"allowed_token_ids": (1, 2), "bad_words_token_ids": ((2,), (1,))}, "all bad words"),
])
def test_out_of_range_values_are_clear_errors(kw, msg) -> None:
    with pytest.raises(ValueError, match=msg):
        SamplingParams(**kw)


def test_new_fields_round_trip_through_dicts() -> None:
    p = SamplingParams(presence_penalty=0.5, frequency_penalty=-0.5, repetition_penalty=1.2,
                       logit_bias=((3, 1.0),), min_p=0.1, bad_words_token_ids=((1, 2), (4,)),
                       allowed_token_ids=(1, 2, 3))
    assert SamplingParams.from_dict(p.to_dict()) == p
    assert SamplingParams.from_dict(SamplingParams().to_dict()) == SamplingParams()
