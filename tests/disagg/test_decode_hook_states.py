"""D's hand-off state machine (`decode_side.PendingState`) in milliseconds: the decode hooks
driven through a fake `HookHost` — a real scheduler and block manager, a scripted transfer port
standing for the executor's receivers, a fake P side channel for confirmations — with no model,
no engine and no NIXL. Every transition: QUEUED → READING → CONFIRMING → done (trusted or not),
READING → failed (recompute / fail), and the aborts (QUEUED, READING → QUARANTINED, CONFIRMING).
"""

from __future__ import annotations

import itertools
import os
import sys
import time
from dataclasses import replace

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "cache"))

import pytest  # noqa: E402
from cache_testlib import TINY, TINY_PATTERN, model  # noqa: E402
from fake_transport import FakePeer  # noqa: E402

from hybridpd.cache.geometry import CacheGeometry  # noqa: E402
from hybridpd.cache.pool import BlockPool  # noqa: E402
from hybridpd.disagg import handoff  # noqa: E402
from hybridpd.disagg.commands import RankTransferReport, TransferCommand, TransferReport  # noqa: E402
from hybridpd.disagg.params import TransferParams, prompt_digest  # noqa: E402
from hybridpd.disagg.receiver import ReadOutcome, ReadResult  # noqa: E402
from hybridpd.engine.args import EngineArgs  # noqa: E402
from hybridpd.engine.block_manager import BlockManager  # noqa: E402
from hybridpd.engine.decode_side import DecodeHooks, PendingState  # noqa: E402
from hybridpd.engine.protocol import ErrorKind, GenerateOutput  # noqa: E402
from hybridpd.engine.scheduler import Scheduler  # noqa: E402
from hybridpd.request import FinishReason, Request, RequestStatus, SamplingParams  # noqa: E402

CFG = model(TINY, TINY_PATTERN)
GEO = CacheGeometry.build(CFG, kernel_block_size=2)
NUM_BLOCKS = 16
PROMPT = list(range(3, 15))  # 12 tokens; n-1 mode: P computed 11
P_IDS = ((1, 2), (3,), (4,), (5,))
WAIT_S = 10.0
_ids = itertools.count()


class FakePort:
    """The executor's transfer side: records commands, answers with the queued results."""

    side_channels: tuple[str, ...] = ()
    ledger = None

    def __init__(self) -> None:
        self.commands: list[TransferCommand] = []
        self.results: list[ReadResult] = []

    def transfer(self, cmd: TransferCommand) -> TransferReport:
        self.commands.append(cmd)
        out, self.results = tuple(self.results), []
        return TransferReport((RankTransferReport(0, results=out),))


class FakeHost:
    """What the hooks may use of an engine (HookHost), without a model."""

    def __init__(self, policy: str = "recompute") -> None:
        self.args = EngineArgs(model_dir="unused", role="decode", lease_s=30.0,
                               on_transfer_failure=policy)
        self.model_config = CFG
        self.blocks = BlockManager(BlockPool(NUM_BLOCKS), len(GEO.attention_groups),
                                   len(GEO.mamba_groups), GEO.block_tokens)
        self.scheduler = Scheduler(self.blocks, max_num_batched_tokens=64, max_num_seqs=4)
        self.executor = FakePort()
        self.errors: list[tuple[str, ErrorKind]] = []

    def finish_with_error(self, req: Request, message: str, outputs: list[GenerateOutput],
                          kind: ErrorKind) -> None:
        self.scheduler.finish(req.request_id, FinishReason.ERROR)
        self.errors.append((message, kind))


@pytest.fixture
def peer():
    p = FakePeer("p-fake", GEO, NUM_BLOCKS)
    try:
        yield p
    finally:
        p.stop()


@pytest.fixture
def d():
    host = FakeHost()
    hooks = DecodeHooks(host)  # type: ignore[arg-type]
    try:
        yield host, hooks
    finally:
        hooks.shutdown()


def _admit(host: FakeHost, hooks: DecodeHooks, address: str) -> str:
    rid = f"r{next(_ids)}"
    params = TransferParams(rid, "p-fake", (address,), 1, P_IDS, len(PROMPT) - 1, "n-1",
                            transfer_id=f"x-{rid}")
    req = Request(rid, list(PROMPT), SamplingParams(max_tokens=4))
    assert hooks.on_add(req, handoff.RemotePrefill(params))
    host.scheduler.add(req)
    assert hooks.pending[rid].state is PendingState.QUEUED
    return rid


def _start(host: FakeHost, hooks: DecodeHooks, rid: str) -> None:
    out = host.scheduler.schedule()
    assert out.remote_ready == (rid,) and not out.scheduled  # blocks allocated, nothing to run
    hooks.start_transfers(out.remote_ready)
    assert hooks.pending[rid].state is PendingState.READING
    assert [j.request_id for j in host.executor.commands[-1].start] == [rid]


def _step(hooks: DecodeHooks) -> list[GenerateOutput]:
    outputs: list[GenerateOutput] = []
    hooks.before_schedule(outputs)
    return outputs


def _confirmed(host: FakeHost, hooks: DecodeHooks, rid: str) -> list[GenerateOutput]:
    """Report the READ ok, then step until P's answer to the confirmation is absorbed."""
    host.executor.results.append(ReadResult(rid, ReadOutcome.OK, nbytes=100))
    outs = _step(hooks)
    assert hooks.pending[rid].state is PendingState.CONFIRMING
    deadline = time.monotonic() + WAIT_S
    while rid in hooks.pending:
        assert time.monotonic() < deadline, "the confirmation never came back"
        outs += _step(hooks)
    return outs


def test_trusted_read_continues_from_the_transferred_state(peer, d) -> None:
    host, hooks = d
    rid = _admit(host, hooks, peer.address)
    _start(host, hooks, rid)
    outs = _confirmed(host, hooks, rid)
    assert [o.transfer_stats["outcome"] for o in outs if o.transfer_stats] == ["ok"]
    req = host.scheduler.requests[rid]
    assert req.num_computed_tokens == len(PROMPT) - 1  # D computes only token N
    assert req.status is RequestStatus.RUNNING
    assert hooks.counters()["kv_transfers_ok"] == 1 and not hooks.has_work()


def test_untrusted_confirmation_fails_closed_and_recomputes(peer, d) -> None:
    host, hooks = d
    peer.lease_state = "expired"  # P freed the blocks before D read: the bytes are garbage
    rid = _admit(host, hooks, peer.address)
    _start(host, hooks, rid)
    outs = _confirmed(host, hooks, rid)
    stats = [o.transfer_stats for o in outs if o.transfer_stats]
    assert stats[0]["outcome"] == "failed" and "expired" in stats[0]["error"]
    req = host.scheduler.requests[rid]
    assert req.num_computed_tokens == 0 and req.status is RequestStatus.RUNNING  # from scratch
    assert hooks.counters()["requests_recomputed"] == 1


@pytest.mark.parametrize("outcome", [o for o in ReadOutcome if o is not ReadOutcome.OK])
def test_a_failed_read_recomputes(peer, d, outcome: ReadOutcome) -> None:
    host, hooks = d
    rid = _admit(host, hooks, peer.address)
    _start(host, hooks, rid)
    host.executor.results.append(ReadResult(rid, outcome, f"scripted {outcome.value}"))
    outs = _step(hooks)
    assert rid not in hooks.pending
    assert [o.transfer_stats["error"] for o in outs if o.transfer_stats] == \
        [f"scripted {outcome.value}"]
    assert host.scheduler.requests[rid].num_computed_tokens == 0


def test_a_failed_read_fails_the_request_under_the_fail_policy(peer) -> None:
    host = FakeHost(policy="fail")
    hooks = DecodeHooks(host)  # type: ignore[arg-type]
    try:
        rid = _admit(host, hooks, peer.address)
        _start(host, hooks, rid)
        host.executor.results.append(ReadResult(rid, ReadOutcome.TIMED_OUT, "too slow"))
        _step(hooks)
        assert [k for _, k in host.errors] == [ErrorKind.TRANSFER_FAILED]
        assert "too slow" in host.errors[0][0] and rid not in host.scheduler.requests
        assert host.blocks.num_free == host.blocks.num_usable
    finally:
        hooks.shutdown()


def test_with_a_secret_only_a_hand_off_verified_at_the_edge_is_admitted(peer) -> None:
    host = FakeHost()
    host.args = replace(host.args, kv_secret="s")
    hooks = DecodeHooks(host)  # type: ignore[arg-type]
    try:
        rid = f"r{next(_ids)}"
        params = TransferParams(rid, "p-fake", (peer.address,), 1, P_IDS, len(PROMPT) - 1,
                                "n-1", transfer_id=f"x-{rid}",
                                prompt_digest=prompt_digest(PROMPT[:-1]), issued_at=time.time())
        req = Request(rid, list(PROMPT), SamplingParams(max_tokens=4))
        with pytest.raises(ValueError, match="not signed"):
            hooks.on_add(req, handoff.RemotePrefill(params, signed=False))
        with pytest.raises(ValueError, match="accepts kv_transfer_params"):
            hooks.on_add(req, handoff.RemoteDecode())
        assert not hooks.pending and len(hooks.consumed) == 0  # nothing claimed or held
        assert hooks.on_add(req, handoff.RemotePrefill(params, signed=True))
        assert hooks.pending[rid].state is PendingState.QUEUED and len(hooks.consumed) == 1
    finally:
        hooks.shutdown()


def test_abort_while_queued_forgets_the_hand_off(peer, d) -> None:
    host, hooks = d
    rid = _admit(host, hooks, peer.address)
    assert hooks.on_abort(rid) and rid not in hooks.pending and not host.executor.commands
    assert host.blocks.num_free == host.blocks.num_usable


def test_abort_while_reading_quarantines_until_every_rank_reports(peer, d) -> None:
    host, hooks = d
    rid = _admit(host, hooks, peer.address)
    _start(host, hooks, rid)
    held = host.blocks.num_usable - host.blocks.num_free
    assert hooks.on_abort(rid)
    assert hooks.pending[rid].state is PendingState.QUARANTINED
    assert host.executor.commands[-1].cancel == (rid,)
    assert hooks.on_abort(rid)  # a second abort changes nothing: still quarantined
    for _ in range(3):  # no report yet: the READ may still write the blocks
        assert _step(hooks) == [] and host.blocks.num_usable - host.blocks.num_free == held
    host.executor.results.append(ReadResult(rid, ReadOutcome.CANCELLED))
    assert _step(hooks) == [] and rid not in hooks.pending  # no stats for an aborted request
    assert host.blocks.num_free == host.blocks.num_usable  # freed by the scheduler


def test_abort_while_confirming_frees_at_once(peer, d) -> None:
    host, hooks = d
    rid = _admit(host, hooks, peer.address)
    _start(host, hooks, rid)
    host.executor.results.append(ReadResult(rid, ReadOutcome.OK, nbytes=100))
    _step(hooks)
    assert hooks.pending[rid].state is PendingState.CONFIRMING
    assert hooks.on_abort(rid) and rid not in hooks.pending  # no READ can write any more
    assert host.blocks.num_free == host.blocks.num_usable


def test_every_pending_state_is_covered_here() -> None:
    assert {s.name for s in PendingState} == {"QUEUED", "READING", "QUARANTINED", "CONFIRMING"}
