"""Never silently slow (`disagg/transport.py` + the receiver's calibration hook).

Pure parts: the calibration READ is a prefix of the job's own plan; a pair's topology from both
sides' facts; the floor, the warning naming cause and fix, the refusal. Over real NIXL (UCX
loopback, one process, the receiver tests' two ranks): the first job to a new P calibrates the
pair and every result names its transport and GB/s, the READ still copies exactly the
request's state; below the floor D warns and still transfers; with `require_fast` the job
fails with the refusal and the next job to that P is refused before any handshake.
"""

from __future__ import annotations

import logging
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "cache"))

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from cache_testlib import random_state, read_state, write_state  # noqa: E402
from test_receiver import D_IDS, MODEL, P_IDS, N, Rank, _results  # noqa: E402

from hybridpd.cache.geometry import CacheGeometry  # noqa: E402
from hybridpd.disagg.plan import ReadPlan  # noqa: E402
from hybridpd.disagg.receiver import KVReceiver  # noqa: E402
from hybridpd.disagg.transport import (  # noqa: E402
    GPU_FLOOR_GBPS,
    PeerFacts,
    Topology,
    TransportPolicy,
    Verdict,
    assess,
    calibration_slice,
    topology,
)

GEO = CacheGeometry.build(MODEL, kernel_block_size=2)
CPU = PeerFacts("host-a", "cpu", None, "tcp,cma")


def _plan(lengths: list[int]) -> ReadPlan:
    n = len(lengths)
    length = np.asarray(lengths, dtype=np.int64)
    return ReadPlan(0, np.arange(n, dtype=np.int64) * 1000, np.arange(n, dtype=np.int64) * 10**6,
                    length)


def test_calibration_is_a_prefix_of_the_plan_cut_at_the_budget():
    plan = _plan([300, 500, 700])
    piece = calibration_slice(plan, max_bytes=600)
    assert piece.length.tolist() == [300, 300] and piece.total_bytes == 600
    assert piece.src_offset.tolist() == [0, 1000] and piece.dst_offset.tolist() == [0, 10**6]
    whole = calibration_slice(plan, max_bytes=10**9)
    assert whole.length.tolist() == [300, 500, 700]
    assert calibration_slice(plan, max_bytes=300).length.tolist() == [300]


def test_topology_from_both_sides():
    gpu = PeerFacts("h", "cuda", "GPU-1", None)
    assert topology(gpu, PeerFacts("h", "cuda", "GPU-1", None)) is Topology.SAME_GPU
    assert topology(gpu, PeerFacts("h", "cuda", "GPU-2", None)) is Topology.SAME_HOST_GPUS
    assert topology(gpu, PeerFacts("g", "cuda", "GPU-1", None)) is Topology.CROSS_HOST_GPUS
    assert topology(gpu, PeerFacts("h", "cpu", None, None)) is Topology.SAME_HOST_CPU
    assert topology(CPU, None) is None
    assert PeerFacts.from_dict({"host_id": 3}) is None and PeerFacts.from_dict("x") is None
    assert PeerFacts.from_dict(gpu.to_dict()) == gpu


def test_floor_warning_names_cause_and_fix_and_refusal_is_opt_in():
    gpu_a, gpu_b = PeerFacts("h", "cuda", "GPU-1", None), PeerFacts("h", "cuda", "GPU-1", None)
    nbytes = 8 * 2**20
    slow_s = nbytes / (0.44 * 1e9)  # the 0.44 GB/s of two processes on one H200 (issue 9)
    pair = assess(TransportPolicy(), "p/rank0", gpu_a, gpu_b, nbytes, slow_s)
    assert pair.verdict is Verdict.SLOW and pair.floor_gbps == GPU_FLOOR_GBPS
    assert pair.topology is Topology.SAME_GPU and abs(pair.calibrated_gbps - 0.44) < 1e-9
    assert "share one GPU" in pair.message and "--gpus" in pair.message
    fast = assess(TransportPolicy(), "p/rank0", gpu_a, gpu_b, nbytes, nbytes / 200e9)
    assert fast.verdict is Verdict.FAST and fast.message is None
    refused = assess(TransportPolicy(require_fast=True), "p/rank0", gpu_a,
                     PeerFacts("h", "cuda", "GPU-2", None), nbytes, slow_s)
    assert refused.verdict is Verdict.REFUSED and "cuda_ipc" in refused.message
    assert "--on-transfer-failure" in refused.message
    # CPU pools have no default floor; an explicit one applies to them too
    assert assess(TransportPolicy(), "p", CPU, CPU, 10, 1.0).verdict is Verdict.FAST
    assert assess(TransportPolicy(floor_gbps=1.0), "p", CPU, CPU, 10, 1.0).verdict is Verdict.SLOW


@pytest.fixture
def ranks():
    p, d = Rank("p", 1), Rank("d", 2)
    try:
        yield p, d
    finally:
        d.ep.close()
        p.ep.close()


def test_first_job_calibrates_the_pair_and_the_read_stays_exact(ranks, caplog):
    p, d = ranks
    state = random_state(MODEL, N, GEO.kv_dtype, seed=5)
    write_state(p.pool, state, P_IDS, N)
    rx = KVReceiver(d.ep, 5.0, 10.0, TransportPolicy())
    try:
        with caplog.at_level(logging.INFO, logger="hybridpd.transfer"):
            rx.start(p.job("a"))
            (a,) = _results(rx, {"a"})["a"]
            rx.start(p.job("b"))
            (b,) = _results(rx, {"b"})["b"]
    finally:
        rx.close()
    assert a.ok and b.ok
    assert a.pair is not None and a.pair is b.pair  # calibrated once, reported every time
    assert a.pair.transport.startswith("ucx:") and a.pair.calibrated_gbps > 0
    assert a.pair.topology is Topology.SAME_HOST_CPU and a.pair.verdict is Verdict.FAST
    assert 0 < a.pair.calibration_bytes <= a.nbytes
    lines = [r.getMessage() for r in caplog.records if "kv handshake with" in r.getMessage()]
    assert len(lines) == 1 and "GB/s" in lines[0] and a.pair.transport in lines[0]
    got = read_state(d.pool, state, D_IDS, N)
    for part in ("kv", "conv", "ssm"):
        for layer, want in getattr(state, part).items():
            assert torch.equal(getattr(got, part)[layer], want), (part, layer)


def test_below_the_floor_warns_and_still_transfers(ranks, caplog):
    p, d = ranks
    rx = KVReceiver(d.ep, 5.0, 10.0, TransportPolicy(floor_gbps=1e9))
    try:
        with caplog.at_level(logging.INFO, logger="hybridpd.transfer"):
            rx.start(p.job("a"))
            (a,) = _results(rx, {"a"})["a"]
    finally:
        rx.close()
    assert a.ok and a.pair.verdict is Verdict.SLOW
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("slow" in w and "Fix:" in w for w in warnings), warnings


def test_require_fast_refuses_the_pair_before_any_second_load(ranks):
    p, d = ranks
    rx = KVReceiver(d.ep, 5.0, 10.0, TransportPolicy(floor_gbps=1e9, require_fast=True))
    try:
        rx.start(p.job("a"))
        (a,) = _results(rx, {"a"})["a"]
        rx.start(p.job("b"))
        (b,) = _results(rx, {"b"})["b"]
    finally:
        rx.close()
    assert not a.ok and "Refusing the pair" in a.error and "--kv-require-fast-transport" in a.error
    assert not b.ok and "Refusing the pair" in b.error
    assert rx.loads == 1  # the second job was refused from the pair's record alone
