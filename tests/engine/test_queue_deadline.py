"""The engine's queue deadline: a request that could not start in time ends with a 503 that
says so (it never ran, so another instance may take it); running, preempted and fresh
requests are untouched, and the blocks are exact afterwards."""

from __future__ import annotations

from hybridpd.engine.args import EngineArgs
from hybridpd.engine.core import Engine
from hybridpd.engine.protocol import QUEUE_TIMEOUT_MESSAGE, GenerateRequest

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
    assert len(failed) == 1 and failed[0].finished and failed[0].error_code == 503
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
