"""The engine's queue deadline: a request that could not start in time ends with a 503 that
says so (it never ran, so another instance may take it); running, preempted and fresh
requests are untouched, and the blocks are exact afterwards."""

from __future__ import annotations

from hybridpd.engine.args import EngineArgs
from hybridpd.engine.core import Engine
from hybridpd.engine.driving import step_when_due
from hybridpd.engine.protocol import QUEUE_TIMEOUT_MESSAGE, GenerateRequest
from hybridpd.server.error_status import http_status

from .pd_helpers import greedy

TIMEOUT_S = 30.0


def _engine(model: str, **kw) -> Engine:
    return Engine(EngineArgs(model_dir=model, device="cpu", cache_memory=16 << 20, **kw))


def test_a_request_waiting_past_the_deadline_fails_with_503(tiny_model):
    eng = _engine(tiny_model, max_num_seqs=1, queue_timeout_s=TIMEOUT_S)
    eng.add_request(GenerateRequest("busy", (5, 6, 7), greedy(50)))
    eng.add_request(GenerateRequest("late", (5, 6, 8), greedy(4)))
    eng.add_request(GenerateRequest("fresh", (5, 6, 9), greedy(4)))
    outs = eng.step()  # "busy" takes the only slot
    assert [o.request_id for o in outs] == ["busy"]
    late = next(r for r in eng.scheduler.waiting if r.request_id == "late")
    late.arrival -= TIMEOUT_S + 1  # as if it had waited past the deadline
    outs = eng.step()
    failed = [o for o in outs if o.request_id == "late"]
    assert len(failed) == 1 and failed[0].finished and http_status(failed[0].error_kind) == 503
    assert failed[0].error.startswith(QUEUE_TIMEOUT_MESSAGE)
    assert [r.request_id for r in eng.scheduler.waiting] == ["fresh"]  # still queued
    assert eng.stats().counters["queue_timeouts"] == 1
    eng.abort_request("busy")
    eng.abort_request("fresh")
    assert eng.blocks.num_free == eng.blocks.num_usable
    eng.shutdown()


def test_no_deadline_by_default_and_preempted_requests_never_expire(tiny_model):
    eng = _engine(tiny_model, max_num_seqs=1)
    eng.add_request(GenerateRequest("a", (5, 6, 7), greedy(3)))
    eng.add_request(GenerateRequest("b", (5, 6, 8), greedy(3)))
    eng.scheduler.waiting[-1].arrival -= 10_000
    eng.step()
    assert "b" in eng.scheduler.requests  # no deadline configured
    eng.shutdown()
    eng = _engine(tiny_model, max_num_seqs=1, queue_timeout_s=TIMEOUT_S)
    eng.add_request(GenerateRequest("a", (5, 6, 7), greedy(3)))
    req = eng.scheduler.waiting[0]
    req.num_preemptions, req.arrival = 1, req.arrival - 10_000  # it started once already
    assert eng.scheduler.expired_waiting(req.arrival + 10_001, TIMEOUT_S) == []
    eng.shutdown()


def test_abort_says_whether_the_engine_knew_the_id(tiny_model):
    eng = _engine(tiny_model)
    eng.add_request(GenerateRequest("a", (5, 6, 7), greedy(3)))
    assert eng.abort_request("a") is True
    assert eng.abort_request("a") is False
    assert eng.abort_request("never") is False
    eng.shutdown()


def test_on_decode_an_expired_hand_off_fails_503_and_p_gets_its_blocks_back(tiny_model):
    """D (one slot) cannot start the second hand-off in time: 503, P's lease is released
    (not left to expire), and both pools end exactly free. Real NIXL over UCX loopback."""
    from .pd_helpers import REMOTE_DECODE, p_answer, run_all, settle, to_decode

    common = dict(model_dir=tiny_model, device="cpu", kernel_block_size=4,
                  cache_memory=8 << 20)
    p = Engine(EngineArgs(role="prefill", lease_s=600.0, **common))
    d = Engine(EngineArgs(role="decode", max_num_seqs=1, queue_timeout_s=TIMEOUT_S, **common))
    try:
        kv = {}
        for rid, prompt in (("a", (5, 6, 7, 8, 9)), ("b", (9, 8, 7, 6, 5))):
            outs = run_all(p, [GenerateRequest(rid, prompt, greedy(40),
                                               REMOTE_DECODE)])[rid]
            kv[rid] = (prompt, p_answer(p, outs[-1]))
        d.add_request(GenerateRequest("a", kv["a"][0], greedy(40),
                                      to_decode(d, kv["a"][1])))
        d.step()  # "a" takes D's only slot
        d.add_request(GenerateRequest("b", kv["b"][0], greedy(40),
                                      to_decode(d, kv["b"][1])))
        next(r for r in d.scheduler.waiting if r.request_id == "b").arrival -= TIMEOUT_S + 1
        failed = [o for o in d.step() if o.request_id == "b"]
        assert len(failed) == 1 and http_status(failed[0].error_kind) == 503
        assert failed[0].error.startswith(QUEUE_TIMEOUT_MESSAGE)
        run_until_finished(d, p, "a")
        settle(d)
        settle(p)  # b's lease (600 s) was released by D, not left to expire
        assert p.blocks.num_free == p.blocks.num_usable
        assert d.blocks.num_free == d.blocks.num_usable
    finally:
        d.shutdown()
        p.shutdown()


def run_until_finished(d: Engine, p: Engine, rid: str, timeout_s: float = 120) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        assert time.monotonic() < deadline, f"{rid} did not finish in time"
        if any(o.request_id == rid and o.finished for o in step_when_due(d)):
            return
        step_when_due(p)
