"""P/D edge cases with in-process engines and real NIXL: seeded sampling and min_tokens across
the hand-off equal co-located; a lease that expired before D read is caught by D's confirmation
(the READ "succeeds" on reused blocks) and recomputed; aborting one transfer loses nobody else's
result; a bad first token is refused, not fatal."""

from __future__ import annotations

import time

import pytest

from hybridpd.engine.args import EngineArgs
from hybridpd.engine.core import Engine
from hybridpd.engine.driving import step_when_due
from hybridpd.engine.protocol import GenerateRequest
from hybridpd.request import SamplingParams

from .pd_helpers import (
    REMOTE_DECODE,
    greedy,
    p_answer,
    pd_generate,
    run_all,
    settle,
    to_decode,
    tokens,
)


def _make(model: str, role: str, **kw) -> Engine:
    return Engine(EngineArgs(model_dir=model, role=role, device="cpu", kernel_block_size=4,
                             cache_memory=8 << 20, **kw))


@pytest.fixture
def trio(tiny_model):
    engines = (_make(tiny_model, "both"), _make(tiny_model, "prefill", lease_s=0.5),
               _make(tiny_model, "decode"))
    yield engines
    for e in engines:
        e.shutdown()


def _prompt(n: int, salt: int = 0) -> tuple[int, ...]:
    return tuple((29 * j + salt) % 300 + 3 for j in range(n))


def test_seeded_sampling_and_min_tokens_match_colocated(trio):
    both, p, d = trio
    params = SamplingParams(max_tokens=10, temperature=0.8, top_p=0.95, seed=1234,
                            ignore_eos=True, min_tokens=3)
    want = tokens(run_all(both, [GenerateRequest("c", _prompt(30), params)])["c"])
    got, _ = pd_generate(p, d, "r", list(_prompt(30)), params)
    assert got == want
    # min_tokens counts P's first token: stop ids may end the request at output 3, not 4
    stop = want[2]
    p2 = SamplingParams(max_tokens=10, temperature=0.0, min_tokens=3, stop_token_ids=(stop,),
                        ignore_eos=True)
    want2 = tokens(run_all(both, [GenerateRequest("c2", _prompt(30), p2)])["c2"])
    got2, _ = pd_generate(p, d, "r2", list(_prompt(30)), p2)
    assert got2 == want2


def test_expired_lease_is_detected_and_recomputed(trio):
    both, p, d = trio
    prompt = _prompt(40, 1)
    p_outs = run_all(p, [GenerateRequest("x", prompt, greedy(8), REMOTE_DECODE)])
    kv = p_answer(p, p_outs["x"][-1])
    time.sleep(0.7)
    settle(p, 2)  # the lease expires: P frees the blocks ...
    run_all(p, [GenerateRequest("y", _prompt(40, 2), greedy(4))])  # ... and reuses them
    d.add_request(GenerateRequest("x", prompt, greedy(8), to_decode(d, kv)))
    outs = []
    deadline = time.monotonic() + 60
    while not (outs and outs[-1].finished):
        assert time.monotonic() < deadline
        outs.extend(step_when_due(d))
    stats = next(o.transfer_stats for o in outs if o.transfer_stats)
    assert stats["outcome"] == "failed" and "expired" in stats["error"]
    want = tokens(run_all(both, [GenerateRequest("c", prompt, greedy(8))])["c"])
    assert tokens(p_outs["x"]) + tokens(outs) == want
    assert d.stats().counters["requests_recomputed"] == 1


@pytest.mark.parametrize("land_s", [0.0, 0.2], ids=["abort-while-posting", "abort-after-landing"])
def test_abort_during_transfer_loses_no_other_result(trio, land_s):
    _, p, d = trio
    kvs = {}
    for rid in ("a", "b"):
        o = run_all(p, [GenerateRequest(rid, _prompt(60, ord(rid)), greedy(6),
                                        REMOTE_DECODE)])[rid]
        kvs[rid] = p_answer(p, o[-1])
    for rid in ("a", "b"):
        d.add_request(GenerateRequest(rid, _prompt(60, ord(rid)), greedy(6),
                                      to_decode(d, kvs[rid])))
    d.step()  # both READs start (handshake + post on the receiver's threads)
    time.sleep(land_s)  # 0: A is still being posted or in flight; 0.2: both have landed
    d.abort_request("a")
    outs = []
    deadline = time.monotonic() + 30
    while not (outs and outs[-1].finished):
        assert time.monotonic() < deadline, "b never finished"
        outs.extend(o for o in step_when_due(d) if o.request_id == "b")
        step_when_due(p)
    assert len(tokens(outs)) == 5
    settle(d)
    settle(p)
    assert d.blocks.num_free == d.blocks.num_usable
    assert p.blocks.num_free == p.blocks.num_usable


def test_out_of_range_first_token_is_refused(trio):
    _, p, d = trio
    o = run_all(p, [GenerateRequest("z", _prompt(9), greedy(4), REMOTE_DECODE)])
    kv = dict(p_answer(p, o["z"][-1]), first_token=10**6)
    with pytest.raises(ValueError, match="first_token"):
        d.add_request(GenerateRequest("z", _prompt(9), greedy(4), to_decode(d, kv)))
    assert not d.has_work()


def test_signed_hand_offs_forged_params_refused(tiny_model):
    p = _make(tiny_model, "prefill", kv_secret="k1")
    d = _make(tiny_model, "decode", kv_secret="k1")
    try:
        o = run_all(p, [GenerateRequest("s", _prompt(20), greedy(4), REMOTE_DECODE)])
        kv = p_answer(p, o["s"][-1])
        assert "signature" in kv
        forged = dict(kv, block_ids=[[1] * len(g) for g in kv["block_ids"]])
        with pytest.raises(ValueError, match="signature"):
            d.add_request(GenerateRequest("s", _prompt(20), greedy(4),
                                          to_decode(d, forged)))
        unsigned = {k: v for k, v in kv.items() if k != "signature"}
        with pytest.raises(ValueError, match="not signed"):
            d.add_request(GenerateRequest("s", _prompt(20), greedy(4),
                                          to_decode(d, unsigned)))
        got, d_outs = pd_generate(p, d, "s2", list(_prompt(20)), greedy(4))
        assert len(got) == 4 and d_outs[-1].finished
    finally:
        p.shutdown()
        d.shutdown()
