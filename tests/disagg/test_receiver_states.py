"""Every `ReadOutcome` of the receiver's state machine, over the in-memory fake transport.

Millisecond tests (no NIXL, no model): a job is reported exactly once, with the outcome that
decided it, and only once no READ handle can still write its blocks (quarantine on a failed
release). The real-NIXL contract tests are in test_receiver.py; these pin each transition.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "cache"))

import pytest  # noqa: E402
from cache_testlib import TINY, TINY_PATTERN, model  # noqa: E402
from fake_transport import FakeEndpoint, FakePeer, Script  # noqa: E402

from hybridpd.cache.geometry import CacheGeometry  # noqa: E402
from hybridpd.disagg.nixl_agent import XferState  # noqa: E402
from hybridpd.disagg.params import TransferParams  # noqa: E402
from hybridpd.disagg.receiver import KVReceiver, ReadJob, ReadOutcome, ReadResult  # noqa: E402

GEO = CacheGeometry.build(model(TINY, TINY_PATTERN), kernel_block_size=2)
NUM_BLOCKS = 8
N = 11
P_IDS = ((1, 2), (3,), (4,), (5,))
D_IDS = ((6, 2), (1,), (3,), (7,))
WAIT_S = 10.0


@pytest.fixture
def peer():
    p = FakePeer("p-fake", GEO, NUM_BLOCKS)
    try:
        yield p
    finally:
        p.stop()


def _receiver(transfer_timeout_s: float = WAIT_S) -> tuple[KVReceiver, FakeEndpoint]:
    ep = FakeEndpoint("d-fake", GEO, NUM_BLOCKS)
    return KVReceiver(ep, handshake_timeout_s=5.0,  # type: ignore[arg-type]
                      transfer_timeout_s=transfer_timeout_s), ep


def _job(rid: str, peer: FakePeer, engine_id: str = "p-fake") -> ReadJob:
    """A job for `peer`'s hand-off, with the record D's transfer service got from its
    handshake."""
    params = TransferParams(rid, engine_id, peer.address, 1, P_IDS, N, "n-1",
                            transfer_id=f"x-{rid}")
    return ReadJob(rid, params, D_IDS, nonce="n1", peers=(peer.advert(),))


def _until(cond, what: str):  # noqa: ANN001, ANN202 - a condition and its description
    deadline = time.monotonic() + WAIT_S
    while not (got := cond()):
        assert time.monotonic() < deadline, what
        time.sleep(0.001)
    return got


def _result(rx: KVReceiver, rid: str) -> ReadResult:
    got = _until(rx.poll, f"no result for {rid}")
    assert [r.request_id for r in got] == [rid]
    assert rx.poll() == [] and not rx.busy  # reported exactly once
    return got[0]


def test_ok_when_every_read_is_done(peer) -> None:
    rx, ep = _receiver()
    rx.start(_job("a", peer))
    res = _result(rx, "a")
    assert res.outcome is ReadOutcome.OK and res.ok and res.error is None and res.nbytes > 0
    assert ep.agent.live() == [] and len(ep.agent.reads) == 1  # released after DONE
    assert b"|x-a|" in ep.agent.reads[0].notice  # P learns which hand-off was read
    rx.close()


def test_a_pending_read_is_reported_when_it_is_done(peer) -> None:
    rx, ep = _receiver()
    ep.agent.script = [Script.PENDING]
    rx.start(_job("a", peer))
    _until(lambda: ep.agent.reads, "the READ was never posted")
    for _ in range(5):
        assert rx.poll() == [] and rx.busy  # still running: nothing to report
    ep.agent.finish(ep.agent.reads[0].handle, XferState.DONE)
    assert _result(rx, "a").outcome is ReadOutcome.OK
    rx.close()


def test_failed_when_a_read_fails_and_the_peer_is_forgotten(peer) -> None:
    rx, ep = _receiver()
    ep.agent.script = [Script.FAILED]
    rx.start(_job("a", peer))
    res = _result(rx, "a")
    assert res.outcome is ReadOutcome.FAILED and "READ failed" in (res.error or "")
    assert ep.agent.peers == set()  # load again next time: the peer may have restarted
    rx.start(_job("b", peer))
    assert _result(rx, "b").ok and ep.agent.loads == 2
    rx.close()


def test_failed_when_posting_breaks_off(peer) -> None:
    rx, ep = _receiver()
    ep.agent.script = [Script.RAISE]
    rx.start(_job("a", peer))
    res = _result(rx, "a")
    assert res.outcome is ReadOutcome.FAILED and "posting the READ failed" in (res.error or "")
    rx.close()


def test_refused_when_the_peer_record_names_another_instance(peer) -> None:
    rx, ep = _receiver()
    rx.start(_job("a", peer, engine_id="someone-else"))  # the record is p-fake's
    res = _result(rx, "a")
    assert res.outcome is ReadOutcome.REFUSED and "someone-else" in (res.error or "")
    assert ep.agent.reads == []  # nothing was posted
    rx.close()


def test_timed_out_reads_are_released_then_reported(peer) -> None:
    rx, ep = _receiver(transfer_timeout_s=0.0)  # any READ still pending is past its deadline
    ep.agent.script = [Script.PENDING]
    rx.start(_job("a", peer))
    res = _result(rx, "a")
    assert res.outcome is ReadOutcome.TIMED_OUT and "timed out" in (res.error or "")
    assert ep.agent.live() == []
    rx.close()


def test_cancelled_in_flight_is_reported_after_release(peer) -> None:
    rx, ep = _receiver()
    ep.agent.script = [Script.PENDING]
    rx.start(_job("a", peer))
    _until(lambda: ep.agent.reads, "the READ was never posted")
    rx.cancel("a")  # whether the post has returned yet or not: the outcome is CANCELLED
    res = _result(rx, "a")
    assert res.outcome is ReadOutcome.CANCELLED and res.error == "cancelled"
    assert ep.agent.live() == [] and ep.agent.peers  # a cancel keeps the loaded peer
    rx.close()


def _poll_until_releases_failed(rx: KVReceiver, ep: FakeEndpoint) -> None:
    """Poll until the scripted release failures are used up; nothing may be reported yet."""
    def step() -> bool:
        assert rx.poll() == []  # a READ whose release failed may still write: held back
        return ep.agent.release_failures == 0
    _until(step, "the receiver never tried to release")


def test_a_failed_release_quarantines_the_result(peer) -> None:
    rx, ep = _receiver()
    ep.agent.script = [Script.FAILED]
    ep.agent.release_failures = 2  # the settle's release and the next retry fail
    rx.start(_job("a", peer))
    _poll_until_releases_failed(rx, ep)
    assert ep.agent.live() == [ep.agent.reads[0].handle] and rx.busy
    res = _result(rx, "a")  # the third release succeeds: only now is it reported
    assert res.outcome is ReadOutcome.FAILED and ep.agent.live() == []
    rx.close()


def test_a_decided_outcome_is_not_changed_by_a_late_cancel(peer) -> None:
    rx, ep = _receiver()
    ep.agent.script = [Script.FAILED]
    ep.agent.release_failures = 2
    rx.start(_job("a", peer))
    _poll_until_releases_failed(rx, ep)  # decided FAILED, still draining
    rx.cancel("a")
    assert _result(rx, "a").outcome is ReadOutcome.FAILED
    rx.close()


def test_cancel_before_any_result_never_reports_twice(peer) -> None:
    rx, ep = _receiver()
    ep.agent.script = [Script.PENDING]
    rx.start(_job("a", peer))
    rx.cancel("a")  # at once: the post may not have begun, be under way, or be done
    rx.cancel("a")
    assert _result(rx, "a").outcome is ReadOutcome.CANCELLED and ep.agent.live() == []
    rx.close()


def test_every_outcome_is_covered_here() -> None:
    tested = {"OK", "FAILED", "REFUSED", "TIMED_OUT", "CANCELLED"}  # by the tests above
    assert {o.name for o in ReadOutcome} == tested  # a new outcome needs its test here


def _same_gpu(rx: KVReceiver, ep: FakeEndpoint, peer: FakePeer, opener) -> ReadJob:  # noqa: ANN001
    """Make the pair look like one GPU (facts) and give D an IPC reader with a stand-in
    mapping; the job's record carries P's export."""
    from dataclasses import replace

    import torch

    from hybridpd.disagg.cuda_ipc import IpcExport, IpcReads
    from hybridpd.disagg.transport import PeerFacts

    facts = PeerFacts("host-a", "cuda", "GPU-uuid-0", None)
    ep.facts = facts
    pool_bytes = peer.geometry.nbytes
    rx.ipc = IpcReads(torch.zeros(pool_bytes, dtype=torch.uint8), ep.agent.send_notif, opener)
    export = IpcExport(0, b"h" * 64, pool_bytes, 0, b"/ref", 0, b"e" * 64, False, 0, pool_bytes)
    job = _job("g", peer)
    return replace(job, peers=(replace(peer.advert(), facts=facts, ipc=export),))


def test_a_same_gpu_peer_is_read_by_device_copies_and_p_gets_its_notice(peer) -> None:
    import torch

    rx, ep = _receiver()
    p_pool = torch.randint(0, 256, (peer.geometry.nbytes,), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(2))
    rx.start(_same_gpu(rx, ep, peer, lambda exp: p_pool))
    res = _result(rx, "g")
    assert res.outcome is ReadOutcome.OK and res.nbytes > 0
    assert ep.agent.reads == []  # nothing went through NIXL
    notices = [m for _, m in ep.agent.notifs_sent if b"|x-g|" in m]
    assert len(notices) == 1  # P learns once, after the copies
    assert bool(rx.ipc.dst.any())  # P's bytes landed in our pool
    rx.close()


def test_a_pool_that_cannot_be_mapped_is_read_over_nixl(peer) -> None:
    rx, ep = _receiver()

    def refuse(exp):  # noqa: ANN001, ANN202
        raise RuntimeError("cudaIpcOpenMemHandle: invalid argument")

    job = _same_gpu(rx, ep, peer, refuse)
    rx.start(job)
    res = _result(rx, "g")
    assert res.outcome is ReadOutcome.OK and len(ep.agent.reads) == 1  # fell back to NIXL
    assert b"|x-g|" in ep.agent.reads[0].notice
    rx.start(ReadJob("g2", job.params, D_IDS, nonce="n2", peers=job.peers))
    assert _result(rx, "g2").ok and len(ep.agent.reads) == 2  # not tried again
    rx.close()
