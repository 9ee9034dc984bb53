"""TransferAgent with real NIXL over UCX loopback, P in a spawned process, D in this one.

P registers a patterned uint8 tensor and answers on a real side channel (metadata exchange,
notifications received so far, notify-back). D reads scattered ranges from P and checks every
byte of its own buffer. Needs NIXL (`nixl`, `nixl_cu13` or `nixl_cu12`); skipped without it.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import multiprocessing as mp  # noqa: E402
import signal  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from hybridpd.disagg.errors import TransferError, TransferTimeout  # noqa: E402
from hybridpd.disagg.nixl_agent import (  # noqa: E402
    RegisteredRegion,
    TransferAgent,
    XferState,
    load_nixl_bindings,
)
from hybridpd.disagg.side_channel import (  # noqa: E402
    SideChannelServer,
    decode_bytes,
    encode_bytes,
    side_channel_call,
)

torch.set_num_threads(1)

try:
    load_nixl_bindings()
except TransferError:
    pytest.skip("NIXL is not installed", allow_module_level=True)

HOST = "127.0.0.1"
P_BYTES = 4 << 20
D_BYTES = 4 << 20
SENTINEL = 0xEE
DEADLINE_S = 5.0


def _pattern(nbytes: int, seed: int) -> torch.Tensor:
    """P's content: position-dependent bytes, so a byte read from the wrong place shows."""
    idx = torch.arange(nbytes, dtype=torch.int64)  # (nbytes,)
    return ((idx * 131 + (idx >> 8) * 7 + seed) % 251).to(torch.uint8)


# ---- the P process ------------------------------------------------------------------------


def _peer_main(name: str, seed: int, port_q: Any, stop_conn: Any) -> None:
    torch.set_num_threads(1)
    agent = TransferAgent(name)
    data = _pattern(P_BYTES, seed)  # (P_BYTES,) uint8, registered below
    region = agent.register(data)
    received: list[tuple[str, bytes]] = []
    lock = threading.Lock()

    def handler(req: dict[str, Any]) -> dict[str, Any]:
        if req["type"] == "hello":
            return {"metadata": encode_bytes(agent.metadata()), "base_addr": region.base_addr,
                    "nbytes": region.nbytes, "device_id": region.device_id}
        if req["type"] == "add_peer":
            return {"name": agent.add_peer(decode_bytes(req["metadata"]))}
        if req["type"] == "notify":
            agent.send_notif(req["peer"], decode_bytes(req["msg"]))
            return {}
        if req["type"] == "notifs":
            with lock:
                for peer, msgs in agent.get_notifs().items():
                    received.extend((peer, m) for m in msgs)
                return {"notifs": [[p, encode_bytes(m)] for p, m in received]}
        raise ValueError(f"unknown request {req['type']!r}")

    server = SideChannelServer(HOST, 0, handler).start()
    port_q.put(server.port)
    stop_conn.poll(120)  # returns when the parent closes its end (or after 120 s)
    server.stop()
    agent.close()


@dataclass
class Peer:
    name: str
    seed: int
    port: int
    proc: Any
    stop_conn: Any
    info: dict[str, Any]

    def call(self, msg: dict[str, Any]) -> dict[str, Any]:
        return side_channel_call(HOST, self.port, msg, DEADLINE_S)

    def notifs(self) -> list[tuple[str, bytes]]:
        return [(p, decode_bytes(m)) for p, m in self.call({"type": "notifs"})["notifs"]]

    def wait_notif(self, peer: str, msg: bytes) -> list[tuple[str, bytes]]:
        deadline = time.monotonic() + DEADLINE_S
        while time.monotonic() < deadline:
            got = self.notifs()
            if (peer, msg) in got:
                return got
            time.sleep(0.02)
        raise AssertionError(f"P never got notification {msg!r} from {peer!r}")

    def shutdown(self) -> None:
        self.stop_conn.close()  # a pipe, not an Event: safe even if the child was killed
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)


def _start_peer(name: str, seed: int) -> Peer:
    ctx = mp.get_context("spawn")
    port_q = ctx.Queue()
    child_conn, parent_conn = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_peer_main, args=(name, seed, port_q, child_conn), daemon=True)
    proc.start()
    child_conn.close()
    port = port_q.get(timeout=60)
    peer = Peer(name, seed, port, proc, parent_conn, {})
    peer.info = peer.call({"type": "hello"})
    return peer


# ---- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def peer() -> Iterator[Peer]:
    p = _start_peer("P-main", seed=5)
    yield p
    p.shutdown()


@dataclass
class Local:
    agent: TransferAgent
    buf: torch.Tensor
    region: RegisteredRegion


@pytest.fixture(scope="module")
def local(peer: Peer) -> Iterator[Local]:
    agent = TransferAgent("D-test")
    buf = torch.full((D_BYTES,), SENTINEL, dtype=torch.uint8)  # (D_BYTES,) read target
    region = agent.register(buf)
    assert agent.add_peer(decode_bytes(peer.info["metadata"])) == peer.name
    yield Local(agent, buf, region)
    agent.close()


def _read(loc: Local, peer: Peer, lo: Any, ro: Any, ln: Any, notif: bytes, **kw: Any):
    info = peer.info
    return loc.agent.read(
        peer.name, loc.region, lo, info["base_addr"], info["device_id"], ro, ln, notif, **kw
    )


def _expected(peer: Peer, lo: np.ndarray, ro: np.ndarray, ln: np.ndarray) -> np.ndarray:
    src = _pattern(P_BYTES, peer.seed).numpy()
    out = np.full(D_BYTES, SENTINEL, dtype=np.uint8)
    for a, b, n in zip(lo.tolist(), ro.tolist(), ln.tolist()):
        out[a : a + n] = src[b : b + n]
    return out


def _scattered_ranges(count: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Non-overlapping ranges of different lengths, gaps on both sides, local order shuffled."""
    rng = np.random.default_rng(seed)
    ln = rng.integers(1, 40_000, size=count)
    ro = np.cumsum(rng.integers(1, 50_000, size=count) + np.concatenate([[0], ln[:-1]]))
    slots = rng.permutation(count)
    local_starts = np.cumsum(np.concatenate([[17], ln[slots][:-1] + 1000]))
    lo = np.empty(count, dtype=np.int64)
    lo[slots] = local_starts
    assert ro[-1] + ln[-1] <= P_BYTES and lo.max() + ln.max() <= D_BYTES
    return lo.astype(np.int64), ro.astype(np.int64), ln.astype(np.int64)


# ---- tests --------------------------------------------------------------------------------


def test_scattered_read_lands_exact_bytes_and_notifies(local: Local, peer: Peer) -> None:
    local.buf.fill_(SENTINEL)
    lo, ro, ln = _scattered_ranges(37, seed=1)
    handle = _read(local, peer, lo, ro, ln, b"req-scattered", remote_nbytes=P_BYTES)
    assert handle.num_descs == 37 and handle.nbytes == int(ln.sum())
    assert local.agent.wait(handle, DEADLINE_S) is XferState.DONE
    assert local.agent.poll(handle) is XferState.DONE
    local.agent.release(handle)
    np.testing.assert_array_equal(local.buf.numpy(), _expected(peer, lo, ro, ln))
    got = peer.wait_notif("D-test", b"req-scattered")
    assert got.count(("D-test", b"req-scattered")) == 1
    with pytest.raises(TransferError, match="released"):
        local.agent.poll(handle)


def test_ten_thousand_descriptors(local: Local, peer: Peer, record_property: Any) -> None:
    local.buf.fill_(SENTINEL)
    n = 10_000
    ro = np.arange(n, dtype=np.int64) * 384 + 64  # 128 B every 384 B of P
    lo = np.arange(n, dtype=np.int64)[::-1] * 256  # reversed order into D, with 128 B gaps
    ln = np.full(n, 128, dtype=np.int64)
    start = time.perf_counter()
    handle = _read(local, peer, lo, ro, ln, b"req-10k")
    posted = time.perf_counter()
    state = local.agent.wait(handle, DEADLINE_S)
    done = time.perf_counter()
    local.agent.release(handle)
    assert state is XferState.DONE
    np.testing.assert_array_equal(local.buf.numpy(), _expected(peer, lo, ro, ln))
    record_property("read_10k_post_ms", round((posted - start) * 1e3, 2))
    record_property("read_10k_total_ms", round((done - start) * 1e3, 2))
    print(f"\n10k-descriptor READ: post {(posted - start) * 1e3:.1f} ms, "
          f"total {(done - start) * 1e3:.1f} ms")
    peer.wait_notif("D-test", b"req-10k")


def test_notifications_both_ways(local: Local, peer: Peer) -> None:
    local.agent.send_notif(peer.name, b"standalone-d2p")
    peer.wait_notif("D-test", b"standalone-d2p")
    peer.call({"type": "add_peer", "metadata": encode_bytes(local.agent.metadata())})
    peer.call({"type": "notify", "peer": "D-test", "msg": encode_bytes(b"standalone-p2d")})
    deadline = time.monotonic() + DEADLINE_S
    got: list[bytes] = []
    while b"standalone-p2d" not in got and time.monotonic() < deadline:
        got += local.agent.get_notifs().get(peer.name, [])
        time.sleep(0.01)
    assert got == [b"standalone-p2d"]
    with pytest.raises(TransferError, match="unknown peer"):
        local.agent.send_notif("nobody", b"x")


def test_garbage_metadata_is_refused_and_agent_stays_usable(local: Local, peer: Peer) -> None:
    real = decode_bytes(peer.info["metadata"])
    for junk in (b"garbage", real[: len(real) // 2], bytes(64), b""):
        with pytest.raises(TransferError):
            local.agent.add_peer(junk)
    local.buf.fill_(SENTINEL)
    lo, ro, ln = np.array([100]), np.array([5000]), np.array([3000])
    handle = _read(local, peer, lo, ro, ln, b"after-garbage")
    assert local.agent.wait(handle, DEADLINE_S) is XferState.DONE
    local.agent.release(handle)
    np.testing.assert_array_equal(local.buf.numpy(), _expected(peer, lo, ro, ln))


@pytest.mark.parametrize(
    ("lo", "ro", "ln", "kw", "match"),
    [
        ([D_BYTES - 10], [0], [64], {}, "local range"),
        ([-1], [0], [64], {}, "local offsets"),
        ([0], [-5], [64], {}, "remote offsets"),
        ([0], [P_BYTES - 1], [64], {"remote_nbytes": P_BYTES}, "remote range"),
        ([0, 64], [0], [64, 64], {}, "differ in count"),
        ([0], [0], [0], {}, "lengths must be > 0"),
        ([], [], [], {}, "at least one"),
        ([0.5], [0], [64], {}, "integer"),
        ([0], [P_BYTES - 1], [64], {}, "failed"),  # caught by NIXL's own registration check
    ],
)
def test_bad_ranges_fail_before_any_transfer(
    local: Local, peer: Peer, lo: list, ro: list, ln: list, kw: dict, match: str
) -> None:
    local.buf.fill_(SENTINEL)
    with pytest.raises(TransferError, match=match):
        _read(local, peer, np.array(lo), np.array(ro), np.array(ln), b"bad-" + match.encode(), **kw)
    assert bool((local.buf == SENTINEL).all())
    handle = _read(local, peer, [0], [0], [8], b"after-" + match.encode())
    assert local.agent.wait(handle, DEADLINE_S) is XferState.DONE
    local.agent.release(handle)
    got = peer.wait_notif("D-test", b"after-" + match.encode())
    assert ("D-test", b"bad-" + match.encode()) not in got  # the refused READ never ran


def test_unknown_peer_and_closed_agent() -> None:
    with TransferAgent("D-lonely") as agent:
        buf = torch.zeros(4096, dtype=torch.uint8)  # (4096,)
        region = agent.register(buf)
        assert agent.register(buf) == region  # registered once
        assert region.nbytes == 4096 and region.base_addr == buf.data_ptr()
        with pytest.raises(TransferError, match="contiguous"):
            agent.register(torch.zeros(8, 8, dtype=torch.uint8).t())
        with pytest.raises(TransferError, match="unknown peer"):
            agent.read("ghost", region, [0], 0, 0, [0], [8], b"")
        agent.remove_peer("ghost")  # unknown: no-op
    agent.close()  # idempotent
    with pytest.raises(TransferError, match="closed"):
        agent.metadata()


@pytest.mark.timeout(120)  # a hang guard, not a speed bound
def test_killed_peer_fails_within_deadline(local: Local) -> None:
    doomed = _start_peer("P-doomed", seed=9)
    try:
        name = local.agent.add_peer(decode_bytes(doomed.info["metadata"]))
        handle = _read(local, doomed, [0], [0], [4096], b"before-kill")
        assert local.agent.wait(handle, DEADLINE_S) is XferState.DONE
        local.agent.release(handle)
        doomed.proc.kill()
        doomed.proc.join(10)
        outcome = _read_outcome(local, doomed, timeout_s=2.0)  # returns: wait has a deadline
        assert outcome in ("refused", "failed", "timeout")
        local.agent.remove_peer(name)
    finally:
        doomed.shutdown()


def _read_outcome(local: Local, peer: Peer, timeout_s: float) -> str:
    try:
        handle = _read(local, peer, [0], [0], [1 << 20], b"after-kill")
    except TransferError:
        return "refused"
    try:
        state = local.agent.wait(handle, timeout_s)
    except TransferTimeout:
        return "timeout"
    local.agent.release(handle)
    return "failed" if state is XferState.FAILED else "done"


@pytest.mark.timeout(120)  # a hang guard, not a speed bound
def test_frozen_peer_times_out_and_read_is_aborted(local: Local) -> None:
    frozen = _start_peer("P-frozen", seed=11)
    try:
        local.agent.add_peer(decode_bytes(frozen.info["metadata"]))
        os.kill(frozen.proc.pid, signal.SIGSTOP)  # alive, connected, never progresses
        handle = _read(local, frozen, [0], [0], [1 << 20], b"to-frozen")
        start = time.monotonic()
        with pytest.raises(TransferTimeout, match="aborted"):
            local.agent.wait(handle, 1.0)
        assert time.monotonic() - start >= 1.0  # it did not give up before its deadline
        with pytest.raises(TransferError, match="released"):
            local.agent.poll(handle)  # the aborted READ's handle is gone
    finally:
        frozen.proc.kill()
        frozen.proc.join(10)
        local.agent.remove_peer(frozen.name)
        frozen.shutdown()
