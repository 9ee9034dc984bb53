"""D's KV connector (`decode_side.DecodeConnector`, state Enum `PendingState`) in
milliseconds: driven through the real scheduler that owns it (and a real block manager), with
scripted transfer reports standing for the executor's receivers and a fake P side channel
that a real transfer service asks the confirmations of and sends releases to — no model, no
engine, no NIXL. Every transition: QUEUED → READING → CONFIRMING → done (trusted or not),
READING → failed (recompute / fail, P told to release), and the aborts (QUEUED, READING →
QUARANTINED, CONFIRMING); the scheduler is the only place blocks are freed.
"""

from __future__ import annotations

import itertools
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "cache"))

import pytest  # noqa: E402
from cache_testlib import TINY, TINY_PATTERN, model  # noqa: E402
from fake_transport import FakePeer, fake_advert  # noqa: E402

from hybridpd.cache.geometry import CacheGeometry  # noqa: E402
from hybridpd.cache.pool import BlockPool  # noqa: E402
from hybridpd.disagg import handoff  # noqa: E402
from hybridpd.disagg.commands import RankTransferReport, TransferReport  # noqa: E402
from hybridpd.disagg.params import TransferParams, prompt_digest  # noqa: E402
from hybridpd.disagg.receiver import ReadOutcome, ReadResult  # noqa: E402
from hybridpd.disagg.transfer_service import TransferService  # noqa: E402
from hybridpd.engine.args import EngineArgs  # noqa: E402
from hybridpd.engine.block_manager import BlockManager  # noqa: E402
from hybridpd.engine.decode_side import DecodeConnector, PendingState  # noqa: E402
from hybridpd.engine.kv_connector import AbortAction, AdmitKind, TransferEvents  # noqa: E402
from hybridpd.engine.scheduler import Scheduler  # noqa: E402
from hybridpd.request import FinishReason, Request, RequestStatus, SamplingParams  # noqa: E402

CFG = model(TINY, TINY_PATTERN)
GEO = CacheGeometry.build(CFG, kernel_block_size=2)
NUM_BLOCKS = 16
PROMPT = list(range(3, 15))  # 12 tokens; n-1 mode: P computed 11
P_IDS = ((1, 2), (3,), (4,), (5,))
WAIT_S = 10.0
_ids = itertools.count()


class Decode:
    """A scheduler owning a decode connector, stepped as the engine steps it (apply the
    connector's events, schedule, send the command, absorb the scripted report)."""

    def __init__(self, policy: str = "recompute", **kw) -> None:
        self.args = EngineArgs(model_dir="unused", role="decode", lease_s=30.0,
                               on_transfer_failure=policy, **kw)
        self.service = TransferService(lease_s=30.0, p_tp=1, reader=self.args.engine_id,
                                       secret=self.args.kv_secret)
        # D's own side channel: what its handshakes with P name (its agents, its compat hash)
        self.service.open_side_channel(
            self.args.engine_id, [fake_advert(self.args.engine_id, GEO, NUM_BLOCKS)],
            "127.0.0.1", 0, serves_reads=False)
        self.connector = DecodeConnector(self.args, CFG.vocab_size, self.service)
        self.blocks = BlockManager(BlockPool(NUM_BLOCKS), len(GEO.attention_groups),
                                   len(GEO.mamba_groups), GEO.block_tokens)
        self.scheduler = Scheduler(self.blocks, max_num_batched_tokens=64, max_num_seqs=4,
                                   connector=self.connector)
        self.commands: list = []
        self.results: list[ReadResult] = []  # the receivers' next answer

    def step(self) -> list[TransferEvents]:
        events = [self.scheduler.apply_transfers()]
        self.scheduler.schedule()
        cmd = self.scheduler.transfer_command()
        if cmd is not None:
            self.commands.append(cmd)
            out, self.results = tuple(self.results), []
            events.append(self.scheduler.on_transfer_report(
                TransferReport((RankTransferReport(0, results=out),))))
        return [e for e in events if e]

    @property
    def all_free(self) -> bool:
        return self.blocks.num_free == self.blocks.num_usable


@pytest.fixture
def peer():
    p = FakePeer("p-fake", GEO, NUM_BLOCKS)
    try:
        yield p
    finally:
        p.stop()


@pytest.fixture
def d():
    dec = Decode()
    try:
        yield dec
    finally:
        dec.service.close()


def _admit(dec: Decode, address: str) -> str:
    rid = f"r{next(_ids)}"
    params = TransferParams(rid, "p-fake", address, 1, P_IDS, len(PROMPT) - 1, "n-1",
                            transfer_id=f"x-{rid}")
    req = Request(rid, list(PROMPT), SamplingParams(max_tokens=4))
    assert dec.scheduler.add(req, handoff.RemotePrefill(params)).kind is AdmitKind.REMOTE
    assert dec.connector.pending[rid].state is PendingState.QUEUED
    return rid


def _handshaken(dec: Decode, rid: str) -> None:
    """Wait (with a deadline) for D's service to finish its handshake with the request's P."""
    peers = dec.connector.pending[rid].peers
    assert peers is not None
    peers.exception(timeout=WAIT_S)


def _start(dec: Decode, rid: str) -> None:
    _handshaken(dec, rid)
    out = dec.scheduler.schedule()
    assert out.remote_ready == (rid,) and not out.scheduled  # blocks allocated, nothing to run
    assert dec.connector.pending[rid].state is PendingState.READING
    cmd = dec.scheduler.transfer_command()
    assert cmd is not None and [j.request_id for j in cmd.start] == [rid]
    assert cmd.start[0].block_ids == dec.scheduler.block_ids(rid)  # into the blocks it got
    assert [a.engine_id for a in cmd.start[0].peers] == ["p-fake"]  # P's record rides the job
    dec.commands.append(cmd)
    dec.scheduler.on_transfer_report(TransferReport((RankTransferReport(0),)))


def _confirmed(dec: Decode, rid: str) -> list[TransferEvents]:
    """Report the READ ok, then step until P's answer to the confirmation is applied."""
    dec.results.append(ReadResult(rid, ReadOutcome.OK, nbytes=100))
    events = dec.step()
    assert dec.connector.pending[rid].state is PendingState.CONFIRMING
    deadline = time.monotonic() + WAIT_S
    while rid in dec.connector.pending:
        assert time.monotonic() < deadline, "the confirmation never came back"
        events += dec.step()
    return events


def _stats(events: list[TransferEvents]) -> list[dict]:
    return [s for e in events for _, s in e.stats]


def test_trusted_read_continues_from_the_transferred_state(peer, d) -> None:
    rid = _admit(d, peer.address)
    _start(d, rid)
    events = _confirmed(d, rid)
    assert [s["outcome"] for s in _stats(events)] == ["ok"]
    assert [r for e in events for r in e.ready] == [rid]
    req = d.scheduler.requests[rid]
    assert req.num_computed_tokens == len(PROMPT) - 1  # D computes only token N
    assert req.status is RequestStatus.RUNNING
    assert d.connector.counters()["kv_transfers_ok"] == 1 and not d.connector.has_work()
    assert d.scheduler.transfer_command() is None  # nothing left to post or poll


def test_untrusted_confirmation_fails_closed_and_recomputes(peer, d) -> None:
    peer.lease_state = "expired"  # P freed the blocks before D read: the bytes are garbage
    rid = _admit(d, peer.address)
    _start(d, rid)
    stats = _stats(_confirmed(d, rid))
    assert stats[0]["outcome"] == "failed" and "expired" in stats[0]["error"]
    req = d.scheduler.requests[rid]
    assert req.num_computed_tokens == 0 and req.status is RequestStatus.RUNNING  # from scratch
    assert d.connector.counters()["requests_recomputed"] == 1


@pytest.mark.parametrize("outcome", [o for o in ReadOutcome if o is not ReadOutcome.OK])
def test_a_failed_read_recomputes(peer, d, outcome: ReadOutcome) -> None:
    rid = _admit(d, peer.address)
    _start(d, rid)
    d.results.append(ReadResult(rid, outcome, f"scripted {outcome.value}"))
    events = d.step()
    assert rid not in d.connector.pending
    assert [s["error"] for s in _stats(events)] == [f"scripted {outcome.value}"]
    assert [f.recompute for e in events for f in e.failed] == [True]
    assert d.scheduler.requests[rid].num_computed_tokens == 0
    assert peer.wait_control("release", f"x-{rid}")  # P may free its blocks at once


def test_a_failed_read_fails_the_request_under_the_fail_policy(peer) -> None:
    dec = Decode(policy="fail")
    try:
        rid = _admit(dec, peer.address)
        _start(dec, rid)
        dec.results.append(ReadResult(rid, ReadOutcome.TIMED_OUT, "too slow"))
        (failure,) = [f for e in dec.step() for f in e.failed]
        assert not failure.recompute and "too slow" in failure.error
        # the scheduler left it to the engine, which ends it with an error: no block leaks
        assert dec.scheduler.requests[rid].status is RequestStatus.WAITING_FOR_REMOTE_KV
        dec.scheduler.finish(rid, FinishReason.ERROR)
        assert rid not in dec.scheduler.requests and dec.all_free
    finally:
        dec.service.close()


def test_with_a_secret_only_a_hand_off_verified_at_the_edge_is_admitted(peer) -> None:
    dec = Decode(kv_secret="s")
    try:
        rid = f"r{next(_ids)}"
        params = TransferParams(rid, "p-fake", peer.address, 1, P_IDS, len(PROMPT) - 1,
                                "n-1", transfer_id=f"x-{rid}",
                                prompt_digest=prompt_digest(PROMPT[:-1]), issued_at=time.time())
        req = Request(rid, list(PROMPT), SamplingParams(max_tokens=4))
        with pytest.raises(ValueError, match="not signed"):
            dec.scheduler.add(req, handoff.RemotePrefill(params, signed=False))
        with pytest.raises(ValueError, match="accepts kv_transfer_params"):
            dec.scheduler.add(req, handoff.RemoteDecode())
        assert not dec.connector.pending and len(dec.connector.consumed) == 0  # nothing kept
        assert not dec.scheduler.requests
        dec.scheduler.add(req, handoff.RemotePrefill(params, signed=True))
        assert dec.connector.pending[rid].state is PendingState.QUEUED
        assert len(dec.connector.consumed) == 1
    finally:
        dec.service.close()


def test_first_token_mode_takes_p_s_token_as_an_output(peer, d) -> None:
    rid = f"r{next(_ids)}"
    params = TransferParams(rid, "p-fake", peer.address, 1, P_IDS, len(PROMPT),
                            "first-token", first_token=42, transfer_id=f"x-{rid}")
    req = Request(rid, list(PROMPT), SamplingParams(max_tokens=4))
    admission = d.scheduler.add(req, handoff.RemotePrefill(params))
    assert admission.kind is AdmitKind.REMOTE and admission.remote_tokens == len(PROMPT)
    assert req.prompt_token_ids == PROMPT and req.output_token_ids == [42]
    _start(d, rid)
    _confirmed(d, rid)
    (s,) = d.scheduler.schedule().scheduled
    assert s.token_ids == (42,) and s.num_computed == len(PROMPT) and s.output_index == 1


def test_abort_while_queued_forgets_the_hand_off(peer, d) -> None:
    rid = _admit(d, peer.address)
    assert d.connector.abort(rid) is AbortAction.FINISH
    assert rid not in d.connector.pending
    rid = _admit(d, peer.address)
    assert d.scheduler.abort(rid) and rid not in d.connector.pending
    assert rid not in d.scheduler.requests and not d.commands and d.all_free
    assert peer.wait_control("release", f"x-{rid}")
    assert d.service.watching() == 0


def test_abort_while_reading_quarantines_until_every_rank_reports(peer, d) -> None:
    rid = _admit(d, peer.address)
    _start(d, rid)
    held = d.blocks.num_usable - d.blocks.num_free
    assert d.scheduler.abort(rid)
    assert d.connector.pending[rid].state is PendingState.QUARANTINED
    assert rid not in d.scheduler.requests  # finished, its blocks kept
    assert d.scheduler.abort(rid)  # a second abort changes nothing: still quarantined
    d.step()
    assert d.commands[-1].cancel == (rid,)  # the cancel rode the next command
    for _ in range(3):  # no report yet: the READ may still write the blocks
        assert d.step() == [] and d.blocks.num_usable - d.blocks.num_free == held
        assert d.commands[-1].cancel == () and not d.commands[-1].start  # a bare poll
    d.results.append(ReadResult(rid, ReadOutcome.CANCELLED))
    events = d.step()
    assert _stats(events) == [] and rid not in d.connector.pending  # no stats for an abort
    assert [r for e in events for r in e.releasable] == [rid]
    assert d.all_free  # freed by the scheduler


def test_abort_while_confirming_frees_at_once(peer, d) -> None:
    rid = _admit(d, peer.address)
    _start(d, rid)
    d.results.append(ReadResult(rid, ReadOutcome.OK, nbytes=100))
    d.step()
    assert d.connector.pending[rid].state is PendingState.CONFIRMING
    assert d.scheduler.abort(rid) and rid not in d.connector.pending  # no READ can write
    assert d.all_free


def test_a_queue_deadline_drops_the_pending_hand_off(peer, d) -> None:
    rid = _admit(d, peer.address)
    d.scheduler.finish(rid, FinishReason.ERROR)
    assert rid not in d.connector.pending and not d.connector.has_work()


def test_idle_wait_while_reads_are_outstanding(peer, d) -> None:
    assert d.connector.idle_wait_s() is None
    rid = _admit(d, peer.address)
    _start(d, rid)
    wait = d.connector.idle_wait_s()
    assert wait is not None and wait > 0
    d.scheduler.abort(rid)
    assert d.connector.idle_wait_s() == 0.0  # the cancel goes out with the next step


def test_every_pending_state_is_covered_here() -> None:
    assert {s.name for s in PendingState} == {"QUEUED", "READING", "QUARANTINED", "CONFIRMING"}


def test_one_handshake_per_p_instance_names_every_d_agent(peer, d) -> None:
    first, second = _admit(d, peer.address), _admit(d, peer.address)
    _handshaken(d, first)
    _handshaken(d, second)
    assert peer.handshakes == 1 and d.service.calls["handshake"] == 1
    assert peer.agents == [(f"{d.args.engine_id}-rank0",)]  # its notices are believed on P
    out = d.scheduler.schedule()
    assert set(out.remote_ready) == {first, second}
    cmd = d.scheduler.transfer_command()
    assert cmd is not None and {j.request_id for j in cmd.start} == {first, second}
    assert all(j.peers == (peer.advert(),) for j in cmd.start)  # the one handshake's record


def test_a_failed_handshake_refuses_the_read_and_fails_closed(peer, d) -> None:
    gone = FakePeer("p-gone", GEO, NUM_BLOCKS)
    address = gone.address
    gone.stop()  # nobody answers there now
    rid = f"r{next(_ids)}"
    params = TransferParams(rid, "p-gone", address, 1, P_IDS, len(PROMPT) - 1, "n-1",
                            transfer_id=f"x-{rid}")
    req = Request(rid, list(PROMPT), SamplingParams(max_tokens=4))
    assert d.scheduler.add(req, handoff.RemotePrefill(params)).kind is AdmitKind.REMOTE
    _handshaken(d, rid)
    events = d.step()  # blocks allocated; the command posts nothing: the handshake failed
    assert all(not c.start for c in d.commands)
    events += d.step()
    (failure,) = [f for e in events for f in e.failed]
    assert failure.recompute and "handshake" in failure.error
    assert "cannot connect" in failure.error
    (s,) = _stats(events)
    assert s["outcome"] == "failed" and s["ranks"] == 1
    assert rid not in d.connector.pending
    assert d.scheduler.requests[rid].num_computed_tokens == 0  # recomputed locally
    d.scheduler.finish(rid, FinishReason.ABORT)
    assert d.all_free
    rid2 = _admit(d, peer.address)  # another P: its own handshake, unaffected
    _start(d, rid2)
    _confirmed(d, rid2)
