"""`Engine.step()` never sleeps; `idle_wait_s()` tells the driver how long it may block: 0 when
a step would compute, the role's poll interval when only leases (P) or READs (D) are
outstanding, None when there is nothing at all. In-process drivers wait through
`engine/driving.py`; the engine process's loop blocks on its pipe (`server/engine_loop.py`)."""

from __future__ import annotations

import threading
import time

import pytest

from hybridpd.engine import driving
from hybridpd.engine.args import EngineArgs
from hybridpd.engine.core import Engine
from hybridpd.engine.protocol import GenerateRequest

from .pd_helpers import REMOTE_DECODE, greedy, p_answer, pd_generate, run_all, settle, to_decode


def _make(model: str, role: str, **kw) -> Engine:
    return Engine(EngineArgs(model_dir=model, role=role, device="cpu", kernel_block_size=4,
                             cache_memory=8 << 20, **kw))


class _SleepsOfThisThread:
    """Records time.sleep calls made by the test's thread (other threads sleep as usual)."""

    def __init__(self) -> None:
        self.calls: list[float] = []
        self._real = time.sleep
        self._thread = threading.get_ident()

    def __call__(self, s: float) -> None:
        if threading.get_ident() == self._thread:
            self.calls.append(s)
        self._real(s)


@pytest.fixture
def sleeps(monkeypatch):
    rec = _SleepsOfThisThread()
    monkeypatch.setattr(time, "sleep", rec)
    return rec


def test_colocated_waits_for_nothing_or_blocks_until_a_request(tiny_model, sleeps):
    eng = _make(tiny_model, "both")
    try:
        assert eng.idle_wait_s() is None and not eng.has_work()
        eng.add_request(GenerateRequest("a", (5, 6, 7), greedy(3)))
        assert eng.idle_wait_s() == 0.0
        while eng.has_work():
            assert eng.idle_wait_s() == 0.0
            eng.step()
        assert eng.idle_wait_s() is None
        assert sleeps.calls == []
    finally:
        eng.shutdown()


def test_prefill_holding_a_lease_polls_and_its_step_never_sleeps(tiny_model, sleeps):
    p = _make(tiny_model, "prefill", lease_s=30.0)
    try:
        outs = run_all(p, [GenerateRequest("x", (5, 6, 7, 8), greedy(4), REMOTE_DECODE)])
        assert p_answer(p, outs["x"][-1]) is not None
        assert p.has_work()  # the lease is held
        sleeps.calls.clear()
        for _ in range(3):
            assert p.step() == []
        assert sleeps.calls == []  # the step returned; it did not nap
        wait = p.idle_wait_s()
        assert wait is not None and 0 < wait <= 0.01
        p.add_request(GenerateRequest("y", (9, 8, 7), greedy(2)))
        assert p.idle_wait_s() == 0.0  # something to compute: no waiting
        driving.step_when_due(p)
        assert sleeps.calls == []
        p.abort_request("x")
        settle(p)
        assert p.idle_wait_s() is None
    finally:
        p.shutdown()


def test_decode_waiting_for_reads_polls_and_the_driver_waits_not_the_step(tiny_model, sleeps):
    p, d = _make(tiny_model, "prefill", lease_s=30.0), _make(tiny_model, "decode")
    try:
        prompt = (5, 6, 7, 8, 9, 10)
        outs = run_all(p, [GenerateRequest("r", prompt, greedy(5), REMOTE_DECODE)])
        kv = p_answer(p, outs["r"][-1])
        assert kv is not None
        d.add_request(GenerateRequest("r", prompt, greedy(5), to_decode(d, kv)))
        assert d.idle_wait_s() == 0.0  # the scheduler can give it blocks
        # the handshake with P runs on D's service pool from admission on; let it end first,
        # so the next step posts the READ (else that step may leave the job queued on it)
        d.connector.pending["r"].peers.result(timeout=30)
        sleeps.calls.clear()
        d.step()  # blocks allocated, READs started; nothing runs on D yet
        assert sleeps.calls == []
        wait = d.idle_wait_s()
        assert wait is not None and 0 < wait <= 0.01
        driving.step_when_due(d)
        assert sleeps.calls == [wait]  # the driver waited the engine's interval
        d.abort_request("r")
        settle(d)
        settle(p, 60)
        assert d.idle_wait_s() is None
        got, _ = pd_generate(p, d, "s", list(prompt), greedy(5))  # still serves
        assert len(got) == 5
    finally:
        d.shutdown()
        p.shutdown()
