"""The transfer service: one per instance, on rank 0 beside the engine, the P/D control plane.

Owns, on ONE small thread pool, everything of a hand-off that is not moving bytes:
- the instance's one side-channel server (`open_side_channel` builds the
  `InstanceSideChannel`, `disagg/instance_channel.py`, from every rank's `RankAdvert`): it
  answers handshakes for every rank, D's renewals and releases, confirmations; the ranks'
  endpoints open no socket;
- prefill side: the lease table (`LeaseTable`) and the `TransferLedger` it writes (the side
  channel answers `confirm` from it), the renew / release messages the side channel queued
  (drained in `ended`, never through the per-step executor call), and which notices are
  believed: only those of NIXL agents that handshook with this instance (`notice`; every
  rank's notices reach rank 0 in the step's report, so one set on rank 0 decides for all);
- decode side: the handshakes with P instances (`peer` → a Future of every P rank's
  `RankAdvert`: one handshake per P instance, shared by every request that needs it, a failed
  or forgotten one made again; the records reach the workers inside the READ jobs of the
  step's transfer command), renewing the leases of hand-offs still waiting (a renewal round
  every `period_s / 2`, one call per P address, each with a deadline), the releases, and the
  confirmations (`confirm` → a Future of `confirm_lease`'s answer).
The workers keep only the data plane: register memory, load a peer's NIXL metadata once, post
READs, poll them, read notices.
Leases are asked on the engine thread (`hold`, `notice`, `ended`, `abort`); watch / unwatch /
confirm may be called from any thread. Every call to a peer has a deadline. Knows nothing of
NIXL, tensors, requests' tokens, the scheduler or the engine.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol

from hybridpd.disagg.endpoint import RankAdvert, ReadNotice, agent_name
from hybridpd.disagg.errors import SideChannelError
from hybridpd.disagg.instance_channel import ControlKind, ControlMessage, InstanceSideChannel
from hybridpd.disagg.leases import LeaseState, LeaseTable, TransferLedger, confirm_lease
from hybridpd.disagg.side_channel import RateLimitedLog, side_channel_call

log = logging.getLogger(__name__)
POOL_THREADS = 4  # the renewal round, plus calls to peers (handshakes, renewals, confirmations...)
CALL_TIMEOUT_S = 1.0  # a renewal or release to one P
CONFIRM_TIMEOUT_S = 2.0
HANDSHAKE_TIMEOUT_S = 5.0  # the default; the engine passes --handshake-timeout
_instances = itertools.count()


class ControlChannel(Protocol):
    """What the service reads of its side channel (`InstanceSideChannel`; a fake in tests)."""

    @property
    def address(self) -> str: ...

    def control_messages(self) -> list[ControlMessage]: ...

    def knows(self, agent: str) -> bool: ...

    def close(self) -> None: ...


class TransferService:
    def __init__(self, *, lease_s: float, p_tp: int, reader: str,
                 max_lease_s: float | None = None, secret: str | None = None,
                 channel: ControlChannel | None = None,
                 renew_period_s: float | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 threads: int = POOL_THREADS,
                 handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S) -> None:
        self.ledger = TransferLedger()  # the fate of recent hand-offs (P), what `confirm` reads
        self.leases = LeaseTable(lease_s, p_tp, ledger=self.ledger, clock=clock,
                                 max_lease_s=max_lease_s)
        self.reader = reader  # this instance's engine id: the reader P's ledger names
        self.renew_period_s = renew_period_s or max(0.2, lease_s / 3)
        self._secret = secret
        self.channel = channel  # None: no side channel (nothing handshook, nothing believed)
        self.handshake_timeout_s = handshake_timeout_s
        self._local: tuple[RankAdvert, ...] = ()  # this instance's ranks (its handshakes' side)
        self._peers: dict[tuple[str, str, int], Future[tuple[RankAdvert, ...]]] = {}
        self.counters = {"notices_refused": 0}
        self._refusals = RateLimitedLog(log)
        self.thread_prefix = f"kv-service-{next(_instances)}"  # names this service's threads
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=self.thread_prefix)
        self._lock = threading.Lock()
        self._watched: dict[str, tuple[str, str]] = {}  # request id -> (P address, transfer id)
        self._stop = threading.Event()
        self._round: Future[None] | None = None  # the renewal loop, started on first watch
        self.calls: dict[str, int] = {"renew": 0, "release": 0, "confirm": 0, "handshake": 0}

    # ---- the side channel --------------------------------------------------------------------
    def open_side_channel(self, engine_id: str, adverts: Sequence[RankAdvert], host: str,
                          port: int, serves_reads: bool) -> str:
        """Open the instance's one side channel (answering for every rank's advert, from this
        service's ledger); returns its bound host:port."""
        if self.channel is not None:
            raise RuntimeError("the transfer service's side channel is already open")
        channel = InstanceSideChannel(engine_id, adverts, host, port, self.ledger,
                                      secret=self._secret, serves_reads=serves_reads)
        self.channel = channel
        self._local = tuple(adverts)
        return channel.address

    @property
    def address(self) -> str | None:
        """The side channel's host:port (None before `open_side_channel`)."""
        return None if self.channel is None else self.channel.address

    # ---- prefill side (engine thread) --------------------------------------------------------
    def hold(self, request_id: str, transfer_id: str) -> None:
        self.leases.hold(request_id, transfer_id)

    def notice(self, transfer_id: str, p_rank: int, d_rank: int, d_tp: int, reader: str,
               nonce: str) -> str | None:
        """A reader's notice (read and MAC-checked by P rank `p_rank`'s worker); believed only
        when the agent that sent it handshook with this instance. The request id once every
        reader notified."""
        if not self._known(agent_name(reader, d_rank), transfer_id):
            return None
        return self.leases.notice(transfer_id, p_rank, d_rank, d_tp, reader, nonce)

    def believes(self, notice: ReadNotice) -> bool:
        """Did the agent that sent `notice` handshake with this instance? (counted if not)"""
        return self._known(notice.agent, notice.transfer_id)

    def _known(self, agent: str, transfer_id: str) -> bool:
        if self.channel is not None and self.channel.knows(agent):
            return True
        self.counters["notices_refused"] += 1
        self._refusals.warning("ignored a notice about %s from agent %r: it never handshook "
                               "with this instance", transfer_id, agent)
        return False

    def ended(self) -> list[tuple[str, LeaseState]]:
        """Apply the control messages on rank 0's side channel (renewals extend, releases
        end) and the expiries; returns the requests whose lease ended since the last call,
        with how (RELEASED by D, EXPIRED). A lease that every reader notified ends in
        `notice`, an aborted one in `abort`."""
        out: list[tuple[str, LeaseState]] = []
        ch = self.channel
        for msg in ch.control_messages() if ch is not None and len(self.leases) else ():
            for tid in msg.transfer_ids:
                if msg.kind == ControlKind.RENEW:
                    self.leases.renew(tid)
                    continue
                rid = self.leases.release(tid)
                if rid is not None:
                    out.append((rid, LeaseState.RELEASED))
        out += [(rid, LeaseState.EXPIRED) for rid in self.leases.expired()]
        return out

    def abort(self, request_id: str) -> bool:
        """End the lease of an aborted request; False when it holds none."""
        return self.leases.abort(request_id)

    def holds(self, request_id: str) -> bool:
        return self.leases.holds_request(request_id)

    def num_leases(self) -> int:
        return len(self.leases)

    # ---- decode side (any thread) ------------------------------------------------------------
    def watch(self, request_id: str, address: str, transfer_id: str) -> None:
        """Renew this hand-off's lease at `address` until `unwatch`."""
        with self._lock:
            self._watched[request_id] = (address, transfer_id)
            if self._round is None and not self._stop.is_set():
                self._round = self._pool.submit(self._renew_loop)

    def unwatch(self, request_id: str, release: bool = False) -> None:
        """Stop renewing; with release=True tell P it may free the blocks now."""
        with self._lock:
            entry = self._watched.pop(request_id, None)
        if release and entry is not None:
            self._submit(self._send, "release", entry[0], [entry[1]])

    def watching(self) -> int:
        with self._lock:
            return len(self._watched)

    def peer(self, engine_id: str, address: str, tp_size: int
             ) -> Future[tuple[RankAdvert, ...]]:
        """Every rank's record of P instance `engine_id` (TP `tp_size`) at `address`, from one
        handshake on the pool (with a deadline) shared by every caller; a failed handshake is
        made again by the next caller, and so is a forgotten one (`forget_peer`)."""
        key = (engine_id, address, tp_size)
        with self._lock:
            fut = self._peers.get(key)
            if fut is not None and not (fut.done() and (fut.cancelled() or fut.exception())):
                return fut
            try:
                if self._stop.is_set():
                    raise RuntimeError("closed")
                fut = self._pool.submit(self._handshake, engine_id, address, tp_size)
            except RuntimeError:  # closed (the pool refuses new work)
                fut = Future()
                fut.set_exception(SideChannelError("the transfer service is closed"))
                return fut
            self.calls["handshake"] += 1
            self._peers[key] = fut
            return fut

    def forget_peer(self, engine_id: str, address: str) -> None:
        """Handshake again next time (a READ from that P failed: it may have restarted)."""
        with self._lock:
            for key in [k for k in self._peers if k[:2] == (engine_id, address)]:
                del self._peers[key]

    def _handshake(self, engine_id: str, address: str, tp_size: int
                   ) -> tuple[RankAdvert, ...]:
        if not self._local:
            raise SideChannelError("this instance has no side channel: it cannot handshake")
        ours = self._local[0].compat_hash
        host, _, port = address.rpartition(":")
        resp = side_channel_call(
            host, int(port),
            {"type": "handshake", "compat_hash": ours, "agents": [a.agent for a in self._local]},
            self.handshake_timeout_s, secret=self._secret)
        if resp.get("compat_hash") != ours:
            raise ValueError("peer answered the handshake with another compatibility hash")
        if resp.get("engine_id") != engine_id or resp.get("tp_size") != tp_size:
            raise ValueError(
                f"side channel {address} is engine {resp.get('engine_id')!r} with TP "
                f"{resp.get('tp_size')!r}, expected {engine_id!r} with TP {tp_size}")
        ranks = resp.get("ranks")
        if not isinstance(ranks, list) or len(ranks) != tp_size:
            raise ValueError(f"side channel {address} answered no record per rank")
        out = tuple(RankAdvert.from_answer(r) for r in ranks)
        for r, a in enumerate(out):
            if (a.engine_id, a.rank, a.compat_hash) != (engine_id, r, ours):
                raise ValueError(f"side channel {address}'s record {r} is engine "
                                 f"{a.engine_id!r} rank {a.rank}, expected {engine_id!r} rank {r}")
        return out

    def confirm(self, address: str, transfer_id: str, nonce: str) -> Future[tuple[bool, str]]:
        """Ask P rank 0 (on the pool, with a deadline) whether READ `nonce` of the hand-off can
        be trusted: (trusted, P's answer in words)."""
        with self._lock:
            self.calls["confirm"] += 1
        return self._pool.submit(confirm_lease, address, transfer_id, self.reader,
                                 CONFIRM_TIMEOUT_S, nonce, self._secret)

    def renew_now(self) -> None:
        """One renewal round: every watched hand-off, one call per P address."""
        with self._lock:
            pairs = list(self._watched.values())
        by_address: dict[str, list[str]] = {}
        for address, tid in pairs:
            by_address.setdefault(address, []).append(tid)
        for address, ids in by_address.items():
            self._submit(self._send, "renew", address, ids)

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.renew_period_s / 2):
            self.renew_now()

    def _submit(self, fn: Callable[..., None], *args: object) -> None:
        if not self._stop.is_set():
            self._pool.submit(fn, *args)

    def _send(self, kind: str, address: str, transfer_ids: list[str]) -> None:
        with self._lock:
            self.calls[kind] += 1
        host, _, port = address.rpartition(":")
        try:
            side_channel_call(host, int(port), {"type": kind, "transfer_ids": transfer_ids},
                              CALL_TIMEOUT_S, secret=self._secret)
        except (SideChannelError, ValueError) as exc:
            log.info("lease %s to %s failed: %s", kind, address, exc)

    def close(self) -> None:
        self._stop.set()
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self.channel is not None:
            self.channel.close()
