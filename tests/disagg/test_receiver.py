"""KVReceiver over real NIXL (UCX loopback, one process): results, cancel, release, peers.

Two `KVEndpoint`s on small pools of a tiny hybrid model stand for a P and a D rank (P's behind
its instance's side channel, which rank 0's transfer service opens). The tests
prove the receiver's contract (see its module docstring): a READ copies exactly the request's
state; `cancel` never blocks, even behind a frozen P; every job is reported exactly once, and
only when nothing can still write its blocks (release failures hold the result back);
concurrent jobs load a peer's metadata once. (The handshakes that give the jobs their peer
records are D's transfer service's: tests/disagg/test_transfer_service.py.)
"""

from __future__ import annotations

import itertools
import os
import sys
import threading
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "cache"))

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from cache_testlib import (  # noqa: E402
    TINY,
    TINY_PATTERN,
    model,
    owned_mask,
    random_bytes,
    random_state,
    read_state,
    write_state,
)
from instance_testlib import Instance  # noqa: E402

from hybridpd.cache.geometry import CacheGeometry  # noqa: E402
from hybridpd.cache.tensors import PoolTensors  # noqa: E402
from hybridpd.disagg.endpoint import KVEndpoint  # noqa: E402
from hybridpd.disagg.errors import TransferError  # noqa: E402
from hybridpd.disagg.nixl_agent import XferState  # noqa: E402
from hybridpd.disagg.params import TransferParams  # noqa: E402
from hybridpd.disagg.receiver import CANCELLED, KVReceiver, ReadJob, ReadResult  # noqa: E402

torch.set_num_threads(1)

MODEL = model(TINY, TINY_PATTERN)
GEO = CacheGeometry.build(MODEL, kernel_block_size=2)  # block_tokens 8; 1 attention, 3 Mamba
NUM_BLOCKS = 8
N = 11  # tokens of state: 2 attention blocks
P_IDS = [[1, 2], [3], [4], [5]]  # attention group, then one block per Mamba group
D_IDS = [[6, 2], [1], [3], [7]]
WAIT_S = 10.0
_names = itertools.count()


class Rank:
    """One rank's pool (random bytes) and its endpoint, behind its instance's side channel."""

    def __init__(self, role: str, seed: int) -> None:
        self.pool = PoolTensors(GEO, NUM_BLOCKS)
        random_bytes(self.pool, seed)
        self.instance = Instance(KVEndpoint(f"{role}{next(_names)}-{os.getpid()}", GEO,
                                            NUM_BLOCKS, self.pool.buffer, "tiny"))
        self.ep = self.instance.ep

    def job(self, rid: str, d_ids: list[list[int]] = D_IDS) -> ReadJob:
        """A job for this P rank's hand-off, with the record a handshake answers for it."""
        params = TransferParams(rid, self.ep.engine_id, self.instance.address, 1, P_IDS, N,
                                "n-1", transfer_id=f"x-{rid}")
        return ReadJob(rid, params, tuple(tuple(g) for g in d_ids), peers=(self.ep.advert(),))

    def close(self) -> None:
        self.instance.close()


@pytest.fixture
def ranks():
    p, d = Rank("p", 1), Rank("d", 2)
    try:
        yield p, d
    finally:
        d.close()
        p.close()


def _results(rx: KVReceiver, rids: set[str], timeout_s: float = WAIT_S,
             check: object = None) -> dict[str, list[ReadResult]]:
    """Poll until every id in `rids` has a result; then a few more polls catch duplicates."""
    got: dict[str, list[ReadResult]] = {}
    deadline = time.monotonic() + timeout_s
    while not rids <= got.keys():
        assert time.monotonic() < deadline, f"no result for {rids - got.keys()}"
        for res in rx.poll():
            if callable(check):
                check(res)
            got.setdefault(res.request_id, []).append(res)
        time.sleep(0.002)
    for _ in range(20):
        for res in rx.poll():
            got.setdefault(res.request_id, []).append(res)
        time.sleep(0.002)
    return got


def _notices(ep: KVEndpoint) -> list:
    """What P heard from D (the completion notification travels after the data)."""
    deadline = time.monotonic() + WAIT_S
    while not (got := ep.read_notices()):
        assert time.monotonic() < deadline, "P never got the READ's notification"
        time.sleep(0.005)
    return got


def test_read_copies_exactly_the_requests_state(ranks):
    p, d = ranks
    state = random_state(MODEL, N, GEO.kv_dtype, seed=3)
    write_state(p.pool, state, P_IDS, N)
    before = d.pool.buffer.numpy().reshape(-1).copy()
    mask = owned_mask(GEO, NUM_BLOCKS, D_IDS, N).astype(bool)
    rx = KVReceiver(d.ep, handshake_timeout_s=5.0, transfer_timeout_s=WAIT_S)
    try:
        rx.start(p.job("r1"))
        (res,) = _results(rx, {"r1"})["r1"]
        assert res.ok and res.error is None and res.nbytes == int(mask.sum()) > 0
        assert not rx.busy
        notices = _notices(p.ep)
        assert [(n.transfer_id, n.d_rank, n.d_tp) for n in notices] == [("x-r1", 0, 1)]
    finally:
        rx.close()
    got = read_state(d.pool, state, D_IDS, N)
    for part in ("kv", "conv", "ssm"):
        for layer, want in getattr(state, part).items():
            assert torch.equal(getattr(got, part)[layer], want), (part, layer)
    after = d.pool.buffer.numpy().reshape(-1)
    assert np.array_equal(after[~mask], before[~mask]), "bytes outside the request changed"


def test_cancel_never_blocks_and_reports_only_after_the_post(ranks, monkeypatch):
    p, d = ranks
    gate, entered = threading.Event(), threading.Event()
    real_add = d.ep.agent.add_peer

    def stuck_add(metadata: bytes) -> str:  # loading the peer hangs until the gate opens
        entered.set()
        assert gate.wait(WAIT_S)
        return real_add(metadata)

    monkeypatch.setattr(d.ep.agent, "add_peer", stuck_add)
    rx = KVReceiver(d.ep, handshake_timeout_s=WAIT_S, transfer_timeout_s=WAIT_S)
    post_ended: list[float] = []
    real_post = rx._post

    def timed_post(*args):
        try:
            return real_post(*args)
        finally:
            post_ended.append(time.monotonic())

    rx._post = timed_post

    def reported_after_post(res: ReadResult) -> None:
        assert post_ended, "result reported while the post could still write the blocks"

    try:
        rx.start(p.job("c1"))
        assert entered.wait(WAIT_S)
        rx.cancel("c1")
        assert not post_ended  # cancel returned while the post was still stuck
        assert rx.busy and rx.poll() == []  # not reported while the post could still write
        gate.set()  # now the post ends (cancelled: it posts no READ)
        (res,) = _results(rx, {"c1"}, check=reported_after_post)["c1"]
    finally:
        gate.set()
        rx.close()
    assert not res.ok and res.error == CANCELLED


def test_cancelling_one_job_keeps_the_others_result(ranks):
    p, d = ranks
    rx = KVReceiver(d.ep, handshake_timeout_s=5.0, transfer_timeout_s=WAIT_S)
    try:
        rx.start(p.job("a"))
        rx.start(p.job("b", [[4, 5], [6], [7], [2]]))
        rx.cancel("a")
        got = _results(rx, {"a", "b"})
        rx.cancel("b")  # already reported: changes nothing
        assert rx.poll() == [] and not rx.busy
    finally:
        rx.close()
    assert [r.error for r in got["a"]] == [CANCELLED]
    assert [(r.ok, r.error) for r in got["b"]] == [(True, None)]


def _fail_releases(agent, failures: list[int], calls: list) -> None:
    """The agent's next `failures[0]` releases raise; every release is recorded in `calls`."""
    real_release = agent.release

    def flaky_release(handle):
        calls.append(handle)
        if failures[0] > 0:
            failures[0] -= 1
            raise TransferError("simulated: cannot release")
        real_release(handle)

    agent.release = flaky_release


def test_failed_release_holds_the_result_until_a_release_succeeds(ranks, monkeypatch):
    p, d = ranks
    rx = KVReceiver(d.ep, handshake_timeout_s=5.0, transfer_timeout_s=WAIT_S)
    real_poll, failures, calls = d.ep.agent.poll, [3], []
    _fail_releases(d.ep.agent, failures, calls)
    # the READ stays in flight (it could still write our blocks) until it is released: over
    # loopback a real READ may finish before `cancel`, and a DONE handle rightly reports at once
    monkeypatch.setattr(d.ep.agent, "poll", lambda handle: XferState.PENDING)

    quiet_polls = 0

    def released_first(res: ReadResult) -> None:
        assert failures[0] == 0, "result reported while a release was still failing"

    try:
        rx.start(p.job("q"))
        deadline = time.monotonic() + WAIT_S
        while not rx._posting["q"].future.done():  # posted, not yet collected by poll
            assert time.monotonic() < deadline
            time.sleep(0.002)
        rx.cancel("q")
        while failures[0] > 0:
            assert rx.poll() == [] and rx.busy
            quiet_polls += 1
        (res,) = _results(rx, {"q"}, check=released_first)["q"]
    finally:
        rx.close()
    assert res.error == CANCELLED and quiet_polls >= 1
    with pytest.raises(TransferError, match="already released"):
        real_poll(calls[-1])


def test_finished_read_reports_while_its_failed_release_is_retried(ranks):
    p, d = ranks
    rx = KVReceiver(d.ep, handshake_timeout_s=5.0, transfer_timeout_s=WAIT_S)
    failures, calls = [3], []
    _fail_releases(d.ep.agent, failures, calls)

    try:
        rx.start(p.job("f"))
        (res,) = _results(rx, {"f"})["f"]  # DONE: nothing can write the blocks any more
        deadline = time.monotonic() + WAIT_S
        while failures[0] > 0:  # the handle stays quarantined, retried on every poll
            assert time.monotonic() < deadline
            assert rx.poll() == [] and not rx.busy
    finally:
        rx.close()
    assert res.ok and len(calls) == 4  # three failed releases, then the one that succeeded


def test_timed_out_read_is_released_then_reported(ranks, monkeypatch):
    p, d = ranks
    rx = KVReceiver(d.ep, handshake_timeout_s=5.0, transfer_timeout_s=0.3)
    handles = []
    real_poll = d.ep.agent.poll

    def stuck(handle):
        handles.append(handle)
        real_poll(handle)  # raises once released
        return XferState.PENDING

    monkeypatch.setattr(d.ep.agent, "poll", stuck)
    try:
        t0 = time.monotonic()
        rx.start(p.job("t"))
        (res,) = _results(rx, {"t"})["t"]
    finally:
        rx.close()
    assert not res.ok and "timed out" in res.error and time.monotonic() - t0 >= 0.3
    with pytest.raises(TransferError, match="already released"):
        real_poll(handles[0])


def test_concurrent_jobs_load_a_new_peer_once(ranks):
    p, d = ranks
    rx = KVReceiver(d.ep, handshake_timeout_s=5.0, transfer_timeout_s=WAIT_S)
    blocks = [D_IDS, [[4, 5], [6], [7], [2]], [[3, 4], [5], [6], [7]]]
    try:
        for i, ids in enumerate(blocks):
            rx.start(p.job(f"s{i}", ids))
        got = _results(rx, {f"s{i}" for i in range(len(blocks))})
    finally:
        rx.close()
    assert rx.loads == 1
    assert all([r.ok for r in got[f"s{i}"]] == [True] for i in range(len(blocks)))
