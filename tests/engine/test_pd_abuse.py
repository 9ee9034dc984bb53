"""P/D abuse and transport faults with in-process engines over real NIXL (UCX loopback), with a
deployment secret: a consumed hand-off cannot be replayed (refused by D, and if D forgot it, P's
per-READ confirmation fails it closed, so no answer ever holds another request's state); a
hand-off is bound to its prompt; and with every 4th READ failing, landing late or losing its
notice, concurrent outputs still equal co-located ones and both pools end exactly free."""

from __future__ import annotations

import time

import pytest

from hybridpd.disagg.consumed import ConsumedHandoffs
from hybridpd.engine.args import EngineArgs
from hybridpd.engine.core import Engine
from hybridpd.engine.driving import step_when_due
from hybridpd.engine.protocol import GenerateOutput, GenerateRequest
from hybridpd.request import SamplingParams

from .pd_faults import Fault, FaultyAgent
from .pd_helpers import REMOTE_DECODE, greedy, p_answer, run_all, settle, to_decode, tokens

SECRET = "test-deployment-secret"


def _make(model: str, role: str, **kw) -> Engine:
    if role != "both":
        kw.setdefault("kv_secret", SECRET)
    return Engine(EngineArgs(model_dir=model, role=role, device="cpu", kernel_block_size=4,
                             cache_memory=8 << 20, **kw))


def _prompt(n: int, salt: int) -> list[int]:
    return [(13 * j + 7 * salt) % 300 + 3 for j in range(n)]


def _prefill(p: Engine, reqs: list[tuple[str, list[int]]], params: SamplingParams) -> dict:
    outs = run_all(p, [GenerateRequest(rid, tuple(prompt), params, REMOTE_DECODE)
                       for rid, prompt in reqs])
    return {rid: outs[rid] for rid, _ in reqs}


def _decode(p: Engine, d: Engine, reqs: list[tuple[str, list[int], dict]],
            params: SamplingParams, timeout_s: float = 120) -> dict[str, list[GenerateOutput]]:
    """Add every (id, prompt, P's kv) to D and step both until all finished."""
    outs: dict[str, list[GenerateOutput]] = {rid: [] for rid, _, _ in reqs}
    for rid, prompt, kv in reqs:
        d.add_request(GenerateRequest(rid, tuple(prompt), params,
                                      to_decode(d, kv)))
    deadline = time.monotonic() + timeout_s
    while not all(o and o[-1].finished for o in outs.values()):
        assert time.monotonic() < deadline, "P/D relay did not finish in time"
        for o in step_when_due(d):
            outs[o.request_id].append(o)
        step_when_due(p)
    return outs


def _outcome(outs: list[GenerateOutput]) -> str:
    (stats,) = [o.transfer_stats for o in outs if o.transfer_stats]
    return stats["outcome"]


def _assert_free(*engines: Engine) -> None:
    for e in engines:
        settle(e, timeout_s=20)
        assert e.blocks.num_free == e.blocks.num_usable


def test_replayed_hand_off_never_returns_another_requests_state(tiny_model):
    both, p, d, d2 = (_make(tiny_model, "both"), _make(tiny_model, "prefill", lease_s=2.0),
                      _make(tiny_model, "decode"), _make(tiny_model, "decode"))
    try:
        params = greedy(8)
        attacker, victim = _prompt(20, 1), _prompt(20, 2)
        ref = {name: tokens(run_all(both, [GenerateRequest(name, tuple(pr), params)])[name])
               for name, pr in (("a", attacker), ("v", victim))}
        first_a = _prefill(p, [("a", attacker)], params)["a"]
        kv_a = p_answer(p, first_a[-1])
        out = _decode(p, d, [("a", attacker, kv_a)], params)["a"]
        assert _outcome(out) == "ok"
        settle(p)  # P freed the attacker's blocks after D's notice ...
        first_v = _prefill(p, [("v", victim)], params)["v"]  # ... and the victim reuses them
        kv_v = p_answer(p, first_v[-1])
        assert set(map(tuple, kv_v["block_ids"])) & set(map(tuple, kv_a["block_ids"]))

        with pytest.raises(ValueError, match="already consumed"):  # 1. D remembers
            d.add_request(GenerateRequest("a", tuple(attacker), params,
                                          to_decode(d, kv_a)))
        d.connector.consumed = ConsumedHandoffs(ttl_s=60.0)  # 2. D forgot (evicted): P's nonce
        d2_out = {}
        for name, engine in (("same-reader", d), ("other-reader", d2)):
            got = _decode(p, engine, [(f"a-{name}", attacker, kv_a)], params)[f"a-{name}"]
            assert _outcome(got) == "failed", name  # READ not trusted: recomputed locally
            d2_out[name] = tokens(first_a) + tokens(got)
            assert d2_out[name] == ref["a"], name  # never the victim's continuation
        got_v = _decode(p, d, [("v", victim, kv_v)], params)["v"]  # the victim is unharmed
        assert _outcome(got_v) == "ok" and tokens(first_v) + tokens(got_v) == ref["v"]
        _assert_free(p, d, d2)
    finally:
        for e in (both, p, d, d2):
            e.shutdown()


def test_hand_off_is_bound_to_its_prompt(tiny_model):
    p, d = _make(tiny_model, "prefill", lease_s=1.0), _make(tiny_model, "decode")
    try:
        prompt = _prompt(12, 3)
        kv = p_answer(p, _prefill(p, [("b", prompt)], greedy(4))["b"][-1])
        other = [*prompt[:-1], prompt[-1] + 1]  # same length, one token differs
        with pytest.raises(ValueError, match="another prompt"):
            d.add_request(GenerateRequest("b", tuple(other), greedy(4),
                                          to_decode(d, kv)))
        assert not d.has_work()
        out = _decode(p, d, [("b", prompt, kv)], greedy(4))["b"]  # not consumed by the refusal
        assert _outcome(out) == "ok"
        _assert_free(p, d)
    finally:
        p.shutdown()
        d.shutdown()


def _faulty_run(tiny_model: str, num_requests: int, concurrency: int, every: int) -> None:
    both, p, d = (_make(tiny_model, "both"), _make(tiny_model, "prefill", lease_s=1.0),
                  _make(tiny_model, "decode"))
    agent = FaultyAgent(d.executor.worker.endpoint.agent, every=every, delay_s=0.1)
    d.executor.worker.endpoint.agent = agent
    try:
        params = greedy(6)
        bt = both.executor.geometry.block_tokens
        prompts = {f"r{i}": _prompt(3 + (i * 5) % (2 * bt + 3), i) for i in range(num_requests)}
        outcomes: dict[str, int] = {}
        for start in range(0, num_requests, concurrency):
            batch = list(prompts.items())[start:start + concurrency]
            ref = run_all(both, [GenerateRequest(rid, tuple(pr), params) for rid, pr in batch])
            first = _prefill(p, batch, params)
            got = _decode(p, d, [(rid, pr, p_answer(p, first[rid][-1]))
                                 for rid, pr in batch], params)
            for rid, _ in batch:
                assert tokens(first[rid]) + tokens(got[rid]) == tokens(ref[rid]), rid
                outcome = _outcome(got[rid])
                outcomes[outcome] = outcomes.get(outcome, 0) + 1
        assert all(agent.injected[f] > 0 for f in Fault), agent.injected
        assert outcomes.get("failed", 0) >= agent.injected[Fault.FAIL_POST]
        assert outcomes.get("ok", 0) > 0
        _assert_free(p, d)
    finally:
        for e in (both, p, d):
            e.shutdown()


def test_transport_faults_under_concurrency_equal_colocated(tiny_model):
    _faulty_run(tiny_model, num_requests=40, concurrency=8, every=4)


def test_transport_faults_500_requests(tiny_model):  # issue 11's figure: 1 in 16 READs, c16
    _faulty_run(tiny_model, num_requests=500, concurrency=16, every=16)
