"""One NIXL agent with a UCX backend: register memory, exchange metadata, READ ranges, notify.

Owns the only `import nixl` of the project (tried as `nixl`, then `nixl_cu13`, then
`nixl_cu12`, lazily, when the first `TransferAgent` is built, so that hybridpd imports without
NIXL). Must not know models, requests, block ids or page layouts: callers hand it byte offsets.

Choices (read these before using it):

* NIXL's pybind layer is driven directly (reached as `<pkg>._api.nixlBind`): the Python wrapper
  `nixl_agent` hard-codes the progress thread's delay to 0 µs, which spins a core. We run the
  progress thread with `PROGRESS_DELAY_US` = 10 µs (measured here: a mostly idle agent uses ~3% of a
  core instead of ~60%). NIXL's pickle helpers are never used: descriptors are built from numpy.
* UCX defaults (`ucx_env.py`), set with `os.environ.setdefault` before the backend is created,
  only on hosts without CUDA: `UCX_TLS=tcp,cma`, `UCX_NET_DEVICES=lo` (CPU loopback). NIXL's
  default `peer` error mode is kept, so a dead peer surfaces as an error within milliseconds.
* Every NIXL call is serialized by one lock: the agent may be used from the engine loop and from
  the side-channel thread at once.
* `wait()` raises `TransferTimeout` at its deadline after trying to abort the READ (a frozen peer
  over TCP never completes). If the abort itself fails, the handle stays live and the message
  says so: the local destination may still be written until `release()` succeeds.
* A handle must be released (`release()`) after it reaches DONE or FAILED; `poll()` of a released
  handle raises `TransferError`.
"""

from __future__ import annotations

import enum
import importlib
import itertools
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
import torch

from hybridpd.disagg.errors import TransferError, TransferTimeout
from hybridpd.disagg.ucx_env import apply_ucx_defaults, default_ucx_env

NIXL_PACKAGES = ("nixl", "nixl_cu13", "nixl_cu12")
PROGRESS_DELAY_US = 10
_MAX_POLL_SLEEP_S = 1e-3


class MemKind(str, enum.Enum):
    CPU = "cpu"
    CUDA = "cuda"


class XferState(enum.Enum):
    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True)
class RegisteredRegion:
    """A registered, contiguous byte range: what a peer needs to address it."""

    base_addr: int
    nbytes: int
    device_id: int
    mem_type: MemKind


@dataclass(frozen=True)
class TransferHandle:
    """One posted READ; the agent maps `xfer_id` to NIXL's native handle."""

    xfer_id: int
    peer: str
    num_descs: int
    nbytes: int


def load_nixl_bindings() -> ModuleType:
    """NIXL's pybind module, from the first installed package of `NIXL_PACKAGES`."""
    for package in NIXL_PACKAGES:
        try:
            return importlib.import_module(f"{package}._api").nixlBind
        except ImportError:
            continue
    raise TransferError(
        f"NIXL is not installed (tried {', '.join(NIXL_PACKAGES)}); it is a dependency of "
        "hybridpd: pip install nixl-cu13"
    )


def _nixl_errors(bind: ModuleType) -> tuple[type[BaseException], ...]:
    found = [
        value
        for name, value in vars(bind).items()
        if name.startswith("nixl") and name.endswith("Error") and isinstance(value, type)
    ]
    return (*found, RuntimeError)


def _as_offsets(name: str, values: Any) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1 or not (array.size == 0 or np.issubdtype(array.dtype, np.integer)):
        raise TransferError(f"{name} must be a 1-D integer array, got {array.dtype}{array.shape}")
    return array.astype(np.int64, copy=False)


def _check_ranges(
    side: str, offsets: np.ndarray, lengths: np.ndarray, limit: int | None
) -> None:
    """Raise unless every [offset, offset + length) is non-negative and below `limit`."""
    if int(offsets.min()) < 0:
        raise TransferError(f"{side} offsets must be >= 0 (min {int(offsets.min())})")
    if limit is None:
        return
    ends = offsets + lengths  # no overflow: both < 2**62 (checked by the caller)
    worst = int(np.argmax(ends))
    if int(ends[worst]) > limit:
        raise TransferError(
            f"{side} range {worst} [{int(offsets[worst])}, {int(ends[worst])}) exceeds "
            f"its region of {limit} bytes"
        )


def _descriptors(
    base_addr: int, device_id: int, offsets: np.ndarray, lengths: np.ndarray
) -> np.ndarray:
    descs = np.empty((offsets.shape[0], 3), dtype=np.uint64)  # (N, 3): addr, len, device
    descs[:, 0] = offsets.astype(np.uint64) + np.uint64(base_addr)
    descs[:, 1] = lengths
    descs[:, 2] = device_id
    return descs


class TransferAgent:
    """One NIXL agent (UCX backend). Peers are addressed by the name in their metadata."""

    def __init__(
        self,
        name: str,
        *,
        ucx_env: Mapping[str, str] | None = None,
        progress_delay_us: int = PROGRESS_DELAY_US,
    ) -> None:
        if not name:
            raise TransferError("agent name must be non-empty")
        if ucx_env is None:
            ucx_env = default_ucx_env(has_cuda=torch.cuda.is_available())
        apply_ucx_defaults(ucx_env)
        self.name = name
        self._bind = load_nixl_bindings()
        self._errors = _nixl_errors(self._bind)
        self._lock = threading.RLock()
        self._agent: Any = self._create_agent(name, progress_delay_us)
        self._regions: dict[tuple[int, int, int, MemKind], tuple[RegisteredRegion, Any, Any]] = {}
        self._peers: set[str] = set()
        self._xfers: dict[int, tuple[int, str]] = {}
        self._ids = itertools.count(1)

    def _create_agent(self, name: str, progress_delay_us: int) -> Any:
        config = self._bind.nixlAgentConfig()
        config.useProgThread = True
        config.useListenThread = False
        config.pthrDelay = int(progress_delay_us)
        try:
            agent = self._bind.nixlAgent(name, config)
            if "UCX" not in agent.getAvailPlugins():
                raise TransferError("NIXL has no UCX plugin; cannot transfer")
            agent.createBackend("UCX", {})
        except self._errors as exc:
            raise TransferError(f"cannot create NIXL agent {name!r}: {exc}") from exc
        return agent

    # ---- memory ---------------------------------------------------------------------------

    def register(self, tensor: torch.Tensor) -> RegisteredRegion:
        """Register a contiguous tensor's bytes once (idempotent); keeps it alive until close."""
        if not tensor.is_contiguous() or tensor.numel() == 0:
            raise TransferError("only non-empty contiguous tensors can be registered")
        mem = MemKind.CUDA if tensor.is_cuda else MemKind.CPU
        region = RegisteredRegion(
            base_addr=tensor.data_ptr(),
            nbytes=tensor.numel() * tensor.element_size(),
            device_id=tensor.get_device() if tensor.is_cuda else 0,
            mem_type=mem,
        )
        key = (region.base_addr, region.nbytes, region.device_id, mem)
        with self._lock:
            self._require_open()
            if key in self._regions:
                return self._regions[key][0]
            row = np.array([[region.base_addr, region.nbytes, region.device_id]], dtype=np.uint64)
            reg_descs = self._bind.nixlRegDList(self._segment(mem), row)
            self._call("register memory", self._agent.registerMem, reg_descs, [])
            self._regions[key] = (region, reg_descs, tensor)
        return region

    # ---- peers ----------------------------------------------------------------------------

    def metadata(self) -> bytes:
        """This agent's metadata (connection info + registered regions); fetch after register."""
        with self._lock:
            self._require_open()
            return bytes(self._call("get local metadata", self._agent.getLocalMD))

    def add_peer(self, metadata: bytes) -> str:
        """Load a peer's metadata; returns its agent name. Garbage -> TransferError."""
        if not isinstance(metadata, (bytes, bytearray, memoryview)) or len(metadata) == 0:
            raise TransferError("peer metadata must be non-empty bytes")
        with self._lock:
            self._require_open()
            raw = self._call("load peer metadata", self._agent.loadRemoteMD, bytes(metadata))
            name = raw.decode() if isinstance(raw, bytes) else str(raw)
            self._peers.add(name)
        return name

    def remove_peer(self, name: str) -> None:
        """Forget a peer (no-op when unknown); its live transfers are released first."""
        with self._lock:
            if self._agent is None or name not in self._peers:
                return
            for xfer_id, (_, peer) in list(self._xfers.items()):
                if peer == name:
                    self._release_id(xfer_id, quiet=True)
            self._peers.discard(name)
            self._call("remove peer", self._agent.invalidateRemoteMD, name)

    # ---- transfers ------------------------------------------------------------------------

    def read(
        self,
        peer: str,
        local_region: RegisteredRegion,
        local_offsets: Any,
        remote_base_addr: int,
        remote_device_id: int,
        remote_offsets: Any,
        lengths: Any,
        notif: bytes,
        *,
        remote_nbytes: int | None = None,
        remote_mem_type: MemKind | None = None,
    ) -> TransferHandle:
        """Post one READ of N ranges: remote [base+ro[i], +len[i]) -> local [base+lo[i], ...).

        `notif` reaches the peer when the READ completes. Ranges are checked before NIXL is
        touched (local ranges always, remote ones when `remote_nbytes` is given; NIXL checks
        remote ranges against the peer's registrations in any case). The remote memory kind
        defaults to the local one. Cost before NIXL: ~0.1 ms of numpy per 10k ranges.
        """
        local, remote, sizes = self._validated(
            local_region, local_offsets, remote_offsets, lengths, remote_nbytes
        )
        local_descs = _descriptors(local_region.base_addr, local_region.device_id, local, sizes)
        remote_descs = _descriptors(remote_base_addr, remote_device_id, remote, sizes)
        remote_seg = self._segment(remote_mem_type or local_region.mem_type)
        with self._lock:
            self._require_open()
            if peer not in self._peers:
                raise TransferError(f"unknown peer {peer!r}: add_peer() its metadata first")
            native = self._call(
                f"create READ from {peer!r}",
                self._agent.createXferReq,
                self._bind.NIXL_READ,
                self._bind.nixlXferDList(self._segment(local_region.mem_type), local_descs),
                self._bind.nixlXferDList(remote_seg, remote_descs),
                peer,
                bytes(notif),
                [],
            )
            xfer_id = next(self._ids)
            self._xfers[xfer_id] = (native, peer)
            try:
                status = self._call(
                    f"post READ from {peer!r}", self._agent.postXferReq, native, bytes(notif)
                )
                if status not in (self._bind.NIXL_SUCCESS, self._bind.NIXL_IN_PROG):
                    raise TransferError(f"{self.name}: post READ from {peer!r} gave {status}")
            except TransferError:
                self._release_id(xfer_id, quiet=True)
                raise
        return TransferHandle(xfer_id, peer, int(sizes.shape[0]), int(sizes.sum()))

    def _validated(
        self,
        local_region: RegisteredRegion,
        local_offsets: Any,
        remote_offsets: Any,
        lengths: Any,
        remote_nbytes: int | None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        local = _as_offsets("local_offsets", local_offsets)
        remote = _as_offsets("remote_offsets", remote_offsets)
        sizes = _as_offsets("lengths", lengths)
        if not local.shape == remote.shape == sizes.shape:
            raise TransferError(
                f"offsets/lengths differ in count: local {local.shape[0]}, "
                f"remote {remote.shape[0]}, lengths {sizes.shape[0]}"
            )
        if sizes.shape[0] == 0:
            raise TransferError("a READ needs at least one range")
        if int(sizes.min()) <= 0:
            raise TransferError(f"lengths must be > 0 (min {int(sizes.min())})")
        if max(int(local.max()), int(remote.max()), int(sizes.max())) >= 2**62:
            raise TransferError("offsets and lengths must be < 2**62")
        _check_ranges("local", local, sizes, local_region.nbytes)
        _check_ranges("remote", remote, sizes, remote_nbytes)
        return local, remote, sizes

    def poll(self, handle: TransferHandle) -> XferState:
        """Non-blocking state of a posted READ (FAILED covers errors and a dead peer)."""
        with self._lock:
            self._require_open()
            entry = self._xfers.get(handle.xfer_id)
            if entry is None:
                raise TransferError(f"transfer {handle.xfer_id} was already released")
            try:
                status = self._agent.getXferStatus(entry[0])
            except self._errors:
                return XferState.FAILED
        if status == self._bind.NIXL_SUCCESS:
            return XferState.DONE
        if status == self._bind.NIXL_IN_PROG:
            return XferState.PENDING
        return XferState.FAILED

    def wait(self, handle: TransferHandle, timeout_s: float) -> XferState:
        """Block until DONE or FAILED; at the deadline abort the READ and raise TransferTimeout."""
        deadline = time.monotonic() + timeout_s
        pause = 2e-5
        while (state := self.poll(handle)) is XferState.PENDING:
            if time.monotonic() >= deadline:
                self._abort_after_timeout(handle, timeout_s)
            time.sleep(pause)
            pause = min(pause * 2, _MAX_POLL_SLEEP_S)
        return state

    def _abort_after_timeout(self, handle: TransferHandle, timeout_s: float) -> None:
        prefix = (
            f"READ from {handle.peer!r} ({handle.num_descs} ranges) not done after {timeout_s}s"
        )
        try:
            self.release(handle)
        except TransferError as exc:
            raise TransferTimeout(
                f"{prefix}; abort failed ({exc}): the local destination may still be written "
                "until release() succeeds"
            ) from exc
        raise TransferTimeout(f"{prefix}; aborted")

    def release(self, handle: TransferHandle) -> None:
        """Free a READ's resources (cancels it when still running); idempotent."""
        with self._lock:
            if self._agent is not None:
                self._release_id(handle.xfer_id, quiet=False)

    def _release_id(self, xfer_id: int, quiet: bool) -> None:
        entry = self._xfers.pop(xfer_id, None)
        if entry is None:
            return
        try:
            self._agent.releaseXferReq(entry[0])
        except self._errors as exc:
            self._xfers[xfer_id] = entry
            if not quiet:
                raise TransferError(f"cannot release transfer {xfer_id}: {exc}") from exc

    # ---- notifications --------------------------------------------------------------------

    def get_notifs(self) -> dict[str, list[bytes]]:
        """Notifications received since the last call: peer name -> messages in arrival order."""
        with self._lock:
            self._require_open()
            raw = self._call("get notifications", self._agent.getNotifs, {}, [])
        return {str(peer): [bytes(m) for m in msgs] for peer, msgs in raw.items() if msgs}

    def send_notif(self, peer: str, msg: bytes) -> None:
        """Send a standalone notification to a known peer."""
        with self._lock:
            self._require_open()
            if peer not in self._peers:
                raise TransferError(f"unknown peer {peer!r}: add_peer() its metadata first")
            self._call(f"notify {peer!r}", self._agent.genNotif, peer, bytes(msg))

    # ---- lifetime -------------------------------------------------------------------------

    def close(self) -> None:
        """Release transfers, forget peers, deregister memory, destroy the agent; idempotent."""
        with self._lock:
            if self._agent is None:
                return
            for xfer_id in list(self._xfers):
                self._release_id(xfer_id, quiet=True)
            for peer in list(self._peers):
                try:
                    self.remove_peer(peer)
                except TransferError:
                    self._peers.discard(peer)
            for _, reg_descs, _ in self._regions.values():
                try:
                    self._agent.deregisterMem(reg_descs, [])
                except self._errors:
                    pass
            self._regions.clear()
            self._xfers.clear()
            self._agent = None

    def __enter__(self) -> TransferAgent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- helpers --------------------------------------------------------------------------

    def _require_open(self) -> None:
        if self._agent is None:
            raise TransferError(f"agent {self.name!r} is closed")

    def _segment(self, mem: MemKind) -> Any:
        return self._bind.VRAM_SEG if MemKind(mem) is MemKind.CUDA else self._bind.DRAM_SEG

    def _call(self, what: str, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except self._errors as exc:
            raise TransferError(f"{self.name}: {what} failed: {type(exc).__name__}: {exc}") from exc
