"""Penalties, logit_bias, min_p, bad words and allowed_token_ids through `LLM` and `Engine` on
the demo model: every sampled token is the one the feature's definition gives for the model's
own logits and the request's prompt and output so far (chunked prefill and P/D included)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from hybridpd.engine.args import EngineArgs
from hybridpd.engine.core import Engine
from hybridpd.engine.llm import LLM
from hybridpd.engine.protocol import GenerateRequest
from hybridpd.request import SamplingParams

from .pd_helpers import pd_generate, run_all, tokens

PROMPT = [(13 * j) % 200 + 5 for j in range(40)]


_DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module", params=_DEVICES)
def llm(tiny_model, request):
    llm = LLM(tiny_model, device=request.param, cache_memory=16 << 20,
              max_num_batched_tokens=16)
    yield llm
    llm.close()


def _record(engine: Engine) -> list[torch.Tensor]:
    """Every raw logits row the sampler sees (one request at a time: one row per token)."""
    seen: list[torch.Tensor] = []
    sampler = engine.executor.worker.runner.sampler
    inner = sampler.sample

    def sample(logits, params, output_index, **kw):
        seen.extend(row.detach().cpu() for row in logits)
        return inner(logits, params, output_index, **kw)

    sampler.sample = sample  # type: ignore[method-assign]
    return seen


def _reference(raw: torch.Tensor, p: SamplingParams, prompt: list[int],
               outputs: list[int]) -> torch.Tensor:
    """The definitions, written plainly for one row."""
    row = raw.clone()
    if p.allowed_token_ids is not None:
        keep = torch.full_like(row, float("-inf"))
        keep[list(p.allowed_token_ids)] = 0.0
        row = row + keep
    for w in p.bad_words_token_ids:
        prefix = list(w[:-1])
        if not prefix or outputs[len(outputs) - len(prefix):] == prefix:
            row[w[-1]] = float("-inf")
    for t, b in p.logit_bias:
        row[t] += b
    for t in set(prompt) | set(outputs):
        row[t] = row[t] / p.repetition_penalty if row[t] > 0 else row[t] * p.repetition_penalty
    for t, c in Counter(outputs).items():
        row[t] -= p.frequency_penalty * c + p.presence_penalty
    return row


def _generate(llm: LLM, p: SamplingParams, prompt: list[int] = PROMPT
              ) -> tuple[list[int], list[torch.Tensor]]:
    seen = _record(llm.engine)
    try:
        out = llm.generate([prompt], p)[0]
    finally:
        del llm.engine.executor.worker.runner.sampler.sample
    return out.token_ids, seen


def _check_greedy(llm: LLM, p: SamplingParams) -> list[int]:
    got, seen = _generate(llm, p)
    assert len(got) == len(seen) == p.max_tokens
    for i, (tok, raw) in enumerate(zip(got, seen)):
        want = int(_reference(raw, p, PROMPT, got[:i]).argmax())
        assert tok == want, f"token {i}"
    return got


def _greedy(**kw) -> SamplingParams:
    return SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, **kw)


def test_logit_bias_plus_100_forces_the_token(llm) -> None:
    base, _ = _generate(llm, _greedy())
    t = next(x for x in range(3, 100) if x not in base)
    assert _check_greedy(llm, _greedy(logit_bias=((t, 100.0),))) == [t] * 10
    sampled = llm.generate([PROMPT], SamplingParams(max_tokens=10, seed=5, ignore_eos=True,
                                                    logit_bias=((t, 100.0),)))[0]
    assert sampled.token_ids == [t] * 10


def test_allowed_token_ids_yield_only_those(llm) -> None:
    assert _check_greedy(llm, _greedy(allowed_token_ids=(42,))) == [42] * 10
    allowed = (7, 11, 42)
    got = llm.generate([PROMPT], SamplingParams(max_tokens=30, temperature=2.0, seed=3,
                                                ignore_eos=True, allowed_token_ids=allowed))
    assert set(got[0].token_ids) <= set(allowed)
    assert len(set(got[0].token_ids)) > 1  # still sampled among them


def test_penalties_change_the_output_as_defined(llm) -> None:
    base = _check_greedy(llm, _greedy())
    assert len(set(base)) < len(base)  # the demo model repeats itself greedily
    freq = _check_greedy(llm, _greedy(frequency_penalty=2.0, presence_penalty=2.0))
    assert freq != base
    assert max(Counter(freq).values()) < max(Counter(base).values())
    rep = _check_greedy(llm, _greedy(repetition_penalty=3.0))
    assert rep != base
    _check_greedy(llm, _greedy(presence_penalty=-1.0, repetition_penalty=0.7))


def test_bad_words_ban_their_last_token_after_their_prefix(llm) -> None:
    base = _check_greedy(llm, _greedy())
    single = _check_greedy(llm, _greedy(bad_words_token_ids=((base[0],),)))
    assert base[0] not in single
    word = (base[2], base[3])  # after base[2] the model would say base[3]
    multi = _check_greedy(llm, _greedy(bad_words_token_ids=(word,)))
    assert multi[:3] == base[:3] and multi[3] != base[3]
    assert all(multi[i:i + 2] != list(word) for i in range(len(multi) - 1))


def test_min_p_draws_only_near_the_top(llm) -> None:
    p = SamplingParams(max_tokens=12, temperature=1.5, seed=9, ignore_eos=True, min_p=0.3)
    got, seen = _generate(llm, p)
    for tok, raw in zip(got, seen):
        probs = torch.softmax(raw.double() / p.temperature, dim=-1)
        assert probs[tok] >= p.min_p * probs.max()


def test_out_of_vocab_ids_are_refused(tiny_model, llm) -> None:
    vocab = llm.engine.model_config.vocab_size
    for kw in ({"logit_bias": ((vocab, 1.0),)}, {"allowed_token_ids": (1, vocab + 5)},
               {"bad_words_token_ids": ((1, vocab),)}):
        name = next(iter(kw))
        with pytest.raises(ValueError, match=f"{name} token ids out of range"):
            llm.engine.add_request(GenerateRequest("bad", (1, 2), _greedy(**kw)))
    assert not llm.engine.has_work()  # nothing was queued


@pytest.mark.parametrize("handoff", ["first-token", "n-1"])
def test_pd_applies_the_same_processing_as_colocated(tiny_model, handoff) -> None:
    common = dict(model_dir=tiny_model, device="cpu", cache_memory=8 << 20, handoff=handoff)
    both, p, d = (Engine(EngineArgs(role=r, **common)) for r in ("both", "prefill", "decode"))
    try:
        params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True,
                                frequency_penalty=1.5, repetition_penalty=2.0,
                                bad_words_token_ids=((7, 8), (9,)), logit_bias=((3, 2.0),))
        for i, prompt in enumerate([PROMPT[:5], PROMPT]):
            ref = tokens(run_all(both, [GenerateRequest(f"c{i}", tuple(prompt), params)])[f"c{i}"])
            got, _ = pd_generate(p, d, f"r{i}", prompt, params)
            assert got == ref
            plain = tokens(run_all(both, [GenerateRequest(
                f"g{i}", tuple(prompt), SamplingParams(max_tokens=8, temperature=0.0,
                                                       ignore_eos=True))])[f"g{i}"])
            assert got != plain  # the processing did change the output
    finally:
        for e in (both, p, d):
            e.shutdown()


def test_batched_and_preempted_requests_keep_their_own_history(tiny_model) -> None:
    """Penalised and plain requests share batches in a small pool that forces preemption (a
    preempted request recomputes its prompt and outputs in chunks): each answer equals the
    request run alone, and every history row is freed at the end."""
    lengths = [int(x) for x in torch.linspace(5, 400, 10).tolist()]
    pen = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True,
                         frequency_penalty=2.0, repetition_penalty=1.5,
                         bad_words_token_ids=((5, 6, 7),))
    plain = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    reqs = [GenerateRequest(f"r{i}", tuple((31 * j + 17 * i) % 370 + 3 for j in range(n)),
                            pen if i % 2 else plain) for i, n in enumerate(lengths)]
    probe = Engine(EngineArgs(model_dir=tiny_model, device="cpu", cache_memory=16 << 20))
    need_one = probe.blocks.blocks_for(max(lengths) + 12)
    budget = (need_one + 3) * probe.executor.geometry.block_bytes
    alone = {r.request_id: tokens(run_all(probe, [r])[r.request_id]) for r in reqs}
    probe.shutdown()
    eng = Engine(EngineArgs(model_dir=tiny_model, device="cpu", cache_memory=budget,
                            max_num_batched_tokens=128))
    try:
        together = run_all(eng, reqs)
        assert eng.scheduler.num_preemptions > 0, "the small pool should force preemption"
        for r in reqs:
            assert tokens(together[r.request_id]) == alone[r.request_id], r.request_id
        run_all(eng, [GenerateRequest("last", (3, 4), plain)])  # its steps deliver finishes
        history = eng.executor.worker.runner.history
        assert history is not None and len(history) == 0
    finally:
        eng.shutdown()
