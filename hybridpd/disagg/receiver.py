"""Decode-rank receiver: load the P ranks it needs, plan, READ, poll with deadlines.

Owns, per D rank, the cache of loaded P ranks (geometry + NIXL peer, by agent name), turning a
`ReadJob` into one READ per source P rank (with the completion notification), and reporting
each job's outcome once. Never raises into the engine loop: every job ends in a `ReadResult`
whose `outcome` (`ReadOutcome`) says how, with a human-readable `detail`. Makes no network
call of its own: the handshake with P is D's transfer service's (rank 0), and its records of
every P rank ride the job (`ReadJob.peers`). Knows nothing of the model or the scheduler.

Contract (the engine loop calls `start`, `cancel`, `poll`, `busy` and `close` from one thread):

* `start(job)` returns at once: loading peers (when needed) and READ posting run on a small
  thread pool. One job per request id at a time (starting an id that is still active here is
  a caller bug: ValueError).
* `cancel(request_id)` never blocks. A job whose post has not begun is dropped; a job being
  posted is released as soon as its post completes; posted READs are released at once. The
  job's result then says `ReadOutcome.CANCELLED`. Cancelling an unknown id, a
  reported one, or one whose outcome is already decided (ok, failed or timed out, perhaps still
  waiting on a release) changes nothing: that outcome is what gets reported.
* `poll()` reports every started job exactly once — OK, REFUSED (nothing was posted: the
  peer records, the plan or the transport policy said no), FAILED, TIMED_OUT or CANCELLED — and
  only when nothing can still write the job's local blocks: each of its READ handles is DONE or
  was released successfully. A release that raises `TransferError` keeps the handle in
  quarantine, retried on every poll, and the result waits for it. So the caller may free or
  reuse a job's blocks as soon as its result is reported, and must not before. READs still
  running `transfer_timeout_s` after `start` are released and reported as timed out.
* Peers: a P rank's NIXL metadata (from the job's record) is loaded once per agent and shared
  by every job; a record naming another instance or rank, another compatibility hash, or
  metadata of another agent refuses the job. Metadata that changed (P restarted) is loaded
  again; a job that fails forgets its peers (the next one loads them again; D's service
  handshakes again too).
* `close()` waits for posts in progress (each bounded by the calibration deadline) and
  releases every READ still held.
* Transport (`transport.py`, when built with a `TransportPolicy`, as the engine always does):
  the first job to a new peer runs a short calibration READ (a prefix of its own plan) first;
  the pair's transport and calibrated GB/s go into every result from that peer, and a pair
  below the floor is warned about, or refused with `require_fast` (its jobs then fail, and the
  engine falls back per its failure policy).
* Same GPU (`cuda_ipc.py`): a P rank whose pool is on our GPU and exported is read by device
  copies from its IPC-mapped pool (`IpcReads`, the same handle contract as the NIXL agent's;
  P's notice goes over NIXL once the copies landed); a pool that cannot be mapped here is read
  over NIXL from then on.
"""

from __future__ import annotations

import enum
import functools
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from hybridpd.disagg.cuda_ipc import TRANSPORT_LABEL as IPC_LABEL
from hybridpd.disagg.cuda_ipc import IpcExport, IpcHandle, IpcReads
from hybridpd.disagg.endpoint import KVEndpoint, RankAdvert, agent_name, encode_notice
from hybridpd.disagg.errors import TransferError
from hybridpd.disagg.params import PeerGeometry, TransferParams
from hybridpd.disagg.plan import ReadPlan, plan_read, source_p_ranks
from hybridpd.disagg.transport import (
    CALIBRATION_NOTICE,
    PairBook,
    PairTransport,
    PeerFacts,
    Topology,
    TransportPolicy,
    topology,
)

POST_THREADS = 4
log = logging.getLogger("hybridpd.transfer")


class ReadOutcome(str, enum.Enum):
    """How one READ job ended; `poll` reports each started job once with one of these."""

    OK = "ok"  # every READ done: the local blocks hold the peer's state
    REFUSED = "refused"  # nothing posted: handshake, plan or transport policy refused the job
    FAILED = "failed"  # a READ failed (peer died, refused the transfer) or posting broke off
    TIMED_OUT = "timed-out"  # READs still running at the transfer deadline (released)
    CANCELLED = "cancelled"  # the engine cancelled the job (e.g. the client went away)


CANCELLED = ReadOutcome.CANCELLED  # a cancelled result's `error` equals it (str Enum)


@dataclass(frozen=True)
class ReadJob:
    request_id: str
    params: TransferParams  # P's hand-off (checked against the prompt by D's engine)
    block_ids: tuple[tuple[int, ...], ...]  # this instance's blocks: attention groups, then Mamba
    nonce: str = ""  # this READ's nonce (every D rank's notice carries it; so does the confirm)
    # every P rank's handshake record, in rank order (D's transfer service handshook for them)
    peers: tuple[RankAdvert, ...] = ()


@dataclass(frozen=True)
class ReadResult:
    request_id: str
    outcome: ReadOutcome
    detail: str = ""  # why it was not OK, for people (the outcome is what code branches on)
    nbytes: int = 0
    descriptors: int = 0
    seconds: float = 0.0
    pair: PairTransport | None = None  # the (first) source pair's transport and calibration

    @property
    def ok(self) -> bool:
        return self.outcome is ReadOutcome.OK

    @property
    def error(self) -> str | None:
        """None when OK, else the detail (a cancelled job's is "cancelled")."""
        return None if self.ok else self.detail or self.outcome.value


@dataclass(frozen=True)
class _Peer:
    name: str
    geometry: PeerGeometry
    device_id: int
    mem_type: str
    facts: PeerFacts | None = None
    ipc: IpcExport | None = None  # P's pool over CUDA IPC (used when it is on our GPU)


@dataclass(frozen=True)
class _Loaded:
    metadata: bytes  # what was loaded into NIXL for the agent
    peer: _Peer


@dataclass
class _InFlight:
    job: ReadJob
    handles: list[Any]
    started: float
    deadline: float
    nbytes: int
    descriptors: int
    peers: list[str] = field(default_factory=list)  # the source ranks' agent names
    error: str | None = None  # posting stopped half-way: the handles posted so far are kept
    pair: PairTransport | None = None


@dataclass
class _Posting:
    future: Future[_InFlight]
    cancelled: threading.Event  # read by the posting thread: post no further READs


@dataclass
class _Draining:
    """A decided job whose handles are being released; its result waits until none can write."""

    handles: list[Any]  # not yet released (quarantined after a failed release)
    result: ReadResult | None  # None once reported
    warned: bool = False


class KVReceiver:
    def __init__(
        self,
        endpoint: KVEndpoint,
        handshake_timeout_s: float,
        transfer_timeout_s: float,
        policy: TransportPolicy | None = None,
    ) -> None:
        self.ep = endpoint
        self.d_rank = endpoint.local.geometry.tp_rank
        self.d_tp = endpoint.local.geometry.tp_size
        self.handshake_timeout_s = handshake_timeout_s  # the calibration READ's deadline
        self.transfer_timeout_s = transfer_timeout_s
        self._peers: dict[str, _Loaded] = {}  # NIXL peers loaded, by agent name
        self._peers_lock = threading.Lock()
        self.loads = 0  # peer metadata loaded (once per agent, again after a change)
        self._posting: dict[str, _Posting] = {}
        self._inflight: dict[str, _InFlight] = {}
        self._draining: list[_Draining] = []
        self._done: list[ReadResult] = []
        self._threads = ThreadPoolExecutor(POST_THREADS, thread_name_prefix="kv-post")
        # None: no calibration (unit tests of the READ contract); the engine always gives one
        self.pairs = None if policy is None else PairBook(policy, endpoint.facts)
        buffer = getattr(endpoint, "buffer", None)  # same-GPU peers: CUDA IPC reads into it
        self.ipc = (IpcReads(buffer, endpoint.agent.send_notif)
                    if buffer is not None and buffer.is_cuda else None)
        self._no_ipc: set[str] = set()  # P agents whose export could not be mapped here

    # ---- starting ----------------------------------------------------------------------------
    def start(self, job: ReadJob) -> None:
        """Load the job's peers (if needed) and post the READs in the background; see `poll`."""
        rid = job.request_id
        if self._active(rid):
            raise ValueError(f"a READ job for request {rid!r} is already active")
        cancelled = threading.Event()
        future = self._threads.submit(self._post, job, time.monotonic(), cancelled)
        self._posting[rid] = _Posting(future, cancelled)

    def _active(self, rid: str) -> bool:
        return rid in self._posting or rid in self._inflight or any(
            d.result is not None and d.result.request_id == rid for d in self._draining
        )

    def _collect_posted(self) -> None:
        for rid, post in list(self._posting.items()):
            if not post.future.done():
                continue
            del self._posting[rid]
            try:
                flight = post.future.result()
            except Exception as exc:  # noqa: BLE001 - nothing was posted: report, never raise
                if post.cancelled.is_set():
                    self._done.append(ReadResult(rid, ReadOutcome.CANCELLED))
                else:
                    self._done.append(ReadResult(rid, ReadOutcome.REFUSED,
                                                 f"{type(exc).__name__}: {exc}"))
                continue
            if post.cancelled.is_set():
                self._settle(flight, ReadOutcome.CANCELLED)
            elif flight.error is not None:
                self._settle(flight, ReadOutcome.FAILED, flight.error)
            else:
                self._inflight[rid] = flight

    def _post(self, job: ReadJob, started: float, cancelled: threading.Event) -> _InFlight:
        params = job.params
        ranks = source_p_ranks(self.d_rank, params.tp_size, self.d_tp)
        if self.pairs is not None:
            for r in ranks:
                self.pairs.check((params.engine_id, r))  # a refused pair: no READ
        peers = [self._peer(job, r) for r in ranks]
        plans = [
            plan_read(self.ep.local, job.block_ids, p.geometry, params.block_ids, params.num_tokens)
            for p in peers
        ]
        notice = encode_notice(params.transfer_id, self.d_rank, self.d_tp,  # P keys on it
                               self.ep.engine_id, job.nonce, self.ep.notice_key)
        flight = _InFlight(
            job, [], started, started + self.transfer_timeout_s,
            nbytes=sum(p.total_bytes for p in plans),
            descriptors=sum(p.num_descriptors for p in plans),
            peers=[agent_name(params.engine_id, r) for r in ranks],
        )
        for r, peer, plan in zip(ranks, peers, plans, strict=True):
            if cancelled.is_set():
                break
            try:
                if self.pairs is not None:
                    timed = functools.partial(self._timed_read, peer, flight=flight)
                    label = IPC_LABEL if self._over_ipc(peer) else None
                    pair = self.pairs.calibrate((params.engine_id, r), peer.facts, plan, timed,
                                                transport=label)
                    flight.pair = flight.pair or pair
                flight.handles.append(self._read(peer, plan, notice))
            except Exception as exc:  # noqa: BLE001 - READs posted so far must be released
                flight.error = f"{type(exc).__name__}: {exc}"
                break
        return flight

    def _over_ipc(self, peer: _Peer) -> bool:
        """P's pool is on our GPU, exported, and mappable here: READ it by device copies, not
        through UCX. A pool that cannot be mapped (another container's GPU view, a P that is
        gone) is read over NIXL from then on, said once in the log."""
        if self.ipc is None or peer.ipc is None or peer.name in self._no_ipc \
                or topology(self.ep.facts, peer.facts) is not Topology.SAME_GPU:
            return False
        try:
            self.ipc.open(peer.name, peer.ipc)
        except TransferError as exc:
            self._no_ipc.add(peer.name)
            log.warning("%s; reading it over NIXL instead", exc)
            return False
        return True

    def _read(self, peer: _Peer, plan: ReadPlan, notice: bytes) -> Any:
        if plan.num_descriptors == 0:  # nothing of ours on that rank: still tell it we are done
            self.ep.agent.send_notif(peer.name, notice)
            return None
        if self._over_ipc(peer):
            assert self.ipc is not None and peer.ipc is not None
            return self.ipc.read(peer.name, peer.ipc, plan, notice)
        from hybridpd.disagg.nixl_agent import MemKind

        return self.ep.agent.read(
            peer.name, self.ep.region, plan.dst_offset, peer.geometry.base_addr,
            peer.device_id, plan.src_offset, plan.length, notice,
            remote_nbytes=peer.geometry.nbytes, remote_mem_type=MemKind(peer.mem_type),
        )

    def _timed_read(self, peer: _Peer, piece: ReadPlan, flight: _InFlight) -> float:
        """Seconds of one blocking calibration READ (deadline: the handshake's). A handle that
        cannot be released joins the job's handles, so the job stays quarantined for it."""
        from hybridpd.disagg.nixl_agent import XferState

        t0 = time.monotonic()
        handle = self._read(peer, piece, CALIBRATION_NOTICE)
        try:
            state = self._backend(handle).wait(handle, self.handshake_timeout_s)
        except TransferError:
            if not self._released(handle):
                flight.handles.append(handle)
            raise
        seconds = time.monotonic() - t0
        if isinstance(handle, IpcHandle):  # device copies: the device's own time is the figure
            seconds = IpcReads.device_seconds(handle) or seconds
        if not self._released(handle):
            flight.handles.append(handle)
        if state is not XferState.DONE:
            raise TransferError(f"calibration READ from {peer.name!r} failed")
        return seconds

    # ---- peers (posting threads) -------------------------------------------------------------
    def _peer(self, job: ReadJob, p_rank: int) -> _Peer:
        """P rank `p_rank` as a NIXL peer, from the record the job carries (D's transfer
        service handshook for it); its metadata is loaded once per agent and loaded again
        only when it changed (P restarted) or the peer was forgotten after a failure."""
        params = job.params
        if len(job.peers) != params.tp_size:
            raise ValueError(f"the READ job carries {len(job.peers)} peer records for a "
                             f"prefill instance of TP {params.tp_size}")
        advert = job.peers[p_rank]
        want = agent_name(params.engine_id, p_rank)
        if (advert.engine_id, advert.rank) != (params.engine_id, p_rank):
            raise ValueError(f"side channel {params.side_channel} is engine "
                             f"{advert.engine_id!r} rank {advert.rank}, expected "
                             f"{params.engine_id!r} rank {p_rank}")
        if advert.compat_hash != self.ep.compat:
            raise ValueError("peer answered the handshake with another compatibility hash")
        with self._peers_lock:  # loading metadata is local (no network): never a long hold
            loaded = self._peers.get(want)
            if loaded is not None and loaded.metadata == advert.agent_metadata:
                return loaded.peer
            if loaded is not None:  # other metadata for that agent: P restarted
                self._drop(want)
            name = self.ep.agent.add_peer(advert.agent_metadata)
            if name != want:  # metadata of another agent
                if name not in self._peers:
                    self.ep.agent.remove_peer(name)
                raise ValueError(f"side channel {params.side_channel} sent the metadata of "
                                 f"agent {name!r}, not of {want!r}")
            peer = _Peer(name, advert.geometry, advert.device_id, advert.mem_type, advert.facts,
                         advert.ipc)
            self._peers[want] = _Loaded(advert.agent_metadata, peer)
            self.loads += 1
            return peer

    def _forget(self, agent: str) -> None:
        with self._peers_lock:
            self._drop(agent)

    def _drop(self, agent: str) -> None:  # under _peers_lock
        if self.ipc is not None:
            self.ipc.forget(agent)
        if self._peers.pop(agent, None) is not None:
            try:
                self.ep.agent.remove_peer(agent)
            except TransferError:
                pass

    # ---- progress ----------------------------------------------------------------------------
    def poll(self) -> list[ReadResult]:
        """Results decided since the last call whose blocks nothing can still write (once each)."""
        from hybridpd.disagg.nixl_agent import XferState

        self._collect_posted()
        now = time.monotonic()
        for rid, flight in list(self._inflight.items()):
            states = [self._state(h) for h in flight.handles]
            if all(s == XferState.DONE for s in states):
                self._finish(rid, flight, ReadOutcome.OK)
            elif any(s == XferState.FAILED for s in states):
                self._finish(rid, flight, ReadOutcome.FAILED,
                             "READ failed (peer died or refused the transfer)")
            elif now > flight.deadline:
                self._finish(rid, flight, ReadOutcome.TIMED_OUT,
                             f"READ timed out after {self.transfer_timeout_s:.1f}s")
        self._drain()
        done, self._done = self._done, []
        return done

    def _state(self, handle: Any) -> Any:
        from hybridpd.disagg.nixl_agent import XferState

        if handle is None:
            return XferState.DONE
        try:
            return self._backend(handle).poll(handle)
        except TransferError:
            return XferState.FAILED

    def _backend(self, handle: Any) -> Any:
        """What posted `handle`: the IPC copier or the NIXL agent (the same contract)."""
        if isinstance(handle, IpcHandle):
            assert self.ipc is not None
            return self.ipc
        return self.ep.agent

    def _finish(self, rid: str, flight: _InFlight, outcome: ReadOutcome, detail: str = "") -> None:
        del self._inflight[rid]
        self._settle(flight, outcome, detail)

    def cancel(self, request_id: str) -> None:
        """Stop the job without waiting; its result ("cancelled") comes from `poll`."""
        post = self._posting.get(request_id)
        if post is not None:
            post.cancelled.set()
            if post.future.cancel():  # not begun: nothing was posted
                del self._posting[request_id]
                self._done.append(ReadResult(request_id, ReadOutcome.CANCELLED))
            return  # otherwise `_collect_posted` releases it once the post completes
        flight = self._inflight.pop(request_id, None)
        if flight is not None:
            self._settle(flight, ReadOutcome.CANCELLED)

    # ---- releasing ---------------------------------------------------------------------------
    def _settle(self, flight: _InFlight, outcome: ReadOutcome, detail: str = "") -> None:
        """Decide the outcome, release the handles, report once none of them can write."""
        result = ReadResult(
            flight.job.request_id, outcome, detail, flight.nbytes, flight.descriptors,
            time.monotonic() - flight.started, flight.pair,
        )
        entry = _Draining([h for h in flight.handles if h is not None], result)
        self._draining.append(entry)
        self._drain_entry(entry)
        if outcome not in (ReadOutcome.OK, ReadOutcome.CANCELLED):
            for key in flight.peers:  # the peer may be gone or restarted: handshake again
                self._forget(key)

    def _drain(self) -> None:
        for entry in list(self._draining):
            self._drain_entry(entry)

    def _drain_entry(self, entry: _Draining) -> None:
        from hybridpd.disagg.nixl_agent import XferState

        entry.handles = [h for h in entry.handles if not self._released(h)]
        if entry.result is not None and all(
            self._state(h) == XferState.DONE for h in entry.handles
        ):
            self._done.append(entry.result)
            entry.result = None
        if not entry.handles:
            self._draining.remove(entry)
        elif not entry.warned:
            entry.warned = True
            log.warning("%d READ handle(s) could not be released; retrying on every poll%s",
                        len(entry.handles), "" if entry.result is None else
                        f" before reporting {entry.result.request_id}")

    def _released(self, handle: Any) -> bool:
        try:
            self._backend(handle).release(handle)
        except TransferError:
            return False
        return True

    @property
    def busy(self) -> bool:
        """Some job started here has not been reported by `poll` yet."""
        return bool(self._posting or self._inflight or self._done) or any(
            d.result is not None for d in self._draining
        )

    def close(self) -> None:
        for post in self._posting.values():
            post.cancelled.set()
        self._threads.shutdown(wait=True, cancel_futures=True)
        self._collect_posted()
        for rid in list(self._inflight):
            self.cancel(rid)
        self._drain()
