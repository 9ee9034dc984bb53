"""P's KV connector (`prefill_side.PrefillConnector`) in milliseconds: driven through the real
scheduler that owns it (and a real block manager) and a transfer service with a fake lease
clock, with scripted transfer reports standing for the endpoints' notices and a scripted
rank-0 control source for D's renewals and releases (the service reads them, not the step).
Every way a lease ends makes the blocks releasable and the scheduler frees them, exactly
once: all readers notified, D's release, expiry, abort; a renewal keeps them; a request
finished on P holds nothing; a 1-token prompt in n-1 mode is answered at admission.
"""

from __future__ import annotations

import itertools
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "cache"))

import pytest  # noqa: E402
from cache_testlib import TINY, TINY_PATTERN, model  # noqa: E402
from fake_transport import FakeChannel  # noqa: E402

from hybridpd.cache.geometry import CacheGeometry  # noqa: E402
from hybridpd.cache.pool import BlockPool  # noqa: E402
from hybridpd.disagg import handoff  # noqa: E402
from hybridpd.disagg.commands import RankTransferReport, TransferReport  # noqa: E402
from hybridpd.disagg.endpoint import ReadNotice  # noqa: E402
from hybridpd.disagg.instance_channel import ControlKind, ControlMessage  # noqa: E402
from hybridpd.disagg.leases import LeaseState  # noqa: E402
from hybridpd.disagg.params import HandoffMode, TransferParams  # noqa: E402
from hybridpd.disagg.transfer_service import TransferService  # noqa: E402
from hybridpd.engine.args import EngineArgs  # noqa: E402
from hybridpd.engine.block_manager import BlockManager  # noqa: E402
from hybridpd.engine.kv_connector import AbortAction, AdmitKind  # noqa: E402
from hybridpd.engine.prefill_side import PrefillConnector  # noqa: E402
from hybridpd.engine.scheduler import Scheduler  # noqa: E402
from hybridpd.request import FinishReason, Request, SamplingParams  # noqa: E402
from hybridpd.server import handoff_edge  # noqa: E402

CFG = model(TINY, TINY_PATTERN)
GEO = CacheGeometry.build(CFG, kernel_block_size=2)
PROMPT = list(range(3, 15))
LEASE_S = 10.0
SIDE_CHANNEL = "127.0.0.1:5600"
_ids = itertools.count()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Prefill:
    """A scheduler owning a prefill connector, stepped as the engine steps it."""

    def __init__(self, **kw) -> None:
        self.clock = Clock()
        args = EngineArgs(model_dir="unused", role="prefill", lease_s=LEASE_S, **kw)
        self.channel = FakeChannel()  # every reader handshook
        self.service = TransferService(lease_s=LEASE_S, p_tp=1, reader="p-engine",
                                       clock=self.clock, channel=self.channel)
        self.connector = PrefillConnector(args, SIDE_CHANNEL, self.service)
        self.blocks = BlockManager(BlockPool(16), len(GEO.attention_groups),
                                   len(GEO.mamba_groups), GEO.block_tokens)
        self.scheduler = Scheduler(self.blocks, max_num_batched_tokens=64, max_num_seqs=4,
                                   connector=self.connector)
        self.notices: list[ReadNotice] = []
        self.commands = 0

    @property
    def control(self) -> list[ControlMessage]:
        return self.channel.messages

    def step(self) -> None:
        self.scheduler.apply_transfers()
        cmd = self.scheduler.transfer_command()
        if cmd is None:
            return
        self.commands += 1
        report = RankTransferReport(0, notices=tuple(self.notices))
        self.notices = []
        self.scheduler.on_transfer_report(TransferReport((report,)))

    @property
    def all_free(self) -> bool:
        return self.blocks.num_free == self.blocks.num_usable


@pytest.fixture
def p():
    prefill = Prefill()
    yield prefill
    prefill.service.close()


def _computed(p: Prefill, max_tokens: int = 4) -> Request:
    """Admit a do_remote_decode request and 'compute' its prompt."""
    rid = f"r{next(_ids)}"
    req = Request(rid, list(PROMPT), SamplingParams(max_tokens=max_tokens))
    assert p.scheduler.add(req, handoff.RemoteDecode()).kind is AdmitKind.LOCAL
    assert p.scheduler.hands_off(rid)
    out = p.scheduler.schedule()
    assert out.scheduled
    p.scheduler.on_computed(out)
    return req


def _handed_off(p: Prefill) -> TransferParams:
    """... sample token 42, hand off."""
    req = _computed(p)
    req.output_token_ids.append(42)
    params = p.scheduler.hand_off(req, 42, None)
    assert params is not None  # the typed hand-off (P's API signs its JSON)
    assert params.handoff is HandoffMode.FIRST_TOKEN and params.first_token == 42
    assert params.block_ids == p.scheduler.block_ids(req.request_id)
    assert params.num_tokens == len(PROMPT) and params.side_channel == SIDE_CHANNEL
    assert req.request_id not in p.scheduler.requests and p.blocks.holds(req.request_id)
    assert p.service.leases.ledger.entry(params.transfer_id).state is LeaseState.HELD
    assert not p.scheduler.hands_off(req.request_id)
    return params


def test_every_reader_notified_frees_the_blocks(p) -> None:
    params = _handed_off(p)
    p.notices.append(ReadNotice(params.transfer_id, 0, 1, "d-engine", "n1"))
    p.step()
    assert p.all_free and not p.connector.has_work()
    entry = p.service.leases.ledger.entry(params.transfer_id)
    assert (entry.state, entry.reader, entry.nonce) == (LeaseState.READ, "d-engine", "n1")
    assert p.connector.counters()["blocks_released_by_reader"] == 1


def test_release_from_d_frees_the_blocks(p) -> None:
    params = _handed_off(p)
    p.control.append(ControlMessage(ControlKind.RELEASE, (params.transfer_id,)))
    p.step()
    assert p.all_free
    assert p.service.leases.ledger.entry(params.transfer_id).state is LeaseState.RELEASED


def test_renewals_keep_the_lease_and_expiry_ends_it(p) -> None:
    params = _handed_off(p)
    p.clock.now += LEASE_S * 0.9
    p.control.append(ControlMessage(ControlKind.RENEW, (params.transfer_id,)))
    p.step()
    p.clock.now += LEASE_S * 0.9  # past the first deadline, not past the renewed one
    p.step()
    assert not p.all_free and p.connector.has_work()
    p.clock.now += LEASE_S
    p.step()
    assert p.all_free and p.connector.counters()["leases_expired"] == 1
    assert p.service.leases.ledger.entry(params.transfer_id).state is LeaseState.EXPIRED


def test_abort_frees_a_held_hand_off_once(p) -> None:
    params = _handed_off(p)
    assert p.connector.knows(params.request_id)
    assert p.scheduler.abort(params.request_id) and p.all_free
    assert not p.scheduler.abort(params.request_id)  # nothing held any more
    p.notices.append(ReadNotice(params.transfer_id, 0, 1, "d-engine", "n1"))
    p.step()  # a late notice about it changes nothing (the lease table is empty: no command)
    assert p.service.leases.ledger.entry(params.transfer_id).state is LeaseState.RELEASED
    assert p.connector.counters()["blocks_released_by_abort"] == 1


def test_abort_before_the_prompt_is_done_is_an_ordinary_abort(p) -> None:
    req = _computed(p)
    assert p.connector.abort(req.request_id) is AbortAction.NOT_MINE
    assert not p.scheduler.hands_off(req.request_id)
    p.scheduler.finish(req.request_id, FinishReason.ABORT)
    assert p.all_free


def test_no_lease_no_polling(p) -> None:
    p.step()
    assert p.commands == 0  # nothing held: no transfer traffic at all
    assert p.connector.idle_wait_s() is None
    _handed_off(p)
    wait = p.connector.idle_wait_s()
    assert wait is not None and wait > 0
    p.step()
    assert p.commands == 1  # a held lease: the step's command reads notices and control


def test_a_request_finished_on_p_holds_nothing(p) -> None:
    req = _computed(p, max_tokens=1)
    req.output_token_ids.append(7)
    params = p.scheduler.hand_off(req, 7, FinishReason.LENGTH)
    assert params is None and not handoff_edge.hands_off(params)
    assert req.finish_reason is FinishReason.LENGTH
    assert p.all_free and not p.connector.has_work()


def test_n_minus_1_hands_off_n_minus_1_tokens_and_answers_a_1_token_prompt() -> None:
    p = Prefill(handoff="n-1")
    p.service.close()  # no lease is ever asked of it here
    req = Request("long", list(PROMPT), SamplingParams(max_tokens=4))
    admission = p.scheduler.add(req, handoff.RemoteDecode())
    assert admission.kind is AdmitKind.LOCAL and not req.sample_final
    assert req.prompt_token_ids == PROMPT[:-1]  # D computes token N itself
    p.scheduler.on_computed(p.scheduler.schedule())
    params = p.scheduler.hand_off(req, None, None)
    assert params is not None and params.handoff is HandoffMode.N_MINUS_1
    assert params.num_tokens == len(PROMPT) - 1 and params.first_token is None
    one = Request("one", [5], SamplingParams(max_tokens=4))
    admission = p.scheduler.add(one, handoff.RemoteDecode())
    assert admission.kind is AdmitKind.ANSWERED and "one" not in p.scheduler.requests
    assert admission.params is not None and admission.params.num_tokens == 0


def test_a_plain_or_prompt_only_request_runs_as_co_located(p) -> None:
    req = Request("plain", list(PROMPT), SamplingParams(max_tokens=4))
    assert p.scheduler.add(req).kind is AdmitKind.LOCAL and not p.scheduler.hands_off("plain")
    score = Request("score", list(PROMPT), SamplingParams(max_tokens=0))
    p.scheduler.add(score, handoff.RemoteDecode())
    assert not p.scheduler.hands_off("score")
    with pytest.raises(ValueError, match="do_remote_decode"):
        p.scheduler.add(Request("bad", list(PROMPT), SamplingParams(max_tokens=4)),
                        handoff.RemotePrefill(_handed_off(p)))
