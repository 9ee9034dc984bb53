"""Prompt logprobs (`SamplingParams.prompt_logprobs`) and `max_tokens = 0` through the engine.

Each prompt token's logprob given its prefix equals `torch.log_softmax` of transformers'
NemotronH logits on the same checkpoint; chunked prefill (scores gathered across chunks) equals
one chunk; a request that does not ask pays nothing and gets none; a prefill instance scores the
whole prompt in both hand-off modes, and answers a `max_tokens = 0` request itself.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from hybridpd.disagg.handoff import RemotePrefill
from hybridpd.disagg.params import HandoffMode, TransferParams
from hybridpd.engine.args import EngineArgs
from hybridpd.engine.core import Engine
from hybridpd.engine.protocol import GenerateRequest
from hybridpd.engine.scheduler import _score_rows
from hybridpd.request import FinishReason, Request, SamplingParams

from .pd_helpers import REMOTE_DECODE, greedy, run_all, settle, tokens

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))
from nemotron_testlib import make_reference  # noqa: E402

TOP = 3


def _engine(model_dir, device="cpu", **kw) -> Engine:
    return Engine(EngineArgs(model_dir=str(model_dir), device=str(device), dtype="float32",
                             cache_memory=8 << 20, kernel_block_size=4, **kw))


def _scores(outs) -> list:
    """The prompt logprobs of one request's outputs (exactly one output carries them)."""
    carrying = [o.prompt_logprobs for o in outs if o.prompt_logprobs is not None]
    assert len(carrying) == 1
    return list(carrying[0])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    return make_reference("M*M-M-", out, seed=11), out


def test_prompt_logprobs_equal_reference_log_softmax(reference, device):
    ref, model_dir = reference
    gen = torch.Generator().manual_seed(5)
    prompt = torch.randint(3, 96, (23,), generator=gen).tolist()
    other = torch.randint(3, 96, (9,), generator=gen).tolist()
    with torch.no_grad():
        want = torch.log_softmax(ref(torch.tensor([prompt])).logits[0].float(), dim=-1)
    eng = _engine(model_dir, device)
    try:
        outs = run_all(eng, [
            GenerateRequest("s", tuple(prompt),
                            SamplingParams(max_tokens=0, prompt_logprobs=TOP)),
            GenerateRequest("g", tuple(other), greedy(4)),  # batched with it, asks nothing
        ])
    finally:
        eng.shutdown()
    assert tokens(outs["s"]) == [] and outs["s"][-1].finish_reason is FinishReason.LENGTH
    assert all(o.prompt_logprobs is None for o in outs["g"]) and len(tokens(outs["g"])) == 4
    got = _scores(outs["s"])
    assert len(got) == len(prompt) and got[0] is None
    for i in range(1, len(prompt)):
        lp = got[i]
        assert lp.token_id == prompt[i]
        assert abs(lp.logprob - float(want[i - 1, prompt[i]])) < 1e-4, i
        row, target = want[i - 1], float(want[i - 1, prompt[i]])  # rank, up to near-ties
        lo, hi = (int((row > target + d).sum()) + 1 for d in (1e-4, -1e-4))
        assert lo <= lp.rank <= hi, i
        top_lp, top_ids = want[i - 1].topk(TOP)
        assert [t for t, _ in lp.top] == top_ids.tolist(), i
        assert max(abs(v - float(w)) for (_, v), w in zip(lp.top, top_lp)) < 1e-4, i


@pytest.mark.parametrize("max_tokens", [0, 5])
def test_chunked_prefill_scores_equal_one_chunk(reference, max_tokens):
    _, model_dir = reference
    prompt = [(11 * j) % 90 + 3 for j in range(30)]
    params = replace(greedy(max_tokens), prompt_logprobs=2)
    results = []
    for budget in (256, 7):  # one chunk; five chunks of <= 7 tokens
        eng = _engine(model_dir, max_num_batched_tokens=budget)
        try:
            outs = run_all(eng, [GenerateRequest("r", tuple(prompt), params)])["r"]
        finally:
            eng.shutdown()
        if max_tokens:  # the first output (the first token's) carries them
            assert outs[0].prompt_logprobs is not None
        results.append((tokens(outs), _scores(outs)))
    (one_tokens, one), (chunked_tokens, chunked) = results
    assert len(one_tokens) == max_tokens and chunked_tokens == one_tokens
    assert [lp.token_id for lp in chunked[1:]] == prompt[1:]
    for a, b in zip(one[1:], chunked[1:]):
        assert abs(a.logprob - b.logprob) < 1e-5
        assert [t for t, _ in a.top] == [t for t, _ in b.top]


def test_scores_taken_in_slices_equal_one_slice(reference, monkeypatch):
    import hybridpd.engine.runner as runner

    _, model_dir = reference
    prompt = [(5 * j) % 90 + 3 for j in range(19)]
    params = SamplingParams(max_tokens=0, prompt_logprobs=2)
    results = []
    for size in (runner.SCORE_SLICE, 4):  # one slice; five slices of <= 4 rows
        monkeypatch.setattr(runner, "SCORE_SLICE", size)
        eng = _engine(model_dir)
        try:
            results.append(_scores(run_all(eng, [GenerateRequest("r", tuple(prompt),
                                                                 params)])["r"]))
        finally:
            eng.shutdown()
    whole, sliced = results
    assert [lp.token_id for lp in sliced[1:]] == prompt[1:]
    for a, b in zip(whole[1:], sliced[1:]):
        assert abs(a.logprob - b.logprob) < 1e-5 and a.rank == b.rank
        assert [t for t, _ in a.top] == [t for t, _ in b.top]


def test_scored_rows_after_preemption_are_not_redone():
    req = Request("r", list(range(10)), SamplingParams(prompt_logprobs=0))
    req.scored_token_ids = list(range(10))
    assert _score_rows(req, 0, 4) == (0, (1, 2, 3, 4))  # rows 0..3 score tokens 1..4
    req.prompt_scores = [None] * 6  # tokens 1..6 scored before a preemption
    assert _score_rows(req, 0, 4) == (0, ())
    assert _score_rows(req, 4, 6) == (2, (7, 8, 9))  # rows 6..8; row 9 predicts an output
    req.prompt_scores = [None] * 9
    assert _score_rows(req, 0, 12) == (0, ())
    plain = Request("p", list(range(10)), SamplingParams())
    assert _score_rows(plain, 0, 10) == (0, ())


def test_validation():
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=21)
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=True)
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=-1)
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(max_tokens=0, min_tokens=1)
    p = SamplingParams(max_tokens=0, prompt_logprobs=4)
    assert SamplingParams.from_dict(p.to_dict()) == p


def test_decode_leg_refuses_prompt_work(tiny_model):
    eng = Engine(EngineArgs(model_dir=tiny_model, device="cpu", cache_memory=8 << 20))
    try:
        kv = RemotePrefill(TransferParams(  # what D's API makes of P's answer
            request_id="a", engine_id="p", side_channel="127.0.0.1:1", tp_size=1,
            block_ids=(), num_tokens=0, handoff=HandoffMode.N_MINUS_1))
        with pytest.raises(ValueError, match="prefill instance"):
            eng.add_request(GenerateRequest("a", (5, 6), SamplingParams(prompt_logprobs=1), kv))
        with pytest.raises(ValueError, match="max_tokens=0"):
            eng.add_request(GenerateRequest("b", (5, 6), SamplingParams(max_tokens=0), kv))
        assert not eng.has_work()
    finally:
        eng.shutdown()


@pytest.mark.parametrize("handoff", ["first-token", "n-1"])
def test_prefill_instance_scores_the_whole_prompt(tiny_model, handoff):
    common = dict(model_dir=tiny_model, device="cpu", kernel_block_size=4,
                  cache_memory=8 << 20, handoff=handoff)
    both = Engine(EngineArgs(role="both", **common))
    p = Engine(EngineArgs(role="prefill", **common))
    try:
        prompt = [(7 * j) % 300 + 3 for j in range(13)]
        params = replace(greedy(6), prompt_logprobs=1)
        ref = _scores(run_all(both, [GenerateRequest("c", tuple(prompt), params)])["c"])
        p_outs = run_all(p, [GenerateRequest("r", tuple(prompt), params,
                                             REMOTE_DECODE)])["r"]
        assert p_outs[-1].kv_transfer_params is not None  # handed off: D decodes the rest
        got = _scores(p_outs)
        assert len(got) == len(prompt) and got[0] is None
        for a, b in zip(ref[1:], got[1:]):
            assert a.token_id == b.token_id and abs(a.logprob - b.logprob) < 1e-5
            assert [t for t, _ in a.top] == [t for t, _ in b.top]
        p.abort_request("r")  # no decode leg here: drop the held state
        # max_tokens = 0: P answers it itself, nothing to hand off
        zero = run_all(p, [GenerateRequest("z", tuple(prompt),
                                           replace(params, max_tokens=0),
                                           REMOTE_DECODE)])["z"]
        assert zero[-1].kv_transfer_params is None and tokens(zero) == []
        assert zero[-1].finish_reason is FinishReason.LENGTH
        # a 1-token prompt (n-1 mode: nothing for P to compute) has only the leading None
        one = run_all(p, [GenerateRequest("o", (9,), params, REMOTE_DECODE)])["o"]
        assert _scores(one) == [None]
        if one[-1].kv_transfer_params is not None:
            p.abort_request("o")
        assert [lp.token_id for lp in _scores(zero)[1:]] == prompt[1:]
        assert max(abs(a.logprob - b.logprob) for a, b in zip(_scores(zero)[1:], got[1:])) < 1e-5
        settle(p)
        assert p.blocks.num_free == p.blocks.num_usable
    finally:
        both.shutdown()
        p.shutdown()


def test_tensor_parallel_scores_equal_tp1(tiny_model):
    """TP = 2 (gloo, one process per rank): rank 0 scores, the result equals TP = 1's."""
    prompt = tuple((13 * j) % 300 + 3 for j in range(40))
    params = replace(greedy(3), prompt_logprobs=2)
    results = []
    for tp in (1, 2):
        eng = Engine(EngineArgs(model_dir=tiny_model, device="cpu", tp_size=tp,
                                cache_memory=8 << 20, max_num_batched_tokens=16))
        try:
            outs = run_all(eng, [GenerateRequest("r", prompt, params)])["r"]
        finally:
            eng.shutdown()
        results.append((tokens(outs), _scores(outs)))
    (t1, s1), (t2, s2) = results
    assert t1 == t2 and len(s1) == len(s2) == len(prompt)
    for a, b in zip(s1[1:], s2[1:]):
        assert a.token_id == b.token_id and abs(a.logprob - b.logprob) < 1e-4


def test_prompt_scores_are_the_raw_model_distribution_under_penalties(reference):
    """Penalties change what is sampled, never the prompt's logprobs (vLLM: raw scores)."""
    _, model_dir = reference
    prompt = tuple((7 * j) % 90 + 3 for j in range(15))
    eng = _engine(model_dir)
    try:
        outs = run_all(eng, [
            GenerateRequest("plain", prompt, replace(greedy(3), prompt_logprobs=1)),
            GenerateRequest("pen", prompt, replace(greedy(3), prompt_logprobs=1,
                                                   repetition_penalty=1.8,
                                                   presence_penalty=1.0)),
        ])
    finally:
        eng.shutdown()
    plain, pen = _scores(outs["plain"]), _scores(outs["pen"])
    for a, b in zip(plain[1:], pen[1:]):
        assert a.token_id == b.token_id and abs(a.logprob - b.logprob) < 1e-6
        assert [t for t, _ in a.top] == [t for t, _ in b.top]
