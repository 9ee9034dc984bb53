"""The same-GPU transport (disagg/cuda_ipc.py): the export record, range copies, the READ
handle's states and P's notice — on CPU with a stand-in for the mapping; on a GPU (`gpu`) a
real export mapped by a second process and copied by the device."""

from __future__ import annotations

import multiprocessing as mp
from dataclasses import replace

import numpy as np
import pytest
import torch

from hybridpd.disagg.cuda_ipc import (
    IpcExport,
    IpcReads,
    copy_ranges,
    export_buffer,
    open_export,
)
from hybridpd.disagg.endpoint import RankAdvert
from hybridpd.disagg.errors import TransferError
from hybridpd.disagg.nixl_agent import XferState
from hybridpd.disagg.params import PeerGeometry
from hybridpd.disagg.plan import ReadPlan

EXPORT = IpcExport(device=0, handle=b"\x01" * 64, storage_bytes=4096, storage_offset=512,
                   ref_handle=b"/torch_ref", ref_offset=8, event_handle=b"\x02" * 64,
                   event_sync=True, buffer_offset=1024, nbytes=2048)


def _plan(src: list[int], dst: list[int], length: list[int]) -> ReadPlan:
    return ReadPlan(0, np.array(src, np.int64), np.array(dst, np.int64),
                    np.array(length, np.int64))


def test_export_record_round_trips_and_refuses_garbage() -> None:
    assert IpcExport.from_dict(EXPORT.to_dict()) == EXPORT
    assert IpcExport.from_dict(None) is None
    bad = [
        [],
        {**EXPORT.to_dict(), "nbytes": -1},
        {**EXPORT.to_dict(), "device": True},
        {**EXPORT.to_dict(), "event_sync": "yes"},
        {**EXPORT.to_dict(), "buffer_offset": 3000},  # the pool would overrun its storage
        {k: v for k, v in EXPORT.to_dict().items() if k != "storage_bytes"},
    ]
    for raw in bad:
        with pytest.raises(ValueError):
            IpcExport.from_dict(raw)
    assert export_buffer(torch.zeros(16, dtype=torch.uint8)) is None  # a CPU pool: no export


def test_rank_advert_carries_the_export_through_the_handshake() -> None:
    from hybridpd.cache.geometry import CacheGeometry
    from hybridpd.config import ModelConfig

    cfg = ModelConfig.from_hf_dict({"model_type": "nemotron_h", "hybrid_override_pattern": "M*",
                                    "hidden_size": 32, "num_attention_heads": 2,
                                    "num_key_value_heads": 1, "head_dim": 16,
                                    "mamba_num_heads": 2, "mamba_head_dim": 8,
                                    "ssm_state_size": 8, "n_groups": 1, "vocab_size": 32})
    geo = PeerGeometry.from_cache(CacheGeometry.build(cfg, kernel_block_size=4), 8, 4096)
    plain = RankAdvert("e1", 0, "c" * 64, geo, 0, "cuda", b"meta", None)
    for advert in (plain, replace(plain, ipc=EXPORT)):
        back = RankAdvert.from_answer(advert.handshake_answer())
        assert back.ipc == advert.ipc and back.agent_metadata == b"meta"
    broken = {**replace(plain, ipc=EXPORT).handshake_answer(), "ipc": {"device": -3}}
    with pytest.raises(ValueError):
        RankAdvert.from_answer(broken)


def test_copy_ranges_moves_exactly_the_planned_bytes() -> None:
    g = torch.Generator().manual_seed(3)
    src = torch.randint(0, 256, (4096,), dtype=torch.uint8, generator=g)
    dst = torch.zeros(4096, dtype=torch.uint8)
    plan = _plan([0, 1000, 3000], [2048, 16, 512], [100, 640, 1096])
    copy_ranges(src, dst, plan)
    want = np.zeros(4096, np.uint8)
    for s, d, n in zip(plan.src_offset, plan.dst_offset, plan.length):
        want[d:d + n] = src.numpy()[s:s + n]
    assert np.array_equal(dst.numpy(), want)


def test_long_ranges_are_cut_into_pieces_that_cover_them_exactly() -> None:
    from hybridpd.disagg import cuda_ipc

    plan = _plan([0, 500, 900], [1000, 2000, 2500], [250, 40, 0])
    src, dst, length = cuda_ipc._pieces(plan, 100)
    assert length.tolist() == [100, 100, 50, 40, 0]
    assert src.tolist() == [0, 100, 200, 500, 900]
    assert dst.tolist() == [1000, 1100, 1200, 2000, 2500]
    same = cuda_ipc._pieces(plan, 1000)  # nothing longer than a piece: the plan as is
    assert all(np.array_equal(a, b) for a, b in zip(same, (plan.src_offset, plan.dst_offset,
                                                         plan.length)))


class _Notices:
    def __init__(self, fail: bool = False) -> None:
        self.sent: list[tuple[str, bytes]] = []
        self.fail = fail

    def __call__(self, peer: str, msg: bytes) -> None:
        if self.fail:
            raise TransferError("peer gone")
        self.sent.append((peer, msg))


def _reads(notices: _Notices, pool: torch.Tensor) -> tuple[IpcReads, list[IpcExport]]:
    opened: list[IpcExport] = []

    def opener(exp: IpcExport) -> torch.Tensor:
        opened.append(exp)
        return pool[: exp.nbytes]

    return IpcReads(torch.zeros(2048, dtype=torch.uint8), notices, opener), opened


def test_a_read_notifies_p_once_after_the_copies_and_maps_each_export_once() -> None:
    notices = _Notices()
    p_pool = torch.arange(2048, dtype=torch.int64).to(torch.uint8)
    reads, opened = _reads(notices, p_pool)
    handle = reads.read("e1-rank0", EXPORT, _plan([10], [20], [30]), b"notice")
    assert torch.equal(reads.dst[20:50], p_pool[10:40])
    assert reads.poll(handle) is XferState.DONE and reads.poll(handle) is XferState.DONE
    assert notices.sent == [("e1-rank0", b"notice")]  # once, after the copies landed
    reads.read("e1-rank0", EXPORT, _plan([0], [0], [4]), b"n2")
    assert opened == [EXPORT]  # mapped once per export
    moved = replace(EXPORT, handle=b"\x03" * 64)  # P restarted: a new allocation
    reads.read("e1-rank0", moved, _plan([0], [0], [4]), b"n3")
    reads.forget("e1-rank0")
    reads.read("e1-rank0", moved, _plan([0], [0], [4]), b"n4")
    assert opened == [EXPORT, moved, moved]
    assert reads.wait(handle, 1.0) is XferState.DONE
    reads.release(handle)


def test_a_notice_that_cannot_be_sent_fails_the_read() -> None:
    reads, _ = _reads(_Notices(fail=True), torch.zeros(2048, dtype=torch.uint8))
    handle = reads.read("e1-rank0", EXPORT, _plan([0], [0], [8]), b"notice")
    assert reads.poll(handle) is XferState.FAILED
    assert reads.poll(handle) is XferState.FAILED


def test_out_of_bounds_plans_and_bad_mappings_are_refused() -> None:
    notices = _Notices()
    reads, _ = _reads(notices, torch.zeros(4096, dtype=torch.uint8))
    for plan in (_plan([2040], [0], [16]), _plan([0], [2040], [16]), _plan([-1], [0], [4])):
        with pytest.raises(TransferError):
            reads.read("e1-rank0", EXPORT, plan, b"notice")
    short = IpcReads(torch.zeros(64, dtype=torch.uint8), notices,
                     lambda exp: torch.zeros(10, dtype=torch.uint8))
    with pytest.raises(TransferError, match="bytes"):
        short.read("e1-rank0", EXPORT, _plan([0], [0], [4]), b"notice")

    def broken(exp: IpcExport) -> torch.Tensor:
        raise RuntimeError("invalid device context")

    with pytest.raises(TransferError, match="CUDA IPC"):
        IpcReads(torch.zeros(64, dtype=torch.uint8), notices, broken).read(
            "e1-rank0", EXPORT, _plan([0], [0], [4]), b"notice")
    assert notices.sent == []


def _map_and_copy(raw: dict, plan_arrays: tuple, out: mp.Queue) -> None:
    exp = IpcExport.from_dict(raw)
    src = open_export(exp)
    dst = torch.zeros(exp.nbytes, dtype=torch.uint8, device=src.device)
    sent: list = []
    reads = IpcReads(dst, lambda peer, msg: sent.append(msg))
    handle = reads.read("p", exp, ReadPlan(0, *plan_arrays), b"done")
    assert reads.wait(handle, 10.0) is XferState.DONE and sent == [b"done"]
    out.put(dst.cpu().numpy().tobytes())


@pytest.mark.gpu
def test_a_second_process_on_the_gpu_reads_the_exported_pool() -> None:
    g = torch.Generator().manual_seed(11)
    storage = torch.randint(0, 256, (1 << 20,), dtype=torch.uint8, generator=g).cuda()
    pool = storage[4096:4096 + (1 << 19)]  # a pool inside a bigger allocation
    plan = (np.array([0, 65536, 300000], np.int64), np.array([1024, 200000, 400000], np.int64),
            np.array([4096, 70000, 100000], np.int64))
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=_map_and_copy, args=(export_buffer(pool).to_dict(), plan, out))
    proc.start()
    got = np.frombuffer(out.get(timeout=120), np.uint8)
    proc.join(timeout=60)
    assert proc.exitcode == 0
    want = np.zeros(pool.numel(), np.uint8)
    host = pool.cpu().numpy()
    for s, d, n in zip(*plan):
        want[d:d + n] = host[s:s + n]
    assert np.array_equal(got, want)
