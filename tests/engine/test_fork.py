"""n / best_of on one engine: the prompt is computed once and its state forked into each sample.

Greedy samples equal a single request's tokens; seeded sample i equals a single request with
seed + i (so the forked state is the state the sample would have computed itself); the pool
shows the sharing (full attention blocks shared, only partial blocks and Mamba state copied) and
returns exactly to fully free; preempted samples recompute correctly; best_of returns the n
samples of highest cumulative logprob.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from hybridpd.cache.pool import BlockPool
from hybridpd.engine.args import EngineArgs
from hybridpd.engine.block_manager import BlockManager
from hybridpd.engine.core import Engine
from hybridpd.engine.llm import LLM
from hybridpd.engine.protocol import GenerateOutput, GenerateRequest
from hybridpd.request import FinishReason, SamplingParams

from .pd_helpers import (
    REMOTE_DECODE,
    assert_pools_free,
    greedy,
    p_answer,
    run_all,
    to_decode,
    tokens,
)


def _engine(model: str, device="cpu", **kw) -> Engine:
    kw.setdefault("cache_memory", 16 << 20)
    kw.setdefault("dtype", "float32")  # exact equalities: fp32 everywhere (auto: bf16 on CUDA)
    return Engine(EngineArgs(model_dir=model, device=str(device), **kw))


def _prompt(n: int, salt: int = 0) -> tuple[int, ...]:
    return tuple((29 * j + 13 * salt) % 350 + 5 for j in range(n))


def _choices(outs: list[GenerateOutput], n: int) -> list[list[int]]:
    return [[t for o in outs if o.index == i for t in o.new_token_ids] for i in range(n)]


def _sampled(seed: int, max_tokens: int = 10, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=1.0, top_k=40, seed=seed,
                          ignore_eos=True, **kw)


def test_greedy_n3_equals_one_request_and_prompt_runs_once(tiny_model, device):
    eng = _engine(tiny_model, device)
    bt = eng.executor.geometry.block_tokens
    try:
        for length in (1, 2 * bt, 2 * bt + 5):
            prompt = _prompt(length, length)
            one = tokens(run_all(eng, [GenerateRequest("one", prompt, greedy(9))])["one"])
            before = dict(eng.stats().counters)
            outs = run_all(eng, [GenerateRequest("n3", prompt, replace(greedy(9), n=3))])["n3"]
            after = eng.stats().counters
            assert _choices(outs, 3) == [one] * 3, f"prompt length {length}"
            assert [o.finished for o in outs].count(True) == 1 and outs[-1].finished
            ends = [o for o in outs if o.choice_finished]
            assert sorted(o.index for o in ends) == [0, 1, 2]
            assert all(o.finish_reason == FinishReason.LENGTH for o in ends)
            # the prompt ran through the model once, not three times
            assert after["prompt_tokens_computed"] - before["prompt_tokens_computed"] == length
            assert after["forks"] - before["forks"] == 1
            assert after["samples_forked"] - before["samples_forked"] == 3
            assert eng.blocks.num_free == eng.blocks.num_usable
            assert eng.blocks.num_shared == 0
    finally:
        eng.shutdown()


def test_fork_shares_full_blocks_and_copies_the_rest(tiny_model):
    eng = _engine(tiny_model)
    bt = eng.executor.geometry.block_tokens
    geo = eng.executor.geometry
    n_attn, n_mamba = len(geo.attention_groups), len(geo.mamba_groups)
    try:
        length = 3 * bt + 7
        eng.add_request(GenerateRequest("r", _prompt(length), replace(greedy(30), n=4)))
        for _ in range(100):  # the prompt fits one step's budget: it forks in the first step
            group = eng.forks.get("r")
            assert group is not None
            if group.forked:
                break
            eng.step()
        assert group.forked
        # after the fork: one set of prompt blocks + per extra sample a partial block and
        # its Mamba state blocks; the three full blocks of each attention group are shared
        parent = eng.blocks.blocks_for(length)
        assert eng.blocks.num_usable - eng.blocks.num_free == parent + 3 * (n_attn + n_mamba)
        assert eng.blocks.num_shared == 3 * n_attn
        held = [eng.blocks.get(f"r#{i}") for i in range(4)]
        for g in range(n_attn):
            assert len({h.attn[g][0] for h in held}) == 1  # shared
            assert len({h.attn[g][3] for h in held}) == 4  # partial: each its own
        assert len({b for h in held for b in h.mamba}) == 4 * n_mamba
        # abort mid-decode: every reference goes, the pool is whole again
        eng.step()
        assert eng.abort_request("r")
        assert not eng.has_work()
        assert eng.blocks.num_free == eng.blocks.num_usable and eng.blocks.num_shared == 0
    finally:
        eng.shutdown()


def test_block_manager_fork_free_is_exact_in_any_order():
    pool = BlockPool(64)
    bm = BlockManager(pool, num_attn_groups=2, num_mamba_groups=3, block_tokens=4)
    assert bm.ensure("p", 10)  # 3 blocks per attention group (2 full + partial) + 3 state
    copies = bm.fork("p", "c1", 10)
    assert copies is not None and len(copies) == 2 + 3
    bm.rename("p", "c0")
    copies2 = bm.fork("c0", "c2", 10)
    assert copies2 is not None
    assert bm.num_shared == 4  # 2 full blocks x 2 groups, each held by three
    assert pool.num_allocated == 9 + 2 * 5
    assert bm.ensure("c1", 13)  # grows past the shared prefix into its own blocks
    bm.free("c0")
    bm.free("c2")
    assert bm.num_shared == 0 and all(pool.is_allocated(b) for b in bm.get("c1").all_ids())
    bm.free("c1")
    assert pool.num_free == pool.num_total_usable and bm.num_shared == 0
    # an exact-multiple prompt has no partial block to copy; a short pool refuses, takes none
    assert bm.ensure("q", 8)
    assert bm.fork_cost(8) == 3
    small = BlockManager(BlockPool(6), 1, 2, 4)
    assert small.ensure("q", 8)
    assert small.fork("q", "q1", 8) is None and small.pool.num_free == 1
    with pytest.raises(ValueError, match="already holds"):
        bm.fork("q", "q", 8)


def test_seeded_samples_are_reproducible_and_each_equals_its_own_seed(tiny_model, device):
    prompt = _prompt(70, 1)
    runs = []
    for _ in range(2):
        eng = _engine(tiny_model, device)
        outs = run_all(eng, [GenerateRequest("s", prompt, replace(_sampled(11), n=3))])["s"]
        runs.append(_choices(outs, 3))
        singles = [tokens(run_all(eng, [GenerateRequest(f"x{i}", prompt, _sampled(11 + i))])[
            f"x{i}"]) for i in range(3)]
        eng.shutdown()
    assert runs[0] == runs[1]
    assert runs[0] == singles
    assert len({tuple(c) for c in runs[0]}) > 1  # the samples differ from each other


def test_preempted_samples_recompute_correctly(tiny_model, device):
    probe = _engine(tiny_model)
    bt = probe.executor.geometry.block_tokens
    block_bytes = probe.executor.geometry.block_bytes
    length, gen = bt + 3, 3 * bt
    need_one = probe.blocks.blocks_for(length + gen)
    probe.shutdown()
    prompt = _prompt(length, 2)
    eng = _engine(tiny_model, device, cache_memory=(need_one + 3) * block_bytes)
    try:
        one = tokens(run_all(eng, [GenerateRequest("one", prompt, greedy(gen))])["one"])
        outs = run_all(eng, [GenerateRequest("n4", prompt, replace(greedy(gen), n=4))])["n4"]
        assert eng.scheduler.num_preemptions > 0, "the small pool should force preemption"
        assert _choices(outs, 4) == [one] * 4
        assert eng.blocks.num_free == eng.blocks.num_usable and eng.blocks.num_shared == 0
    finally:
        eng.shutdown()


def test_best_of_returns_the_n_most_likely_samples(tiny_model):
    prompt = _prompt(40, 3)
    eng = _engine(tiny_model)
    try:
        outs = run_all(eng, [GenerateRequest(
            "b", prompt, replace(_sampled(5, max_tokens=6), n=2, best_of=4))])["b"]
        assert [o.index for o in outs] == [0, 1] and outs[-1].finished
        assert all(o.new_logprobs is None for o in outs)  # not asked for
        singles = []
        for i in range(4):
            o = run_all(eng, [GenerateRequest(f"x{i}", prompt,
                                              _sampled(5 + i, max_tokens=6, logprobs=0))])[f"x{i}"]
            singles.append((sum(lp.logprob for x in o for lp in x.new_logprobs or ()),
                            tokens(o)))
        best = sorted(singles, key=lambda s: -s[0])[:2]
        assert [list(o.new_token_ids) for o in outs] == [b[1] for b in best]
        assert eng.blocks.num_free == eng.blocks.num_usable
    finally:
        eng.shutdown()


def test_llm_lists_of_prompts_and_n(tiny_model):
    llm = LLM(tiny_model, device="cpu", cache_memory=16 << 20)
    try:
        prompts = [list(_prompt(5 + 9 * i, i)) for i in range(4)]
        p = replace(greedy(6), ignore_eos=True)
        together = llm.generate(prompts, p)
        alone = [llm.generate([q], p)[0] for q in prompts]
        assert [o.token_ids for o in together] == [o.token_ids for o in alone]
        assert [o.prompt_token_ids for o in together] == prompts
        many = llm.generate(prompts[:2], replace(p, n=3))
        assert [(o.prompt_token_ids, o.index) for o in many] == [
            (q, i) for q in prompts[:2] for i in range(3)]
        assert [o.token_ids for o in many] == [o.token_ids for o in alone[:2] for _ in range(3)]
        # a stop string ends each choice on its own (greedy: both at the same place)
        text = alone[0].text
        assert len(text) > 2
        stopped = llm.generate([prompts[0]], replace(p, n=2, stop=(text[1:3],)))
        assert all(o.finish_reason == "stop" and o.text == text[:1] for o in stopped)
        assert llm.engine.blocks.num_free == llm.engine.blocks.num_usable
    finally:
        llm.close()


def test_n_refusals_are_clear(tiny_model):
    with pytest.raises(ValueError, match="best_of"):
        SamplingParams(n=3, best_of=2)
    with pytest.raises(ValueError, match="n must be"):
        SamplingParams(n=0)
    eng = _engine(tiny_model, max_num_seqs=4)
    try:
        with pytest.raises(ValueError, match="max_num_seqs"):
            eng.add_request(GenerateRequest("big", _prompt(4), replace(greedy(2), n=5)))
        eng.add_request(GenerateRequest("a#1", _prompt(4), greedy(2)))
        with pytest.raises(ValueError, match="already in use"):
            eng.add_request(GenerateRequest("a", _prompt(4), replace(greedy(2), n=2)))
        assert eng.forks.get("a") is None and "a#1" in eng.scheduler.requests
    finally:
        eng.shutdown()
    assert SamplingParams.from_dict(SamplingParams(n=2, best_of=3).to_dict()).best_of == 3


def _pd_engines(model_dir: str, handoff: str, device) -> tuple[Engine, Engine, Engine]:
    # fp32 on every device: in n-1 mode D recomputes the last prompt token on the decode
    # path, which in bf16 rounds differently from co-located's prefill path (near-ties flip)
    common = dict(model_dir=model_dir, device=str(device), kernel_block_size=4,
                  cache_memory=8 << 20, handoff=handoff, dtype="float32")
    return (Engine(EngineArgs(role="both", **common)),
            Engine(EngineArgs(role="prefill", **common)),
            Engine(EngineArgs(role="decode", **common)))


def _pd_n(p: Engine, d: Engine, rid: str, prompt: tuple[int, ...],
          params: SamplingParams) -> tuple[list[int], list[GenerateOutput]]:
    """The proxy's relay for n > 1: P prefills with n = 1, D forks after one transfer."""
    p_params = replace(params, n=1, best_of=None)
    p_outs = run_all(p, [GenerateRequest(rid, prompt, p_params, REMOTE_DECODE)])[rid]
    kv = p_answer(p, p_outs[-1])
    assert kv is not None
    d_outs = run_all(d, [GenerateRequest(rid, prompt, params, to_decode(d, kv))],
                     timeout_s=120)[rid]
    return tokens(p_outs), d_outs


@pytest.mark.parametrize("handoff", ["first-token", "n-1"])
def test_pd_forks_on_decode_after_one_transfer(tiny_model, handoff, device):
    both, p, d = _pd_engines(tiny_model, handoff, device)
    try:
        bt = both.executor.geometry.block_tokens
        prompt = _prompt(2 * bt + 3, 4)
        cases = [replace(greedy(8), n=3)]
        if handoff == "n-1":  # first-token mode refuses sampled n > 1 (see below)
            cases.append(replace(_sampled(21, max_tokens=8), n=3))
        for k, params in enumerate(cases):
            ref = _choices(run_all(both, [GenerateRequest(f"c{k}", prompt, params)])[f"c{k}"], 3)
            d_before = dict(d.stats().counters)
            first, d_outs = _pd_n(p, d, f"r{k}", prompt, params)
            got = _choices(d_outs, 3)
            if handoff == "first-token":  # P's first token is every sample's first token
                got = [first + c for c in got]
            assert got == ref
            stats = [o.transfer_stats for o in d_outs if o.transfer_stats]
            assert len(stats) == 1 and stats[0]["outcome"] == "ok"  # one READ for three
            counters = d.stats().counters
            assert counters["forks"] - d_before["forks"] == 1
            # D computed only what the transfer did not carry: one token
            assert counters["prompt_tokens_computed"] - d_before["prompt_tokens_computed"] == 1
            p.step()
        if handoff == "first-token":
            p_outs = run_all(p, [GenerateRequest("s", prompt, _sampled(3, max_tokens=8),
                                                 REMOTE_DECODE)])["s"]
            kv = p_answer(p, p_outs[-1])
            assert kv is not None
            with pytest.raises(ValueError, match="n-1"):
                d.add_request(GenerateRequest("s", prompt, replace(_sampled(3, max_tokens=8), n=2),
                                              to_decode(d, kv)))
            assert p.abort_request("s")  # as the proxy does when D refuses: P frees at once
        assert_pools_free(both, p, d)
    finally:
        for e in (both, p, d):
            e.shutdown()


def _step_until_forked(eng: Engine, rid: str) -> list[GenerateOutput]:
    outs: list[GenerateOutput] = []
    for _ in range(100):
        group = eng.forks.get(rid)
        assert group is not None
        if group.forked:
            return outs
        outs += eng.step()
    raise AssertionError("the prompt never forked")


def test_one_sample_stopped_the_others_go_on(tiny_model):
    eng = _engine(tiny_model)
    try:
        prompt = _prompt(30, 5)
        one = tokens(run_all(eng, [GenerateRequest("one", prompt, greedy(6))])["one"])
        eng.add_request(GenerateRequest("r", prompt, replace(greedy(6), n=3)))
        outs = _step_until_forked(eng, "r")
        outs += eng.step()
        assert eng.abort_request("r#1")  # e.g. its stop string matched
        for _ in range(50):
            if outs and outs[-1].finished:
                break
            outs += eng.step()
        assert outs[-1].finished and [o.finished for o in outs].count(True) == 1
        got = _choices(outs, 3)
        assert got[0] == got[2] == one and got[1] == one[:len(got[1])] and len(got[1]) < 6
        assert not eng.has_work() and eng.blocks.num_free == eng.blocks.num_usable
    finally:
        eng.shutdown()


def test_a_failed_step_fails_the_request_once_and_frees_every_sample(tiny_model):
    eng = _engine(tiny_model)
    try:
        eng.add_request(GenerateRequest("r", _prompt(60, 6), replace(greedy(8), n=3)))
        outs = _step_until_forked(eng, "r")
        executor = eng.executor
        real = executor.execute

        def boom(out):  # noqa: ANN001, ANN202
            executor.execute = real
            raise RuntimeError("out of device memory")

        executor.execute = boom  # type: ignore[method-assign]
        outs += eng.step()
        errors = [o for o in outs if o.error]
        assert len(errors) == 1 and errors[0].finished and errors[0].request_id == "r"
        assert "out of device memory" in errors[0].error
        assert not eng.has_work() and eng.blocks.num_free == eng.blocks.num_usable
        assert eng.forks.get("r") is None and not eng.scheduler.requests
    finally:
        eng.shutdown()


def test_forked_samples_keep_the_prompt_history_for_penalties(tiny_model):
    """Penalties read the token history: each sample's starts as the prompt's (its own row)."""
    eng = _engine(tiny_model)
    try:
        prompt = _prompt(50, 7)
        pen = dict(repetition_penalty=1.5, presence_penalty=0.8, frequency_penalty=0.3)
        g = replace(greedy(10), **pen)
        one = tokens(run_all(eng, [GenerateRequest("one", prompt, g)])["one"])
        plain = tokens(run_all(eng, [GenerateRequest("plain", prompt, greedy(10))])["plain"])
        assert one != plain  # the penalties change this answer
        outs = run_all(eng, [GenerateRequest("n3", prompt, replace(g, n=3))])["n3"]
        assert _choices(outs, 3) == [one] * 3
        s = replace(_sampled(3), **pen)
        singles = [tokens(run_all(eng, [GenerateRequest(f"x{i}", prompt, replace(s, seed=3 + i))])[
            f"x{i}"]) for i in range(3)]
        outs = run_all(eng, [GenerateRequest("s3", prompt, replace(s, n=3))])["s3"]
        assert _choices(outs, 3) == singles
        # history rows are handed back with the next step that runs: after one more request
        # only its own row is left (the forked prompts' rows went too, not only the samples')
        run_all(eng, [GenerateRequest("z", prompt[:5], replace(g, max_tokens=2))])
        history = eng.executor.worker.runner.history
        assert history is not None and len(history) == 1
        assert eng.blocks.num_free == eng.blocks.num_usable
    finally:
        eng.shutdown()
