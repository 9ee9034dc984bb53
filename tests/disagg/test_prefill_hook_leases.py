"""P's side of the hand-off in milliseconds: the prefill hooks driven through a fake
`HookHost` (real scheduler and block manager, a scripted transfer port standing for the
endpoints' notices and control messages, a fake lease clock). Every way a lease ends frees the
blocks through the scheduler, exactly once: all readers notified, D's release, expiry, abort;
a renewal keeps them; a finished-on-P request holds nothing.
"""

from __future__ import annotations

import itertools
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "cache"))

import pytest  # noqa: E402
from cache_testlib import TINY, TINY_PATTERN, model  # noqa: E402

from hybridpd.cache.geometry import CacheGeometry  # noqa: E402
from hybridpd.cache.pool import BlockPool  # noqa: E402
from hybridpd.disagg import handoff  # noqa: E402
from hybridpd.disagg.commands import RankTransferReport, TransferCommand, TransferReport  # noqa: E402
from hybridpd.disagg.endpoint import ControlKind, ControlMessage, ReadNotice  # noqa: E402
from hybridpd.disagg.leases import LeaseState  # noqa: E402
from hybridpd.disagg.params import HandoffMode, TransferParams  # noqa: E402
from hybridpd.engine.args import EngineArgs  # noqa: E402
from hybridpd.engine.block_manager import BlockManager  # noqa: E402
from hybridpd.engine.prefill_side import PrefillHooks  # noqa: E402
from hybridpd.engine.protocol import ErrorKind, GenerateOutput  # noqa: E402
from hybridpd.engine.scheduler import Scheduler  # noqa: E402
from hybridpd.request import FinishReason, Request, SamplingParams  # noqa: E402
from hybridpd.server import handoff_edge  # noqa: E402

CFG = model(TINY, TINY_PATTERN)
GEO = CacheGeometry.build(CFG, kernel_block_size=2)
PROMPT = list(range(3, 15))
LEASE_S = 10.0
_ids = itertools.count()


class FakePort:
    side_channels = ("127.0.0.1:5600",)
    ledger = None

    def __init__(self) -> None:
        self.notices: list[ReadNotice] = []
        self.control: list[ControlMessage] = []
        self.calls = 0

    def transfer(self, cmd: TransferCommand) -> TransferReport:
        self.calls += 1
        report = RankTransferReport(0, notices=tuple(self.notices), control=tuple(self.control))
        self.notices, self.control = [], []
        return TransferReport((report,))


class FakeHost:
    def __init__(self) -> None:
        self.args = EngineArgs(model_dir="unused", role="prefill", lease_s=LEASE_S)
        self.model_config = CFG
        self.blocks = BlockManager(BlockPool(16), len(GEO.attention_groups),
                                   len(GEO.mamba_groups), GEO.block_tokens)
        self.scheduler = Scheduler(self.blocks, max_num_batched_tokens=64, max_num_seqs=4)
        self.executor = FakePort()

    def finish_with_error(self, req: Request, message: str, outputs: list[GenerateOutput],
                          kind: ErrorKind) -> None:
        raise AssertionError("P's hooks never fail a request")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def p():
    host = FakeHost()
    hooks = PrefillHooks(host)  # type: ignore[arg-type]
    clock = Clock()
    hooks.leases.clock = clock
    return host, hooks, clock


def _handed_off(host: FakeHost, hooks: PrefillHooks) -> TransferParams:
    """Admit a do_remote_decode request, 'compute' its prompt, sample token 42, hand off."""
    rid = f"r{next(_ids)}"
    req = Request(rid, list(PROMPT), SamplingParams(max_tokens=4))
    assert hooks.on_add(req, handoff.RemoteDecode()) and req.hold_on_finish
    host.scheduler.add(req)
    assert host.scheduler.schedule().scheduled
    outs: list[GenerateOutput] = []
    hooks.on_first_token(req, 42, None, None, outs)
    assert len(outs) == 1 and outs[0].finished and outs[0].kv_transfer_params is not None
    params = outs[0].kv_transfer_params  # the typed hand-off (P's API signs its JSON)
    assert params.handoff is HandoffMode.FIRST_TOKEN and params.first_token == 42
    assert rid not in host.scheduler.requests and host.blocks.holds(rid)  # held for D
    assert hooks.leases.ledger.entry(params.transfer_id).state is LeaseState.HELD
    return params


def _step(hooks: PrefillHooks) -> None:
    hooks.before_schedule([])


def _all_free(host: FakeHost) -> bool:
    return host.blocks.num_free == host.blocks.num_usable


def test_every_reader_notified_frees_the_blocks(p) -> None:
    host, hooks, _ = p
    params = _handed_off(host, hooks)
    host.executor.notices.append(ReadNotice(params.transfer_id, 0, 1, "d-engine", "n1"))
    _step(hooks)
    assert _all_free(host) and not hooks.has_work()
    entry = hooks.leases.ledger.entry(params.transfer_id)
    assert (entry.state, entry.reader, entry.nonce) == (LeaseState.READ, "d-engine", "n1")
    assert hooks.counters()["blocks_released_by_reader"] == 1


def test_release_from_d_frees_the_blocks(p) -> None:
    host, hooks, _ = p
    params = _handed_off(host, hooks)
    host.executor.control.append(ControlMessage(ControlKind.RELEASE, (params.transfer_id,)))
    _step(hooks)
    assert _all_free(host)
    assert hooks.leases.ledger.entry(params.transfer_id).state is LeaseState.RELEASED


def test_renewals_keep_the_lease_and_expiry_ends_it(p) -> None:
    host, hooks, clock = p
    params = _handed_off(host, hooks)
    clock.now += LEASE_S * 0.9
    host.executor.control.append(ControlMessage(ControlKind.RENEW, (params.transfer_id,)))
    _step(hooks)
    clock.now += LEASE_S * 0.9  # past the first deadline, not past the renewed one
    _step(hooks)
    assert not _all_free(host) and hooks.has_work()
    clock.now += LEASE_S
    _step(hooks)
    assert _all_free(host) and hooks.counters()["leases_expired"] == 1
    assert hooks.leases.ledger.entry(params.transfer_id).state is LeaseState.EXPIRED


def test_abort_frees_a_held_hand_off_once(p) -> None:
    host, hooks, _ = p
    params = _handed_off(host, hooks)
    assert hooks.knows(params.request_id)
    assert hooks.on_abort(params.request_id) and _all_free(host)
    assert not hooks.on_abort(params.request_id)  # nothing held any more
    host.executor.notices.append(ReadNotice(params.transfer_id, 0, 1, "d-engine", "n1"))
    _step(hooks)  # a late notice about it changes nothing
    assert hooks.leases.ledger.entry(params.transfer_id).state is LeaseState.RELEASED
    assert hooks.counters()["blocks_released_by_abort"] == 1


def test_no_lease_no_polling(p) -> None:
    host, hooks, _ = p
    _step(hooks)
    assert host.executor.calls == 0  # nothing held: no transfer traffic at all


def test_a_request_finished_on_p_holds_nothing(p) -> None:
    host, hooks, _ = p
    req = Request("short", list(PROMPT), SamplingParams(max_tokens=1))
    hooks.on_add(req, handoff.RemoteDecode())
    host.scheduler.add(req)
    host.scheduler.schedule()
    outs: list[GenerateOutput] = []
    hooks.on_first_token(req, 7, None, FinishReason.LENGTH, outs)
    assert outs[0].kv_transfer_params is None
    assert not handoff_edge.hands_off(outs[0].kv_transfer_params)
    assert _all_free(host) and not hooks.has_work()
