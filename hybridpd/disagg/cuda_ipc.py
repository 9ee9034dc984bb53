"""The same-GPU transport: READs between two processes on one device over CUDA IPC.

UCX has no same-device lane (two processes on one H200 read at 0.01–0.44 GB/s through it,
over TCP), so when P and D share a GPU, D maps P's pool buffer once through CUDA IPC and a
READ is the job's own `ReadPlan` applied by the device: its ranges cut into pieces on the
host and copied by one Triton launch on a side stream (`kernels/triton_copy.py`), an event
after it. Owns:

* `IpcExport`: what P advertises (only to authenticated handshakes, inside its `RankAdvert`):
  the CUDA IPC handle of the allocation holding its pool, where the pool starts in it, its
  size, and torch's producer-side reference counter (`_share_cuda_`), all JSON-safe;
  `export_buffer(buffer)` makes it (None for a CPU pool).
* `IpcReads`: D's side — `open` maps an export once per P rank (cached; closed by dropping the
  view), `read` posts a plan's copies and returns an `IpcHandle`; `poll` / `wait` / `release`
  have the NIXL agent's contract (`XferState`), so the receiver treats both alike. P's
  notification (what frees its blocks) is sent over NIXL (`send_notif`) only once the copies'
  event completed, so "P frees only after the data landed" holds as with a NIXL READ.

Knows nothing of the model, requests or the scheduler; imports torch's CUDA pieces lazily.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from hybridpd.disagg.errors import TransferError
from hybridpd.disagg.nixl_agent import XferState, _check_ranges
from hybridpd.disagg.plan import ReadPlan
from hybridpd.disagg.side_channel import decode_bytes, encode_bytes
from hybridpd.kernels.copy import copy_ranges_ref

TRANSPORT_LABEL = "cuda-ipc"
WAIT_POLL_S = 5e-5  # IPC copies take well under a millisecond


@dataclass(frozen=True)
class IpcExport:
    """P's pool as another process on its GPU maps it (torch's `_share_cuda_` fields)."""

    device: int
    handle: bytes  # cudaIpcMemHandle of the allocation holding the pool
    storage_bytes: int  # the storage's size
    storage_offset: int  # where the storage starts in the allocation
    ref_handle: bytes  # torch's producer-side reference counter (a shared-memory file)
    ref_offset: int
    event_handle: bytes
    event_sync: bool
    buffer_offset: int  # where the pool starts in the storage, bytes
    nbytes: int  # the pool's size, bytes

    def to_dict(self) -> dict[str, Any]:
        return {"device": self.device, "handle": encode_bytes(self.handle),
                "storage_bytes": self.storage_bytes, "storage_offset": self.storage_offset,
                "ref_handle": encode_bytes(self.ref_handle), "ref_offset": self.ref_offset,
                "event_handle": encode_bytes(self.event_handle), "event_sync": self.event_sync,
                "buffer_offset": self.buffer_offset, "nbytes": self.nbytes}

    @classmethod
    def from_dict(cls, raw: Any) -> IpcExport | None:
        """None when absent; ValueError on a malformed record (network input)."""
        if raw is None:
            return None
        if not isinstance(raw, dict):
            raise ValueError(f"ipc export must be an object, got {type(raw).__name__}")
        ints = ("device", "storage_bytes", "storage_offset", "ref_offset", "buffer_offset",
                "nbytes")
        for key in ints:
            v = raw.get(key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"ipc export field {key!r} must be a non-negative int")
        if not isinstance(raw.get("event_sync"), bool):
            raise ValueError("ipc export field 'event_sync' must be a bool")
        if raw["buffer_offset"] + raw["nbytes"] > raw["storage_bytes"]:
            raise ValueError("ipc export: the pool does not fit its storage")
        return cls(raw["device"], decode_bytes(raw.get("handle")), raw["storage_bytes"],
                   raw["storage_offset"], decode_bytes(raw.get("ref_handle")), raw["ref_offset"],
                   decode_bytes(raw.get("event_handle")), raw["event_sync"],
                   raw["buffer_offset"], raw["nbytes"])


def export_buffer(buffer: torch.Tensor) -> IpcExport | None:
    """The export of a CUDA pool buffer (contiguous), or None for a CPU one."""
    if not buffer.is_cuda:
        return None
    if not buffer.is_contiguous():
        raise ValueError("a pool exported over CUDA IPC must be contiguous")
    storage = buffer.untyped_storage()
    (device, handle, size, offset, ref_handle, ref_offset, event_handle,
     event_sync) = storage._share_cuda_()
    return IpcExport(int(device), bytes(handle), int(size), int(offset), bytes(ref_handle),
                     int(ref_offset), bytes(event_handle), bool(event_sync),
                     int(buffer.storage_offset()) * buffer.element_size(),
                     buffer.numel() * buffer.element_size())


def open_export(exp: IpcExport) -> torch.Tensor:
    """P's pool as a uint8 (nbytes,) tensor of this process (mapped once; keep the tensor)."""
    torch.cuda._lazy_init()
    storage = torch.UntypedStorage._new_shared_cuda(
        exp.device, exp.handle, exp.storage_bytes, exp.storage_offset, exp.ref_handle,
        exp.ref_offset, exp.event_handle, exp.event_sync)
    whole = torch.empty(0, dtype=torch.uint8, device=f"cuda:{exp.device}")
    whole.set_(storage, 0, (exp.storage_bytes,), (1,))
    return whole[exp.buffer_offset:exp.buffer_offset + exp.nbytes]


def _pieces(plan: ReadPlan, max_piece: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The plan's ranges cut into pieces of at most `max_piece` bytes: (src, dst, length)."""
    src, dst, length = plan.src_offset, plan.dst_offset, plan.length
    if length.size == 0 or int(length.max()) <= max_piece:
        return src, dst, length
    counts = np.maximum(-(-length // max_piece), 1)  # (R,) pieces per range
    owner = np.repeat(np.arange(length.size), counts)  # (P,) range of each piece
    first = np.cumsum(counts) - counts  # (R,) index of each range's first piece
    starts = (np.arange(owner.size) - first[owner]) * max_piece  # (P,) offset in its range
    return src[owner] + starts, dst[owner] + starts, np.minimum(length[owner] - starts,
                                                                max_piece)


def copy_ranges(src: torch.Tensor, dst: torch.Tensor, plan: ReadPlan) -> None:
    """dst[dst_offset[i] : +length[i]] = src[src_offset[i] : +length[i]] for every range of the
    plan (uint8 1-D tensors). On a GPU: the ranges cut into pieces on the host, then one
    Triton launch on the current stream (`kernels/triton_copy.py`); on CPU: a slice copy per
    range."""
    if not dst.is_cuda:
        copy_ranges_ref(src, dst, plan.src_offset.tolist(), plan.dst_offset.tolist(),
                        plan.length.tolist())
        return
    from hybridpd.kernels.triton_copy import copy_pieces_triton, piece_bytes

    if plan.num_descriptors == 0:
        return
    words = not (int(np.bitwise_or.reduce(np.concatenate(
        [plan.src_offset, plan.dst_offset, plan.length]))) & 7)
    s, d, n = _pieces(plan, piece_bytes(words))
    offsets = torch.from_numpy(np.stack([s, d, n])).pin_memory().to(dst.device,
                                                                    non_blocking=True)
    copy_pieces_triton(src, dst, offsets[0], offsets[1], offsets[2], words)  # (3, P) int64


def _check_plan(plan: ReadPlan, src_bytes: int, dst_bytes: int) -> None:
    """The NIXL agent's range check, on both pools (TransferError outside either)."""
    if plan.num_descriptors == 0:
        return
    if int(plan.length.min()) < 0:
        raise TransferError(f"IPC READ with a negative length ({int(plan.length.min())})")
    _check_ranges("source", plan.src_offset, plan.length, src_bytes)
    _check_ranges("destination", plan.dst_offset, plan.length, dst_bytes)


@dataclass
class IpcHandle:
    """One posted IPC READ: its event, and the notice P gets once the copies landed."""

    event: Any  # torch.cuda.Event after the copies (None: copied synchronously)
    peer: str  # P's NIXL agent (where the notice goes)
    notice: bytes
    start: Any = None  # a timing event before the copies (calibration: device time)
    notified: bool = False
    failed: bool = False


class IpcReads:
    """D rank's IPC reads from P ranks on its own GPU (thread-safe: posting threads open and
    read, the engine thread polls). `opener` maps an export (tests give a CPU stand-in)."""

    def __init__(self, dst: torch.Tensor, send_notif: Callable[[str, bytes], None],
                 opener: Callable[[IpcExport], torch.Tensor] = open_export) -> None:
        self.dst = dst.view(torch.uint8).reshape(-1)  # this rank's whole pool, bytes
        self._send_notif = send_notif
        self._opener = opener
        self._mapped: dict[str, tuple[IpcExport, torch.Tensor]] = {}  # by P agent name
        self._lock = threading.Lock()
        self._stream: Any = None
        if self.dst.is_cuda:  # compile the copy kernel before any READ is timed
            from hybridpd.kernels.triton_copy import warm_up

            warm_up(self.dst.device)

    def open(self, agent: str, exp: IpcExport) -> torch.Tensor:
        """P rank `agent`'s pool, mapped on first use (again when its export changed)."""
        with self._lock:
            have = self._mapped.get(agent)
            if have is not None and have[0] == exp:
                return have[1]
            try:
                src = self._opener(exp)
            except RuntimeError as exc:  # not openable here (another GPU, P gone)
                raise TransferError(f"cannot map {agent!r}'s pool over CUDA IPC: {exc}") \
                    from exc
            if src.numel() != exp.nbytes:
                raise TransferError(f"{agent!r}'s mapped pool has {src.numel()} bytes, its "
                                    f"export says {exp.nbytes}")
            self._mapped[agent] = (exp, src)
            return src

    def forget(self, agent: str) -> None:
        with self._lock:
            self._mapped.pop(agent, None)

    def read(self, agent: str, exp: IpcExport, plan: ReadPlan, notice: bytes) -> IpcHandle:
        """Post the plan's copies from `agent`'s pool into ours; the notice goes out once they
        completed (`poll`)."""
        src = self.open(agent, exp)
        _check_plan(plan, src.numel(), self.dst.numel())
        if not self.dst.is_cuda:
            copy_ranges(src, self.dst, plan)
            return IpcHandle(None, agent, notice)
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=self.dst.device)
        stream = self._stream
        stream.wait_stream(torch.cuda.current_stream(self.dst.device))
        with torch.cuda.stream(stream):
            start = torch.cuda.Event(enable_timing=True)
            start.record(stream)
            copy_ranges(src, self.dst, plan)
            event = torch.cuda.Event(enable_timing=True)
            event.record(stream)
        return IpcHandle(event, agent, notice, start=start)

    @staticmethod
    def device_seconds(handle: IpcHandle) -> float | None:
        """Seconds the device spent on a completed READ's copies (None: not timed), what the
        pair's calibration reports: the host's launch and polling are not the transport."""
        if handle.start is None or handle.event is None or not handle.event.query():
            return None
        return float(handle.start.elapsed_time(handle.event)) / 1e3

    def poll(self, handle: IpcHandle) -> XferState:
        if handle.failed:
            return XferState.FAILED
        if handle.notified:
            return XferState.DONE
        if handle.event is not None and not handle.event.query():
            return XferState.PENDING
        try:  # landed: now P may free its blocks
            self._send_notif(handle.peer, handle.notice)
        except TransferError:
            handle.failed = True
            return XferState.FAILED
        handle.notified = True
        return XferState.DONE

    def wait(self, handle: IpcHandle, timeout_s: float) -> XferState:
        deadline = time.monotonic() + timeout_s
        while True:
            state = self.poll(handle)
            if state is not XferState.PENDING:
                return state
            if time.monotonic() > deadline:
                raise TransferError(f"IPC READ from {handle.peer!r} still running after "
                                    f"{timeout_s:.1f}s")
            time.sleep(WAIT_POLL_S)

    def release(self, handle: IpcHandle) -> None:
        """Copies cannot be aborted; they are short (an 8k-token 8B state in well under a
        millisecond), so releasing waits for them: nothing writes our blocks afterwards."""
        if handle.event is not None:
            handle.event.synchronize()
