"""Engine behaviour on CPU: chunked prefill equivalence, continuous batching under a small
pool with preemption, exact freeing, stop conditions and sampling determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hybridpd.engine.args import EngineArgs
from hybridpd.engine.core import Engine
from hybridpd.engine.protocol import GenerateRequest
from hybridpd.request import FinishReason, SamplingParams

from .pd_helpers import greedy, run_all, tokens


def _engine(model: str, device: torch.device | str = "cpu", **kw) -> Engine:
    kw.setdefault("cache_memory", 16 << 20)
    kw.setdefault("dtype", "float32")  # exact equalities: fp32 everywhere (auto: bf16 on CUDA)
    return Engine(EngineArgs(model_dir=model, device=str(device), **kw))


def _capture_logits(engine: Engine) -> list[torch.Tensor]:
    """Record every logits row the sampler sees (one per sampled token, in order)."""
    seen: list[torch.Tensor] = []
    sampler = engine.executor.worker.runner.sampler
    inner = sampler.sample

    def sample(logits, params, output_index):
        seen.extend(row.clone() for row in logits)
        return inner(logits, params, output_index)

    sampler.sample = sample
    return seen


def _prompt(n: int, salt: int = 0) -> tuple[int, ...]:
    return tuple((31 * j + 17 * salt) % 370 + 3 for j in range(n))


@pytest.mark.parametrize("model", ["tiny_model", "small_model"])
def test_chunk_budgets_match_one_pass(model, request, device):
    path = request.getfixturevalue(model)
    prompt = _prompt(90)
    results = []
    for budget in (1, 7, 64, len(prompt)):
        eng = _engine(path, device, max_num_batched_tokens=budget)
        logits = _capture_logits(eng)
        out = run_all(eng, [GenerateRequest("a", prompt, greedy(16))])["a"]
        results.append((tokens(out), torch.stack(logits)))
        eng.shutdown()
    ref_tokens, ref_logits = results[-1]
    for budget_tokens, budget_logits in results[:-1]:
        assert budget_tokens == ref_tokens
        torch.testing.assert_close(budget_logits, ref_logits, rtol=0, atol=1e-5)


def test_batching_under_small_pool_with_preemption(tiny_model, device):
    lengths = [int(x) for x in np.linspace(1, 700, 16)]
    reqs = [GenerateRequest(f"r{i}", _prompt(n, i), greedy(8)) for i, n in enumerate(lengths)]
    probe = _engine(tiny_model)
    need_one = probe.blocks.blocks_for(max(lengths) + 8)
    need_all = sum(probe.blocks.blocks_for(n + 8) for n in lengths)
    block_bytes = probe.executor.geometry.block_bytes
    probe.shutdown()
    budget = (need_one + 4) * block_bytes  # room for the largest, far from room for all
    assert need_all > 2 * (need_one + 3)

    eng = _engine(tiny_model, device, cache_memory=budget, max_num_batched_tokens=256)
    together = run_all(eng, reqs)
    assert eng.scheduler.num_preemptions > 0, "the small pool should force preemption"
    assert eng.blocks.num_free == eng.blocks.num_usable
    alone_engine = _engine(tiny_model, device)
    for r in reqs:
        alone = run_all(alone_engine, [r])[r.request_id]
        assert tokens(together[r.request_id]) == tokens(alone), r.request_id
        assert together[r.request_id][-1].finish_reason == FinishReason.LENGTH
    assert alone_engine.blocks.num_free == alone_engine.blocks.num_usable
    eng.shutdown()
    alone_engine.shutdown()


def test_request_larger_than_pool_is_refused(tiny_model):
    probe = _engine(tiny_model)
    block_bytes = probe.executor.geometry.block_bytes
    probe.shutdown()
    eng = _engine(tiny_model, cache_memory=8 * block_bytes)
    with pytest.raises(ValueError, match="cache blocks"):
        eng.add_request(GenerateRequest("big", _prompt(3000), greedy(4)))
    assert not eng.has_work()
    eng.shutdown()


def test_stop_token_ids_eos_and_abort(tiny_model, device):
    eng = _engine(tiny_model, device)
    free = run_all(eng, [GenerateRequest("a", _prompt(5), greedy(10))])["a"]
    first, second = tokens(free)[:2]
    out = run_all(eng, [GenerateRequest(
        "b", _prompt(5), SamplingParams(max_tokens=10, temperature=0.0, stop_token_ids=(second,),
                                        ignore_eos=True))])["b"]
    assert tokens(out) == [first, second] and out[-1].finish_reason == FinishReason.STOP
    eng.add_request(GenerateRequest("c", _prompt(300), greedy(50)))
    eng.step()
    eng.abort_request("c")
    assert not eng.has_work() and eng.blocks.num_free == eng.blocks.num_usable
    eng.shutdown()


def test_seeded_sampling_is_reproducible_and_logprobs(tiny_model, device):
    eng = _engine(tiny_model, device)
    p = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, top_k=50, seed=7, logprobs=3,
                       ignore_eos=True)
    a = run_all(eng, [GenerateRequest("a", _prompt(20), p)])["a"]
    b = run_all(eng, [GenerateRequest("b", _prompt(20), p),
                      GenerateRequest("x", _prompt(33), greedy(5))])["b"]
    assert tokens(a) == tokens(b)
    lps = [lp for o in a for lp in (o.new_logprobs or ())]
    assert len(lps) == 12
    for lp in lps:
        assert lp.logprob <= 0 and len(lp.top) == 3
        assert lp.top[0][1] >= lp.logprob - 1e-6
    eng.shutdown()


def test_invalid_requests_are_refused_clearly(tiny_model):
    eng = _engine(tiny_model, max_model_len=64)
    with pytest.raises(ValueError, match="empty"):
        eng.add_request(GenerateRequest("e", (), greedy(4)))
    with pytest.raises(ValueError, match="out of range"):
        eng.add_request(GenerateRequest("v", (1, 10**9), greedy(4)))
    with pytest.raises(ValueError, match="context length"):
        eng.add_request(GenerateRequest("l", _prompt(60), greedy(10)))
    eng.add_request(GenerateRequest("ok", _prompt(4), greedy(2)))
    with pytest.raises(ValueError, match="already in use"):
        eng.add_request(GenerateRequest("ok", _prompt(4), greedy(2)))
    eng.shutdown()


def test_huge_seed_is_refused_and_large_valid_seed_samples(tiny_model):
    with pytest.raises(ValueError, match="seed"):
        SamplingParams(seed=12345678901234567890)
    eng = _engine(tiny_model)
    p = SamplingParams(max_tokens=3, temperature=1.0, seed=2**63 - 1, ignore_eos=True)
    out = run_all(eng, [GenerateRequest("s", _prompt(5), p)])["s"]
    assert len(tokens(out)) == 3
    eng.shutdown()


def test_a_failing_step_fails_its_batch_and_the_engine_goes_on(tiny_model):
    eng = _engine(tiny_model)
    model = eng.executor.worker.runner.model
    real = model.forward
    calls = {"n": 0}

    def flaky(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(*a, **kw)

    model.forward = flaky
    eng.add_request(GenerateRequest("bad", _prompt(12), greedy(4)))
    outs = eng.step()
    assert outs and outs[0].finish_reason == FinishReason.ERROR and "out of memory" in outs[0].error
    assert eng.blocks.num_free == eng.blocks.num_usable
    ok = run_all(eng, [GenerateRequest("good", _prompt(12), greedy(4))])["good"]
    assert len(tokens(ok)) == 4 and eng.stats().counters["step_failures"] == 1
    eng.shutdown()
