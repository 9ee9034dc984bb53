"""Never silently slow: what carries a P -> D pair's READs, how fast it measured, and what to do
when it is slow.

Owns:

* `PeerFacts`: what each side advertises in the handshake about where its pool lives (host id,
  memory kind, GPU UUID, the UCX transports configured); `local_facts(buffer)` builds ours.
* `Topology` of a pair from both sides' facts (same GPU, two GPUs of one host, different hosts,
  CPU pools) and the transport label (`ucx:<UCX_TLS>`, "auto" when UCX chooses): NIXL does not
  tell which UCX lane it picked, so the label is the configuration, and the calibrated GB/s is
  the evidence.
* `calibration_slice(plan, max_bytes)`: the short calibration READ D runs once per new peer, a
  prefix of the job's own `ReadPlan` (so it writes only bytes of the job's own blocks, with the
  very data the full READ then writes again, and reads only blocks P holds for that job).
* `TransportPolicy` / `assess`: the floor (default 5 GB/s for GPU-to-GPU pairs, none for CPU
  pools; configurable so a test can trigger it on CPU), the warning naming the cause and the fix,
  and whether the pair is refused (`--kv-require-fast-transport`).

Must not know NIXL calls, the scheduler, or what the bytes mean.
"""

from __future__ import annotations

import enum
import functools
import logging
import socket
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from hybridpd.disagg.plan import ReadPlan
from hybridpd.env import ucx_setting

GPU_FLOOR_GBPS = 5.0  # below this a GPU-to-GPU pair is on a host-staged or TCP lane
CALIBRATION_BYTES = 8 * 2**20  # at most this much is read by the calibration READ
CALIBRATION_NOTICE = b"hpd-calibrate"  # not an `hpd2|...` notice: P ignores it
log = logging.getLogger("hybridpd.transfer")


class Topology(str, enum.Enum):
    SAME_GPU = "same-gpu"  # P and D pools on one device (two processes sharing a GPU)
    SAME_HOST_GPUS = "same-host-gpus"  # two GPUs of one host (cuda_ipc over NVLink / PCIe)
    CROSS_HOST_GPUS = "cross-host-gpus"  # GPU pools on different hosts (RDMA)
    SAME_HOST_CPU = "same-host-cpu"  # a CPU pool on at least one side, one host
    CROSS_HOST_CPU = "cross-host-cpu"

    @property
    def gpu_pair(self) -> bool:
        return self in (Topology.SAME_GPU, Topology.SAME_HOST_GPUS, Topology.CROSS_HOST_GPUS)


class Verdict(str, enum.Enum):
    FAST = "fast"  # at or above the floor
    SLOW = "slow"  # below: warned, transfers still used
    REFUSED = "refused"  # below with --kv-require-fast-transport: requests fall back


@dataclass(frozen=True)
class PeerFacts:
    host_id: str
    mem_type: str  # "cpu" | "cuda"
    device_uuid: str | None
    ucx_tls: str | None  # UCX_TLS as configured on that side (None: UCX chooses)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Any) -> PeerFacts | None:
        """None for a peer that sent none or garbage (an older peer): reported as unknown."""
        if not isinstance(raw, dict):
            return None
        host, mem, dev, tls = (raw.get(k) for k in ("host_id", "mem_type", "device_uuid",
                                                     "ucx_tls"))
        if not isinstance(host, str) or mem not in ("cpu", "cuda"):
            return None
        return cls(host, mem, dev if isinstance(dev, str) else None,
                   tls if isinstance(tls, str) else None)


@functools.lru_cache(maxsize=1)
def host_id() -> str:
    """This host: its name plus the kernel's boot id (two containers of one host share it)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


def local_facts(buffer: Any) -> PeerFacts:
    """Facts about the pool `buffer` (a torch tensor) of this process."""
    uuid = None
    if buffer.is_cuda:
        import torch

        uuid = str(getattr(torch.cuda.get_device_properties(buffer.device), "uuid", "")) or None
    return PeerFacts(host_id(), "cuda" if buffer.is_cuda else "cpu", uuid, ucx_setting("UCX_TLS"))


def topology(local: PeerFacts, peer: PeerFacts | None) -> Topology | None:
    if peer is None:
        return None
    same_host = local.host_id == peer.host_id
    if local.mem_type == "cuda" and peer.mem_type == "cuda":
        if same_host and local.device_uuid is not None and local.device_uuid == peer.device_uuid:
            return Topology.SAME_GPU
        return Topology.SAME_HOST_GPUS if same_host else Topology.CROSS_HOST_GPUS
    return Topology.SAME_HOST_CPU if same_host else Topology.CROSS_HOST_CPU


def transport_label(local: PeerFacts) -> str:
    """What carries D's READs as far as we can know: the backend and D's configured lanes."""
    return f"ucx:{local.ucx_tls or 'auto'}"


@dataclass(frozen=True)
class TransportPolicy:
    floor_gbps: float | None = None  # None: GPU_FLOOR_GBPS for GPU pairs, no floor otherwise
    require_fast: bool = False

    def floor_for(self, topo: Topology | None) -> float:
        if self.floor_gbps is not None:
            return self.floor_gbps
        return GPU_FLOOR_GBPS if topo is not None and topo.gpu_pair else 0.0


@dataclass(frozen=True)
class PairTransport:
    """One (P engine, P rank) pair as D calibrated it."""

    peer: str  # "<P engine id>/rank<r>"
    transport: str
    topology: Topology | None
    calibrated_gbps: float
    calibration_bytes: int
    floor_gbps: float
    verdict: Verdict
    message: str | None  # the warning / refusal text (None when fast)

    @property
    def topology_label(self) -> str:
        return self.topology.value if self.topology is not None else "unknown"

    def describe(self) -> str:
        return (f"transport {self.transport} ({self.topology_label}), calibrated "
                f"{self.calibrated_gbps:.3f} GB/s over {self.calibration_bytes} bytes")


def calibration_slice(plan: ReadPlan, max_bytes: int = CALIBRATION_BYTES) -> ReadPlan:
    """The plan's first ranges up to `max_bytes` (the last one cut short): a subset of the
    READ itself, so it touches only the job's blocks and writes what the READ writes again."""
    ends = np.cumsum(plan.length)  # (n,)
    n = int(np.searchsorted(ends, max_bytes, side="left")) + 1
    n = min(n, int(plan.length.shape[0]))
    length = plan.length[:n].copy()
    over = int(ends[n - 1]) - max_bytes
    if over > 0:
        length[-1] -= over
    return ReadPlan(plan.p_rank, plan.src_offset[:n].copy(), plan.dst_offset[:n].copy(), length)


def assess(
    policy: TransportPolicy, peer: str, local: PeerFacts, theirs: PeerFacts | None,
    nbytes: int, seconds: float, transport: str | None = None,
) -> PairTransport:
    """The pair's record: calibrated GB/s against the floor, and the warning when below it.
    `transport`: what carried the READs when not NIXL/UCX (e.g. "cuda-ipc")."""
    topo = topology(local, theirs)
    gbps = nbytes / seconds / 1e9 if seconds > 0 else float("inf")
    floor = policy.floor_for(topo)
    label = transport or transport_label(local)
    if gbps >= floor:
        return PairTransport(peer, label, topo, gbps, nbytes, floor, Verdict.FAST, None)
    verdict = Verdict.REFUSED if policy.require_fast else Verdict.SLOW
    what = (f"KV transfers from {peer} are slow: {gbps:.3f} GB/s calibrated over {nbytes} "
            f"bytes, below the {floor:g} GB/s floor ({label}, {topo.value if topo else '?'}). "
            f"{_cause_and_fix(topo, label)}")
    if verdict is Verdict.REFUSED:
        what += (" Refusing the pair (--kv-require-fast-transport): its requests fall back "
                 "per --on-transfer-failure.")
    return PairTransport(peer, label, topo, gbps, nbytes, floor, verdict, what)


def _cause_and_fix(topo: Topology | None, label: str) -> str:
    if topo is Topology.SAME_GPU:
        return ("Cause: P and D share one GPU, P's pool is not shared over CUDA IPC (see P's "
                "log) and UCX has no same-device lane; it stages through the host or TCP. Fix: "
                "no expandable segments in PYTORCH_CUDA_ALLOC_CONF on P, or give each "
                "instance its own GPU (`hybridpd up --gpus ...` without --share-gpus).")
    if topo is Topology.SAME_HOST_GPUS:
        return ("Cause: the READ is not on cuda_ipc (NVLink / PCIe peer access); UCX picked a "
                "host-staged or TCP lane. Fix: include cuda_ipc,cuda_copy in UCX_TLS (now "
                f"{label}), and check peer access between the GPUs (`nvidia-smi topo -m`).")
    if topo is Topology.CROSS_HOST_GPUS:
        return ("Cause: no RDMA lane between the hosts (UCX fell back to TCP). Fix: UCX_TLS="
                "rc,cuda_copy,cuda_ipc (or ib / rocm variants) and UCX_NET_DEVICES set to the "
                "RDMA NIC (e.g. mlx5_0:1); check `ucx_info -d`.")
    return ("Cause: CPU pools over TCP loopback. Fix: UCX_TLS=tcp,cma on one host (cma copies "
            "between processes directly), or lower --kv-transport-floor-gbps.")


class SlowTransportError(RuntimeError):
    """The pair was refused (`--kv-require-fast-transport`); the message says why and how."""


class PairBook:
    """One D rank's calibrated pairs, kept for the process's life (P engine ids are per start,
    so a restarted P is a new pair). Thread-safe: posting threads calibrate concurrently."""

    def __init__(self, policy: TransportPolicy, local: PeerFacts) -> None:
        self.policy, self.local = policy, local
        self._pairs: dict[tuple[str, int], PairTransport] = {}
        self._lock = threading.Lock()

    def get(self, key: tuple[str, int]) -> PairTransport | None:
        with self._lock:
            return self._pairs.get(key)

    def check(self, key: tuple[str, int]) -> None:
        """Raise SlowTransportError for a pair already refused (before any handshake)."""
        pair = self.get(key)
        if pair is not None and pair.verdict is Verdict.REFUSED:
            raise SlowTransportError(pair.message)

    def calibrate(
        self, key: tuple[str, int], theirs: PeerFacts | None, plan: ReadPlan,
        timed_read: Callable[[ReadPlan], float], transport: str | None = None,
    ) -> PairTransport | None:
        """The pair's record, calibrating it first when new (None: nothing to read from it).
        Logs the handshake line; warns below the floor; raises SlowTransportError if refused."""
        pair = self.get(key)
        if pair is None:
            if plan.num_descriptors == 0:
                return None
            piece = calibration_slice(plan)
            seconds = timed_read(piece)
            pair = assess(self.policy, f"{key[0]}/rank{key[1]}", self.local, theirs,
                          piece.total_bytes, seconds, transport)
            with self._lock:
                self._pairs[key] = pair
            log.info("kv handshake with %s: %s", pair.peer, pair.describe())
            if pair.message is not None:
                log.warning("%s", pair.message)
        if pair.verdict is Verdict.REFUSED:
            raise SlowTransportError(pair.message)
        return pair
