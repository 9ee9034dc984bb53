"""The transfer service (`disagg/transfer_service.py`) in milliseconds, against a fake P side
channel and a scripted rank-0 control source, with no engine and no NIXL. P side: every way a
lease ends (`LeaseState`: HELD → READ by every reader's notice, → RELEASED by D's release or an
abort, → EXPIRED without renewal) and the ledger that answers confirmations; control messages
read from the control source directly (and not at all while nothing is held). D side:
renewals reach P, releases reach P once, confirmations answer trusted / not trusted /
unreachable; all of it on the service's one pool of threads.
"""

from __future__ import annotations

import os
import sys
import threading

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "cache"))

import pytest  # noqa: E402
from cache_testlib import TINY, TINY_PATTERN, model  # noqa: E402
from fake_transport import FakePeer  # noqa: E402

from hybridpd.cache.geometry import CacheGeometry  # noqa: E402
from hybridpd.disagg.endpoint import ControlKind, ControlMessage  # noqa: E402
from hybridpd.disagg.leases import LeaseState  # noqa: E402
from hybridpd.disagg.transfer_service import POOL_THREADS, TransferService  # noqa: E402

GEO = CacheGeometry.build(model(TINY, TINY_PATTERN), kernel_block_size=2)
LEASE_S = 10.0
WAIT_S = 10.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Control:
    """Rank 0's side channel as the service reads it: scripted messages, reads counted."""

    def __init__(self) -> None:
        self.messages: list[ControlMessage] = []
        self.reads = 0

    def __call__(self) -> list[ControlMessage]:
        self.reads += 1
        out, self.messages = self.messages, []
        return out


@pytest.fixture
def p():
    clock, control = Clock(), Control()
    service = TransferService(lease_s=LEASE_S, p_tp=2, reader="p", clock=clock,
                              control=control)
    yield service, clock, control
    service.close()


@pytest.fixture
def peer():
    fake = FakePeer("p-fake", GEO, 16)
    yield fake
    fake.stop()


@pytest.fixture
def d():
    service = TransferService(lease_s=LEASE_S, p_tp=1, reader="d-engine",
                              renew_period_s=0.05)
    yield service
    service.close()


def _state(service: TransferService, tid: str) -> LeaseState:
    entry = service.leases.ledger.entry(tid)
    assert entry is not None
    return entry.state


# ---- P: every way a lease ends -----------------------------------------------------------------
def test_held_until_every_reader_of_one_read_notified(p) -> None:
    service, _, _ = p
    service.hold("r", "t1")
    assert _state(service, "t1") is LeaseState.HELD and service.holds("r")
    assert service.notice("t1", 0, 0, 1, "d", "n1") is None  # P rank 1 has not heard yet
    assert service.notice("t1", 1, 0, 1, "other", "n1") is None  # another reader: ignored
    assert service.notice("t1", 1, 0, 1, "d", "n2") is None  # another READ: ignored
    assert service.notice("t1", 1, 0, 1, "d", "n1") == "r"
    entry = service.leases.ledger.entry("t1")
    assert entry is not None and (entry.state, entry.reader, entry.nonce) == \
        (LeaseState.READ, "d", "n1")
    assert not service.holds("r") and service.num_leases() == 0


def test_release_from_d_is_read_from_rank_0_s_channel(p) -> None:
    service, _, control = p
    assert service.ended() == [] and control.reads == 0  # nothing held: nothing read
    service.hold("r", "t1")
    control.messages.append(ControlMessage(ControlKind.RELEASE, ("t1", "unknown")))
    assert service.ended() == [("r", LeaseState.RELEASED)] and control.reads == 1
    assert _state(service, "t1") is LeaseState.RELEASED
    assert service.ended() == []  # once


def test_renewals_extend_the_lease_until_it_expires(p) -> None:
    service, clock, control = p
    service.hold("r", "t1")
    clock.now += LEASE_S * 0.9
    control.messages.append(ControlMessage(ControlKind.RENEW, ("t1",)))
    assert service.ended() == []
    clock.now += LEASE_S * 0.9  # past the first deadline, not past the renewed one
    assert service.ended() == [] and service.holds("r")
    clock.now += LEASE_S
    assert service.ended() == [("r", LeaseState.EXPIRED)]
    assert _state(service, "t1") is LeaseState.EXPIRED


def test_abort_ends_the_lease_once(p) -> None:
    service, _, _ = p
    service.hold("r", "t1")
    assert service.abort("r") and not service.abort("r")
    assert _state(service, "t1") is LeaseState.RELEASED
    assert service.notice("t1", 0, 0, 1, "d", "n") is None  # a late notice changes nothing


def test_every_lease_state_is_covered_here() -> None:
    assert {s.name for s in LeaseState} == {"HELD", "READ", "RELEASED", "EXPIRED"}


# ---- D: renewals, releases, confirmations --------------------------------------------------
def test_waiting_hand_offs_are_renewed_until_unwatched(peer, d) -> None:
    d.watch("r", peer.address, "t1")
    assert peer.wait_control("renew", "t1", WAIT_S)  # the service's own renewal round
    d.unwatch("r")
    assert d.watching() == 0
    d.renew_now()  # nothing watched: nothing sent
    assert not any(k == "release" for k, _ in peer.control)  # unwatched without a release


def test_a_release_reaches_p_once(peer, d) -> None:
    d.watch("r", peer.address, "t1")
    d.unwatch("r", release=True)
    d.unwatch("r", release=True)  # unknown now: nothing more
    assert peer.wait_control("release", "t1", WAIT_S)
    d.watch("s", peer.address, "t2")
    d.unwatch("s", release=True)
    assert peer.wait_control("release", "t2", WAIT_S)
    assert [ids for k, ids in peer.control if k == "release"] == [("t1",), ("t2",)]


@pytest.mark.parametrize("lease_state, trusted", [("held", True), ("expired", False),
                                                  ("released", False)])
def test_confirmations_say_whether_the_read_can_be_trusted(peer, d, lease_state,
                                                           trusted) -> None:
    peer.lease_state = lease_state
    ok, why = d.confirm(peer.address, "t1", "n1").result(timeout=WAIT_S)
    assert ok is trusted and (why == "held" if trusted else lease_state in why)


def test_an_unreachable_p_is_not_trusted(d) -> None:
    server = FakePeer("gone", GEO, 16)
    address = server.address
    server.stop()
    ok, why = d.confirm(address, "t1", "n1").result(timeout=WAIT_S)
    assert not ok and "could not be asked" in why


def test_all_of_it_runs_on_one_small_pool(peer, d) -> None:
    d.watch("r", peer.address, "t1")
    futures = [d.confirm(peer.address, f"t{i}", "n") for i in range(8)]
    d.unwatch("r", release=True)
    assert all(f.result(timeout=WAIT_S)[0] for f in futures)
    assert peer.wait_control("release", "t1", WAIT_S)
    mine = [t for t in threading.enumerate() if t.name.startswith(d.thread_prefix + "_")]
    assert 0 < len(mine) <= POOL_THREADS
    assert not [t for t in threading.enumerate()
                if t.name.startswith(("lease-renewer", "lease-call", "kv-confirm"))]
