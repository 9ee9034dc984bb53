"""Each request's first output carries its queue time (engine arrival -> first scheduled), once;
later outputs, preemption and aborted requests leave nothing behind."""

from __future__ import annotations

from hybridpd.engine.args import EngineArgs
from hybridpd.engine.core import Engine
from hybridpd.engine.protocol import GenerateRequest

from .pd_helpers import greedy

WAITED_S = 1000.0


def _drain(eng: Engine) -> list:
    outs = []
    for _ in range(100):  # a deadline in steps: the requests below need a few dozen
        if not eng.has_work():
            break
        outs.extend(eng.step())
    assert not eng.has_work()
    return outs


def test_the_first_output_of_each_request_carries_its_queue_time(tiny_model):
    eng = Engine(EngineArgs(model_dir=tiny_model, device="cpu", cache_memory=16 << 20,
                            max_num_seqs=1))
    eng.add_request(GenerateRequest("first", (5, 6, 7), greedy(3)))
    eng.add_request(GenerateRequest("second", (5, 6, 8), greedy(3)))
    eng.add_request(GenerateRequest("gone", (5, 6, 9), greedy(3)))
    eng.scheduler.waiting[1].arrival -= WAITED_S  # "second" arrived long before it could run
    outs = eng.step()
    assert [o.request_id for o in outs] == ["first"] and outs[0].queued_s is not None
    assert 0 <= outs[0].queued_s < WAITED_S
    assert eng.abort_request("gone")
    outs += _drain(eng)
    by_id: dict[str, list] = {}
    for o in outs:
        by_id.setdefault(o.request_id, []).append(o)
    assert set(by_id) == {"first", "second"}
    for rid, seq in by_id.items():
        assert seq[0].queued_s is not None and seq[0].queued_s >= 0, rid
        assert all(o.queued_s is None for o in seq[1:]), rid
    assert by_id["second"][0].queued_s >= WAITED_S
    assert eng.scheduler.queue_s == {}  # nothing left for requests that finished or left
    eng.shutdown()
