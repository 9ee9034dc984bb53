"""Decode-rank receiver: handshake with the P ranks it needs, plan, READ, poll with deadlines.

Owns, per D rank, the cache of handshaken P ranks (geometry + NIXL peer), turning a `ReadJob`
into one READ per source P rank (with the completion notification), and reporting each job's
outcome once: every READ done, or failed / timed out (then everything is released, so no late
write can land in blocks that get reused). Handshakes and READ posting run on a small thread
pool, so a slow or frozen P never stalls the engine loop (each has its own deadline). Never
raises into the engine loop: failures become `ReadResult(ok=False, error=...)`. Knows nothing
of the model or the scheduler.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from hybridpd.disagg.endpoint import KVEndpoint, encode_notice
from hybridpd.disagg.errors import SideChannelError, TransferError
from hybridpd.disagg.params import PeerGeometry, TransferParams
from hybridpd.disagg.plan import ReadPlan, plan_read, source_p_ranks
from hybridpd.disagg.side_channel import decode_bytes, side_channel_call


@dataclass(frozen=True)
class ReadJob:
    request_id: str
    params: dict[str, Any]  # TransferParams.to_dict() as P sent it (validated here)
    block_ids: tuple[tuple[int, ...], ...]  # this instance's blocks: attention groups, then Mamba


@dataclass(frozen=True)
class ReadResult:
    request_id: str
    ok: bool
    error: str | None = None
    nbytes: int = 0
    descriptors: int = 0
    seconds: float = 0.0


@dataclass(frozen=True)
class _Peer:
    name: str
    geometry: PeerGeometry
    device_id: int
    mem_type: str


@dataclass
class _InFlight:
    job: ReadJob
    handles: list[Any]
    started: float
    deadline: float
    nbytes: int
    descriptors: int
    peers: list[tuple[str, int]] = field(default_factory=list)


class KVReceiver:
    def __init__(
        self,
        endpoint: KVEndpoint,
        handshake_timeout_s: float,
        transfer_timeout_s: float,
    ) -> None:
        self.ep = endpoint
        self.d_rank = endpoint.local.geometry.tp_rank
        self.d_tp = endpoint.local.geometry.tp_size
        self.handshake_timeout_s = handshake_timeout_s
        self.transfer_timeout_s = transfer_timeout_s
        self._peers: dict[tuple[str, int], _Peer] = {}
        self._peers_lock = threading.Lock()
        self._posting: dict[str, Future[_InFlight]] = {}
        self._inflight: dict[str, _InFlight] = {}
        self._done: list[ReadResult] = []
        self._threads = ThreadPoolExecutor(max_workers=4, thread_name_prefix="kv-post")

    # ---- starting ----------------------------------------------------------------------------
    def start(self, job: ReadJob) -> None:
        """Handshake (if needed) and post the READs in the background; see `poll`."""
        self._posting[job.request_id] = self._threads.submit(self._post, job, time.monotonic())

    def _collect_posted(self) -> None:
        for rid, fut in list(self._posting.items()):
            if not fut.done():
                continue
            del self._posting[rid]
            try:
                self._inflight[rid] = fut.result()
            except (SideChannelError, TransferError, ValueError, KeyError, TypeError) as exc:
                self._done.append(ReadResult(rid, False, f"{type(exc).__name__}: {exc}"))

    def _post(self, job: ReadJob, started: float) -> _InFlight:
        params = TransferParams.from_dict(job.params)
        ranks = source_p_ranks(self.d_rank, params.tp_size, self.d_tp)
        peers = [self._peer(params, r) for r in ranks]
        plans = [
            plan_read(self.ep.local, job.block_ids, p.geometry, params.block_ids, params.num_tokens)
            for p in peers
        ]
        notice = encode_notice(job.request_id, self.d_rank, self.d_tp)
        flight = _InFlight(
            job, [], started, started + self.transfer_timeout_s,
            nbytes=sum(p.total_bytes for p in plans),
            descriptors=sum(p.num_descriptors for p in plans),
            peers=[(params.engine_id, r) for r in ranks],
        )
        try:
            for peer, plan in zip(peers, plans, strict=True):
                flight.handles.append(self._read(peer, plan, notice))
        except TransferError:
            self._release(flight)
            raise
        return flight

    def _read(self, peer: _Peer, plan: ReadPlan, notice: bytes) -> Any:
        if plan.num_descriptors == 0:  # nothing of ours on that rank: still tell it we are done
            self.ep.agent.send_notif(peer.name, notice)
            return None
        from hybridpd.disagg.nixl_agent import MemKind

        return self.ep.agent.read(
            peer.name, self.ep.region, plan.dst_offset, peer.geometry.base_addr,
            peer.device_id, plan.src_offset, plan.length, notice,
            remote_nbytes=peer.geometry.nbytes, remote_mem_type=MemKind(peer.mem_type),
        )

    def _peer(self, params: TransferParams, p_rank: int) -> _Peer:
        key = (params.engine_id, p_rank)
        with self._peers_lock:  # one handshake per P rank even with concurrent jobs
            if key not in self._peers:
                address = params.side_channels[p_rank]
                self._peers[key] = self._handshake(address, params, p_rank)
            return self._peers[key]

    def _handshake(self, address: str, params: TransferParams, p_rank: int) -> _Peer:
        host, _, port = address.rpartition(":")
        resp = side_channel_call(
            host, int(port), {"type": "handshake", "compat_hash": self.ep.compat},
            self.handshake_timeout_s,
        )
        if resp.get("compat_hash") != self.ep.compat:
            raise ValueError("peer answered the handshake with another compatibility hash")
        if resp.get("engine_id") != params.engine_id or resp.get("rank") != p_rank:
            raise ValueError(
                f"side channel {address} is engine {resp.get('engine_id')!r} rank "
                f"{resp.get('rank')!r}, expected {params.engine_id!r} rank {p_rank}"
            )
        geometry = PeerGeometry.from_dict(resp.get("geometry"))
        name = self.ep.agent.add_peer(decode_bytes(resp.get("agent_metadata")))
        device_id = resp.get("device_id", 0)
        mem_type = resp.get("mem_type", "cpu")
        if not isinstance(device_id, int) or mem_type not in ("cpu", "cuda"):
            raise ValueError(f"bad device in handshake: {device_id!r} {mem_type!r}")
        return _Peer(name, geometry, device_id, mem_type)

    # ---- progress ----------------------------------------------------------------------------
    def poll(self) -> list[ReadResult]:
        """Results finished since the last call (each job reported exactly once)."""
        from hybridpd.disagg.nixl_agent import XferState

        self._collect_posted()
        now = time.monotonic()
        for rid, flight in list(self._inflight.items()):
            states = [self._state(h) for h in flight.handles]
            if all(s == XferState.DONE for s in states):
                self._finish(rid, flight, None)
            elif any(s == XferState.FAILED for s in states):
                self._finish(rid, flight, "READ failed (peer died or refused the transfer)")
            elif now > flight.deadline:
                self._finish(rid, flight, f"READ timed out after {self.transfer_timeout_s:.1f}s")
        done, self._done = self._done, []
        return done

    def _state(self, handle: Any) -> Any:
        from hybridpd.disagg.nixl_agent import XferState

        if handle is None:
            return XferState.DONE
        try:
            return self.ep.agent.poll(handle)
        except TransferError:
            return XferState.FAILED

    def _finish(self, rid: str, flight: _InFlight, error: str | None) -> None:
        del self._inflight[rid]
        self._release(flight)
        if error is not None:
            for key in flight.peers:  # the peer may be gone or restarted: handshake again
                self._forget(key)
        self._done.append(
            ReadResult(
                rid, error is None, error, flight.nbytes, flight.descriptors,
                time.monotonic() - flight.started,
            )
        )

    def cancel(self, request_id: str) -> None:
        """Release the request's READs; returns only when none can still write our blocks."""
        fut = self._posting.pop(request_id, None)
        if fut is not None:  # let the post finish (bounded by the handshake deadline) first
            try:
                self._inflight[request_id] = fut.result(timeout=self.handshake_timeout_s + 5)
            except Exception:  # noqa: BLE001 - a failed post left nothing to release
                self._done.append(ReadResult(request_id, False, "cancelled"))
                return
        flight = self._inflight.pop(request_id, None)
        if flight is not None:
            self._release(flight)
            self._done.append(ReadResult(request_id, False, "cancelled"))

    def _release(self, flight: _InFlight) -> None:
        for h in flight.handles:
            if h is not None:
                try:
                    self.ep.agent.release(h)
                except TransferError:
                    pass

    def _forget(self, key: tuple[str, int]) -> None:
        with self._peers_lock:
            peer = self._peers.pop(key, None)
        if peer is not None:
            try:
                self.ep.agent.remove_peer(peer.name)
            except TransferError:
                pass

    @property
    def busy(self) -> bool:
        return bool(self._inflight or self._posting)

    def close(self) -> None:
        self._threads.shutdown(wait=True, cancel_futures=True)
