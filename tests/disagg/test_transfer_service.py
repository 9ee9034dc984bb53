"""The transfer service (`disagg/transfer_service.py`) in milliseconds, against a fake P side
channel and a scripted rank-0 control source, with no engine and no NIXL. P side: every way a
lease ends (`LeaseState`: HELD → READ by every reader's notice, → RELEASED by D's release or an
abort, → EXPIRED without renewal) and the ledger that answers confirmations; control messages
read from the control source directly (and not at all while nothing is held). D side:
renewals reach P, releases reach P once, confirmations answer trusted / not trusted /
unreachable; all of it on the service's one pool of threads. The instance's one side channel,
which the service opens from every rank's advert (fake NIXL metadata): handshakes naming each
rank, refusals (rank, compatibility, decode role), the handshaken agents the only ones whose
notices are believed, confirmations from the service's ledger, D's renewals and releases
reaching `ended`.
"""

from __future__ import annotations

import os
import socket
import sys
import threading

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "cache"))

import pytest  # noqa: E402
from cache_testlib import TINY, TINY_PATTERN, model  # noqa: E402
from fake_transport import FakeChannel, FakePeer, fake_advert  # noqa: E402

from hybridpd.cache.geometry import CacheGeometry  # noqa: E402
from hybridpd.disagg.endpoint import RankAdvert, agent_name  # noqa: E402
from hybridpd.disagg.errors import SideChannelError, SideChannelRemoteError  # noqa: E402
from hybridpd.disagg.instance_channel import ControlKind, ControlMessage  # noqa: E402
from hybridpd.disagg.leases import LeaseState, confirm_lease  # noqa: E402
from hybridpd.disagg.params import PeerGeometry  # noqa: E402
from hybridpd.disagg.side_channel import (  # noqa: E402
    SideChannelServer,
    decode_bytes,
    side_channel_call,
)
from hybridpd.disagg.transfer_service import POOL_THREADS, TransferService  # noqa: E402
from hybridpd.disagg.transport import PeerFacts  # noqa: E402

CFG = model(TINY, TINY_PATTERN)
GEO = CacheGeometry.build(CFG, kernel_block_size=2)
LEASE_S = 10.0
WAIT_S = 10.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def p():
    clock, control = Clock(), FakeChannel()  # every reader handshook
    service = TransferService(lease_s=LEASE_S, p_tp=2, reader="p", clock=clock,
                              channel=control)
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


# ---- the instance's one side channel -----------------------------------------------------------
SECRET = "s3cret"
P_TP = 2


def _adverts(engine_id: str, compat: str = "compat-1") -> list[RankAdvert]:
    """What the ranks of a P instance with TP 2 report at start-up (fake NIXL metadata)."""
    out = []
    for r in range(P_TP):
        geo = CacheGeometry.build(CFG, tp_size=P_TP, tp_rank=r, kernel_block_size=2)
        pool = PeerGeometry.from_cache(geo, 16, 4096 * (r + 1))
        metadata = f"metadata-of-rank-{r}".encode()
        out.append(RankAdvert(engine_id, r, compat, pool, 0, "cpu", metadata,
                              PeerFacts("host-1", "cpu", None, None)))
    return out


@pytest.fixture
def instance():
    """A P instance's service with its side channel open (TP 2, a deployment secret)."""
    clock = Clock()
    service = TransferService(lease_s=LEASE_S, p_tp=P_TP, reader="p-inst", clock=clock,
                              secret=SECRET)
    address = service.open_side_channel("p-inst", _adverts("p-inst"), "127.0.0.1", 0,
                                        serves_reads=True)
    yield service, address, clock
    service.close()


def _call(address: str, msg: dict, secret: str | None = SECRET) -> dict:
    host, _, port = address.rpartition(":")
    return side_channel_call(host, int(port), msg, WAIT_S, secret=secret)


def _handshake(address: str, agents: object = ("d-inst-rank0",), compat: str = "compat-1",
               secret: str | None = SECRET) -> dict:
    agents = list(agents) if isinstance(agents, tuple) else agents
    return _call(address, {"type": "handshake", "compat_hash": compat, "agents": agents},
                 secret)


def test_one_side_channel_answers_the_handshake_for_every_rank(instance) -> None:
    service, address, _ = instance
    assert service.address == address
    got = _handshake(address)
    assert (got["engine_id"], got["tp_size"], got["compat_hash"]) == ("p-inst", P_TP, "compat-1")
    for r, advert in enumerate(_adverts("p-inst")):
        rank = got["ranks"][r]
        assert (rank["engine_id"], rank["rank"], rank["compat_hash"]) == ("p-inst", r, "compat-1")
        assert decode_bytes(rank["agent_metadata"]) == f"metadata-of-rank-{r}".encode()
        assert PeerGeometry.from_dict(rank["geometry"]) == advert.geometry
        assert PeerFacts.from_dict(rank["transport_facts"]) == advert.facts
        assert RankAdvert.from_answer(rank) == advert


@pytest.mark.parametrize("agents", [None, "d-inst-rank0", [], [7], [""], ["x" * 257],
                                    [f"a{i}" for i in range(65)]])
def test_a_handshake_naming_no_valid_agents_is_refused(instance, agents) -> None:
    service, address, _ = instance
    with pytest.raises(SideChannelRemoteError, match="agents") as info:
        _handshake(address, agents)
    assert "ranks" not in info.value.response
    assert not service.channel.knows("d-inst-rank0")


def test_handshakes_refused_without_the_secret_or_with_another_compat_hash(instance) -> None:
    service, address, _ = instance
    for secret in (None, "another-deployment"):
        with pytest.raises(SideChannelError) as info:
            _handshake(address, ("mallory-rank0",), secret=secret)
        assert "ranks" not in getattr(info.value, "response", {})
    with pytest.raises(SideChannelRemoteError, match="compatibility hash"):
        _handshake(address, ("mallory-rank0",), compat="compat-2")
    assert not service.channel.knows("mallory-rank0")  # refused handshakes make nobody known


def test_a_decode_instance_answers_no_handshake() -> None:
    service = TransferService(lease_s=LEASE_S, p_tp=1, reader="d-inst", secret=SECRET)
    address = service.open_side_channel("d-inst", _adverts("d-inst")[:1], "127.0.0.1", 0,
                                        serves_reads=False)
    try:
        with pytest.raises(SideChannelRemoteError, match="not readable") as info:
            _handshake(address)
        assert "ranks" not in info.value.response
    finally:
        service.close()


def test_notices_are_believed_only_from_agents_that_handshook(instance) -> None:
    service, address, _ = instance
    service.hold("r", "t1")
    # D (TP 1) reads from both P ranks: its agent is unknown until it handshakes
    assert service.notice("t1", 0, 0, 1, "d-inst", "n1") is None
    assert service.counters["notices_refused"] == 1 and service.holds("r")
    _handshake(address, (agent_name("d-inst", 0),))  # one handshake for every P rank
    assert service.notice("t1", 0, 0, 1, "d-inst", "n1") is None
    assert service.notice("t1", 1, 0, 1, "d-inst", "n1") == "r"
    assert service.counters["notices_refused"] == 1
    assert _state(service, "t1") is LeaseState.READ


def test_confirmations_are_answered_from_the_services_ledger(instance) -> None:
    service, address, _ = instance
    service.hold("r", "t1")
    assert confirm_lease(address, "t1", "d-inst", WAIT_S, "n1", SECRET) == (True, "held")
    _handshake(address, (agent_name("d-inst", 0),))
    for p_rank in range(P_TP):
        service.notice("t1", p_rank, 0, 1, "d-inst", "n1")
    assert confirm_lease(address, "t1", "d-inst", WAIT_S, "n1", SECRET) == (True, "held")
    ok, why = confirm_lease(address, "t1", "d-inst", WAIT_S, "n-replay", SECRET)
    assert not ok and "replayed" in why
    ok, why = confirm_lease(address, "unknown", "d-inst", WAIT_S, "n1", SECRET)
    assert not ok and "unknown" in why
    ok, why = confirm_lease(address, "t1", "d-inst", WAIT_S, "n1", None)  # unsigned
    assert not ok and "could not be asked" in why


def test_renewals_and_releases_on_the_side_channel_reach_ended(instance) -> None:
    service, address, clock = instance
    service.hold("r", "t1")
    service.hold("s", "t2")
    clock.now += LEASE_S * 0.9
    _call(address, {"type": "renew", "transfer_ids": ["t1", "never-held"]})
    _call(address, {"type": "release", "transfer_ids": ["t2"]})
    assert service.ended() == [("s", LeaseState.RELEASED)]
    clock.now += LEASE_S * 0.5  # past t1's first deadline, not past the renewed one
    assert service.ended() == [] and service.holds("r")
    assert service.channel.counters["control_ignored"] == 1  # the id never held
    with pytest.raises(SideChannelRemoteError, match="list of strings"):
        _call(address, {"type": "renew", "transfer_ids": "t1"})


def test_closing_the_service_closes_its_side_channel() -> None:
    service = TransferService(lease_s=LEASE_S, p_tp=P_TP, reader="p-inst", secret=SECRET)
    address = service.open_side_channel("p-inst", _adverts("p-inst"), "127.0.0.1", 0,
                                        serves_reads=True)
    _handshake(address)
    with pytest.raises(RuntimeError, match="already open"):
        service.open_side_channel("p-inst", _adverts("p-inst"), "127.0.0.1", 0, True)
    service.close()
    with pytest.raises(SideChannelError, match="cannot connect"):
        _handshake(address)


def test_adverts_must_be_every_rank_of_this_instance() -> None:
    service = TransferService(lease_s=LEASE_S, p_tp=P_TP, reader="p-inst")
    try:
        for adverts in ([], _adverts("p-inst")[::-1], _adverts("other")):
            with pytest.raises(ValueError, match="advert"):
                service.open_side_channel("p-inst", adverts, "127.0.0.1", 0, True)
        assert service.address is None
    finally:
        service.close()


# ---- D: handshakes with P instances -----------------------------------------------------------
@pytest.fixture
def decoder():
    """A decode instance's service (TP 2) with its side channel open: what it handshakes as."""
    service = TransferService(lease_s=LEASE_S, p_tp=1, reader="d-inst", secret=None,
                              handshake_timeout_s=WAIT_S)
    d_adverts = [fake_advert("d-inst", CacheGeometry.build(CFG, tp_size=2, tp_rank=r,
                                                           kernel_block_size=2), 16)
                 for r in range(2)]
    service.open_side_channel("d-inst", d_adverts, "127.0.0.1", 0, serves_reads=False)
    yield service
    service.close()


@pytest.fixture
def frozen():
    """A side channel that answers nothing until `gate` is set (then garbage: {})."""
    gate, entered = threading.Event(), threading.Event()

    def handler(msg: dict) -> dict:
        entered.set()
        gate.wait(30)
        return {}

    server = SideChannelServer("127.0.0.1", 0, handler, read_timeout_s=30.0,
                               auth_timeout_s=30.0).start()
    yield f"127.0.0.1:{server.port}", entered, gate
    gate.set()
    server.stop()


def test_one_handshake_per_p_instance_shared_by_every_request(peer, decoder) -> None:
    futures = [decoder.peer("p-fake", peer.address, 1) for _ in range(3)]
    assert futures[0] is futures[1] is futures[2]
    (advert,) = futures[0].result(timeout=WAIT_S)
    assert advert == peer.advert()
    assert decoder.peer("p-fake", peer.address, 1).result(timeout=WAIT_S) == (advert,)
    assert peer.handshakes == 1 and decoder.calls["handshake"] == 1
    assert peer.agents == [("d-inst-rank0", "d-inst-rank1")]  # every D rank becomes known
    decoder.forget_peer("p-fake", peer.address)  # a READ failed: P may have restarted
    decoder.peer("p-fake", peer.address, 1).result(timeout=WAIT_S)
    assert peer.handshakes == 2


def test_a_handshake_that_says_another_instance_or_tp_fails_and_is_made_again(peer,
                                                                             decoder) -> None:
    for engine_id, tp in (("someone-else", 1), ("p-fake", 2)):
        with pytest.raises(ValueError, match="expected"):
            decoder.peer(engine_id, peer.address, tp).result(timeout=WAIT_S)
    with pytest.raises(ValueError):
        decoder.peer("someone-else", peer.address, 1).result(timeout=WAIT_S)
    assert peer.handshakes == 3  # a failed handshake is not kept


def test_a_handshake_with_another_compat_hash_fails(decoder) -> None:
    other = FakePeer("p-other", GEO, 16, compat="other-compat")
    try:
        with pytest.raises(ValueError, match="compatibility hash"):
            decoder.peer("p-other", other.address, 1).result(timeout=WAIT_S)
    finally:
        other.stop()


def test_a_dead_side_channel_is_a_clear_error(decoder) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(SideChannelError, match="cannot connect") as info:
        decoder.peer("gone", f"127.0.0.1:{port}", 1).result(timeout=WAIT_S)
    assert f"127.0.0.1:{port}" in str(info.value)


def test_a_frozen_p_does_not_delay_a_handshake_with_a_healthy_p(peer, decoder, frozen) -> None:
    address, entered, gate = frozen
    stuck = decoder.peer("frozen", address, 1)
    assert entered.wait(WAIT_S)
    assert decoder.peer("p-fake", peer.address, 1).result(timeout=WAIT_S)
    assert not stuck.done()  # still waiting on the frozen P meanwhile
    gate.set()
    with pytest.raises(ValueError):
        stuck.result(timeout=WAIT_S)


def test_a_handshake_with_a_frozen_p_times_out(frozen) -> None:
    address, entered, _ = frozen
    service = TransferService(lease_s=LEASE_S, p_tp=1, reader="d-inst",
                              handshake_timeout_s=0.3)
    try:
        service.open_side_channel("d-inst", [fake_advert("d-inst", GEO, 16)], "127.0.0.1", 0,
                                  serves_reads=False)
        with pytest.raises(SideChannelError, match="timed out"):
            service.peer("frozen", address, 1).result(timeout=WAIT_S)
        assert entered.is_set()
    finally:
        service.close()


def test_without_its_own_side_channel_a_service_cannot_handshake(peer, d) -> None:
    with pytest.raises(SideChannelError, match="no side channel"):
        d.peer("p-fake", peer.address, 1).result(timeout=WAIT_S)
    assert peer.handshakes == 0


def test_a_closed_service_handshakes_with_nobody(peer, decoder) -> None:
    decoder.close()
    with pytest.raises(SideChannelError, match="closed"):
        decoder.peer("p-fake", peer.address, 1).result(timeout=WAIT_S)
    assert peer.handshakes == 0
