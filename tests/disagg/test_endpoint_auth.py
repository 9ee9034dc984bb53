"""Endpoints behind their instance's side channel (rank 0's transfer service), with a deployment
secret, over real NIXL (UCX loopback, one process): metadata only to authenticated handshakes,
control messages only from authenticated peers and only for held hand-offs, notices only from
the agent that handshook and speaks for itself, and a READ between two secure endpoints still
copies exactly the request's state."""

from __future__ import annotations

import itertools
import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "cache"))

import pytest  # noqa: E402
import torch  # noqa: E402
from cache_testlib import (  # noqa: E402
    TINY,
    TINY_PATTERN,
    model,
    random_bytes,
    random_state,
    read_state,
    write_state,
)
from instance_testlib import Instance  # noqa: E402

from hybridpd.cache.geometry import CacheGeometry  # noqa: E402
from hybridpd.cache.tensors import PoolTensors  # noqa: E402
from hybridpd.disagg.endpoint import (  # noqa: E402
    KVEndpoint,
    agent_name,
    encode_notice,
    notice_key,
)
from hybridpd.disagg.errors import SideChannelRemoteError  # noqa: E402
from hybridpd.disagg.instance_channel import CONTROL_QUEUE_MAX, ControlKind  # noqa: E402
from hybridpd.disagg.leases import LeaseState, confirm_lease  # noqa: E402
from hybridpd.disagg.nixl_agent import TransferAgent  # noqa: E402
from hybridpd.disagg.params import TransferParams  # noqa: E402
from hybridpd.disagg.receiver import KVReceiver, ReadJob  # noqa: E402
from hybridpd.disagg.side_channel import SideChannelServer, side_channel_call  # noqa: E402

torch.set_num_threads(1)

MODEL = model(TINY, TINY_PATTERN)
GEO = CacheGeometry.build(MODEL, kernel_block_size=2)
NUM_BLOCKS = 8
N = 11
P_IDS = [[1, 2], [3], [4], [5]]
D_IDS = [[6, 2], [1], [3], [7]]
SECRET = "s3cret"
WAIT_S = 10.0
_names = itertools.count()


def _endpoint(role: str, seed: int, secret: str | None = SECRET,
              serves_reads: bool = True) -> tuple[PoolTensors, Instance]:
    pool = PoolTensors(GEO, NUM_BLOCKS)
    random_bytes(pool, seed)
    ep = KVEndpoint(f"{role}{next(_names)}-{os.getpid()}", GEO, NUM_BLOCKS, pool.buffer,
                    "tiny", secret=secret)
    return pool, Instance(ep, secret=secret, serves_reads=serves_reads)


@pytest.fixture
def pd():
    (p_pool, p), (d_pool, d) = _endpoint("p", 1), _endpoint("d", 2)
    try:
        yield p_pool, p, d_pool, d
    finally:
        d.close()
        p.close()


def _call(ep: Instance, msg: dict, secret: str | None = SECRET) -> dict:
    host, _, port = ep.address.rpartition(":")
    return side_channel_call(host, int(port), msg, 3.0, secret=secret)


def _read(p: Instance, d: Instance, rid: str, nonce: str) -> None:
    params = TransferParams(rid, p.engine_id, p.address, 1, P_IDS, N, "n-1",
                            transfer_id=f"x-{rid}")
    peers = d.service.peer(p.engine_id, p.address, 1).result(timeout=WAIT_S)  # D handshakes
    rx = KVReceiver(d.ep, handshake_timeout_s=5.0, transfer_timeout_s=WAIT_S)
    try:
        rx.start(ReadJob(rid, params, tuple(tuple(g) for g in D_IDS), nonce, peers))
        deadline = time.monotonic() + WAIT_S
        while not (results := rx.poll()):
            assert time.monotonic() < deadline, "READ never finished"
            time.sleep(0.002)
        assert [r.ok for r in results] == [True], results
    finally:
        rx.close()


def _handshake(d: Instance) -> dict:
    """The handshake D's transfer service sends (its rank's agent, its compat hash)."""
    return {"type": "handshake", "compat_hash": d.compat, "agents": [d.agent.name]}


def _wait_notices(ep: Instance, want: int) -> list:
    got: list = []
    deadline = time.monotonic() + WAIT_S
    while len(got) < want:
        assert time.monotonic() < deadline, f"only {len(got)} of {want} notices"
        got.extend(ep.read_notices())
        time.sleep(0.005)
    return got


@pytest.mark.parametrize("secret", [None, "another-deployment"])
def test_unauthenticated_handshake_gets_no_metadata(pd, secret) -> None:
    _, p, _, d = pd
    with pytest.raises(SideChannelRemoteError) as info:
        _call(p, _handshake(d), secret=secret)
    assert "ranks" not in info.value.response and "agent_metadata" not in info.value.response
    (ok,) = _call(p, _handshake(d))["ranks"]
    assert ok["agent_metadata"] and ok["geometry"]["base_addr"] == p.local.base_addr


def test_control_messages_need_authentication_and_a_held_hand_off(pd) -> None:
    _, p, _, _ = pd
    p.ledger.set("held", LeaseState.HELD)
    p.ledger.set("gone", LeaseState.EXPIRED)
    for kind in ("renew", "release", "confirm"):
        with pytest.raises(SideChannelRemoteError, match="not authenticated"):
            _call(p, {"type": kind, "transfer_ids": ["held"], "transfer_id": "held"}, secret=None)
    assert p.control_messages() == []
    for _ in range(CONTROL_QUEUE_MAX + 50):
        _call(p, {"type": "renew", "transfer_ids": ["held", "gone", "never", "held"]})
    msgs = p.control_messages()
    assert 0 < len(msgs) <= CONTROL_QUEUE_MAX  # bounded; only the held id, once per message
    assert {(m.kind, m.transfer_ids) for m in msgs} == {(ControlKind.RENEW, ("held",))}
    assert p.control_messages() == []
    _call(p, {"type": "renew", "transfer_ids": ["gone", "never"]})
    assert p.control_messages() == []  # nothing held: nothing queued, nothing to drain
    for _ in range(CONTROL_QUEUE_MAX // 2):
        _call(p, {"type": "renew", "transfer_ids": ["held"]})
    p.ledger.set("held", LeaseState.READ, "D", "n")  # the lease ended; nobody drained
    _call(p, {"type": "renew", "transfer_ids": ["held-2"]})
    p.ledger.set("held-2", LeaseState.HELD)
    _call(p, {"type": "renew", "transfer_ids": ["held-2"]})  # queue pruned of what ended
    assert [m.transfer_ids for m in p.control_messages()] == [("held-2",)]


def test_secure_read_is_exact_and_notices_carry_the_nonce(pd) -> None:
    p_pool, p, d_pool, d = pd
    state = random_state(MODEL, N, GEO.kv_dtype, seed=3)
    write_state(p_pool, state, P_IDS, N)
    _read(p, d, "r1", nonce="n-1st")
    (notice,) = _wait_notices(p, 1)
    assert (notice.transfer_id, notice.reader, notice.nonce) == ("x-r1", d.engine_id, "n-1st")
    got = read_state(d_pool, state, D_IDS, N)
    for part in ("kv", "conv", "ssm"):
        for layer, want in getattr(state, part).items():
            assert torch.equal(getattr(got, part)[layer], want), (part, layer)


def test_forged_notices_change_nothing(pd) -> None:
    """An agent that got P's metadata without handshaking (e.g. sniffed), a handshaken one
    speaking for another reader, or a notice without the deployment's MAC is not believed; the
    real reader still is."""
    _, p, _, d = pd
    _read(p, d, "warm", nonce="n0")  # D handshakes with P
    assert len(_wait_notices(p, 1)) == 1
    mallory_id = f"mallory{os.getpid()}"
    with TransferAgent(agent_name(mallory_id, 0)) as mallory:
        peer = mallory.add_peer(p.agent.metadata())  # metadata obtained some other way
        mallory.send_notif(peer, encode_notice("x-victim", 0, 1, d.engine_id, "n9"))  # as D
        mallory.send_notif(peer, encode_notice("x-victim", 0, 1, mallory_id, "n9"))  # as itself
        mallory.send_notif(peer, encode_notice("x-victim", 0, 1, mallory_id, "n9"))
        d_peer = agent_name(p.engine_id, 0)  # the handshaken D speaking for another reader
        key = d.notice_key
        d.agent.send_notif(d_peer, encode_notice("x-victim", 0, 1, "some-other-reader", "n9",
                                                 key))
        d.agent.send_notif(d_peer, encode_notice("x-victim", 0, 1, d.engine_id + "x", "n9", key))
        d.agent.send_notif(d_peer, encode_notice("x-victim", 0, 1, d.engine_id, "n9"))  # no MAC
        d.agent.send_notif(d_peer, encode_notice("x-victim", 0, 1, d.engine_id, "n9",
                                                 notice_key("another-deployment")))
        d.agent.send_notif(d_peer, encode_notice("x-real", 0, 1, d.engine_id, "n1", key))
        (believed,) = _wait_notices(p, 1)
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline and p.notices_refused < 7:
            assert p.read_notices() == []
            time.sleep(0.005)
    assert (believed.transfer_id, believed.reader) == ("x-real", d.engine_id)
    assert p.notices_refused == 7


def test_a_notice_from_an_agent_that_never_handshook_is_not_believed(pd) -> None:
    """Sealed with the deployment's key and sent by the agent it names, but that agent never
    handshook with the instance: the rank passes it on, the service does not believe it."""
    _, p, _, d = pd
    _read(p, d, "warm", nonce="n0")  # D handshakes with P
    assert len(_wait_notices(p, 1)) == 1
    stranger_id = f"stranger{os.getpid()}"
    with TransferAgent(agent_name(stranger_id, 0)) as stranger:
        peer = stranger.add_peer(p.agent.metadata())
        stranger.send_notif(peer, encode_notice("x-victim", 0, 1, stranger_id, "n9",
                                                d.notice_key))
        d.agent.send_notif(agent_name(p.engine_id, 0),
                           encode_notice("x-real", 0, 1, d.engine_id, "n1", d.notice_key))
        got: list = []
        deadline = time.monotonic() + WAIT_S
        while len(got) < 2:  # what the rank passes on: both (MAC ok, each speaks for itself)
            assert time.monotonic() < deadline, got
            got.extend(p.ep.read_notices())
            time.sleep(0.005)
    assert sorted(n.transfer_id for n in got) == ["x-real", "x-victim"]
    believed = [n for n in got if p.service.believes(n)]
    assert [(n.transfer_id, n.reader) for n in believed] == [("x-real", d.engine_id)]
    assert p.service.counters["notices_refused"] == 1
    p.service.hold("r-victim", "x-victim")  # the stranger's notice frees nothing
    assert p.service.notice("x-victim", 0, 0, 1, stranger_id, "n9") is None
    assert p.service.holds("r-victim")


def test_confirmation_vouches_only_for_the_read_that_completed(pd) -> None:
    _, p, _, d = pd
    p.ledger.set("done", LeaseState.READ, d.engine_id, "n-read")
    p.ledger.set("held", LeaseState.HELD)
    assert confirm_lease(p.address, "held", d.engine_id, 3.0, "any", SECRET)[0]
    assert confirm_lease(p.address, "done", d.engine_id, 3.0, "n-read", SECRET) == (True, "held")
    ok, why = confirm_lease(p.address, "done", d.engine_id, 3.0, "n-replay", SECRET)
    assert not ok and "replayed" in why
    ok, why = confirm_lease(p.address, "done", "another-reader", 3.0, "n-read", SECRET)
    assert not ok and "another reader" in why
    ok, why = confirm_lease(p.address, "done", d.engine_id, 3.0, "n-read", None)  # unsigned
    assert not ok and "could not be asked" in why


def test_a_decode_rank_hands_its_metadata_to_nobody() -> None:
    _, d = _endpoint("d", 4, serves_reads=False)
    try:
        with pytest.raises(SideChannelRemoteError, match="not readable") as info:
            _call(d, _handshake(d))  # even authenticated
        assert "ranks" not in info.value.response
    finally:
        d.close()


def test_handshake_answer_with_another_agents_metadata_is_refused(pd) -> None:
    """A peer that relays some other P's handshake answer as its own gets no READ posted."""
    _, p, _, d = pd
    real = _call(p, _handshake(d))
    relayed = {**real, "engine_id": "relay",  # every id rewritten; the metadata is P's
               "ranks": [{**r, "engine_id": "relay"} for r in real["ranks"]]}
    relay = SideChannelServer("127.0.0.1", 0, lambda msg: relayed, secret=SECRET).start()
    try:
        address = f"127.0.0.1:{relay.port}"
        params = TransferParams("r", "relay", address, 1, P_IDS, N, "n-1", transfer_id="x-r")
        peers = d.service.peer("relay", address, 1).result(timeout=WAIT_S)
        rx = KVReceiver(d.ep, handshake_timeout_s=5.0, transfer_timeout_s=WAIT_S)
        try:
            rx.start(ReadJob("r", params, tuple(tuple(g) for g in D_IDS), "n", peers))
            deadline = time.monotonic() + WAIT_S
            while not (results := rx.poll()):
                assert time.monotonic() < deadline
                time.sleep(0.002)
        finally:
            rx.close()
        (res,) = results
        assert not res.ok and "metadata of agent" in (res.error or "")
    finally:
        relay.stop()
