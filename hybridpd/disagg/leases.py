"""Leases on prefill-side blocks: P's lease table and ledger, D's confirmation call.

Owns `LeaseTable` (prefill side, engine thread: which hand-offs hold blocks for a remote reader,
until when, which readers have finished), `TransferLedger` (prefill side, thread-safe: the fate
of every recent hand-off, answered to D's final `confirm` on the side channel), and
`confirm_lease` (decode side: that question, with a deadline). Who calls them, on which thread
(renewals and releases included), is the transfer service's (`disagg/transfer_service.py`).

Everything is keyed by the hand-off's `transfer_id` (a fresh nonce per hand-off), never by the
client-chosen request id, so a stale notice or renewal about a reused request id is ignored.
A lease ends at the latest `max_lease_s` after it was issued, however often it is renewed; the
first notice of a hand-off fixes its reader and READ nonce, and the confirmation vouches only
for that READ (a replayed hand-off's second READ is never trusted). Renewals, releases and
confirmations travel on the authenticated side channel when the deployment has a secret.
Knows nothing of NIXL, tensors or the scheduler.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from hybridpd.disagg.errors import SideChannelError
from hybridpd.disagg.plan import readers_of_p_rank
from hybridpd.disagg.side_channel import side_channel_call

logger = logging.getLogger(__name__)
LEDGER_SIZE = 100_000
DEFAULT_MAX_LEASE_FACTOR = 6.0  # max lease lifetime, in lease periods, when not configured


class LeaseState(str, enum.Enum):
    HELD = "held"  # P holds the blocks; a READ now reads the request's state
    READ = "read"  # every reader notified; the blocks were freed after the reads landed
    EXPIRED = "expired"  # nobody renewed in time; the blocks were freed (and may be reused)
    RELEASED = "released"  # D or the client gave the blocks up; freed



def read_was_valid(state: LeaseState | None, completed_by: str | None, reader: str,
                   completed_nonce: str | None = None, nonce: str | None = None) -> bool:
    """Asked by `reader` after its READs landed: did P hold the blocks throughout? Yes if P
    still holds them, or freed them only after *this* reader's notices for *this* READ (the
    per-READ nonce), not another instance's, nor an earlier READ of the same hand-off (a
    replay: the blocks may since hold another request's state)."""
    return state == LeaseState.HELD or (
        state == LeaseState.READ and completed_by == reader and completed_nonce == nonce
    )


@dataclass(frozen=True)
class LedgerEntry:
    state: LeaseState
    reader: str | None  # the decode instance whose notices completed the hand-off
    nonce: str | None  # the per-READ nonce those notices carried


class TransferLedger:
    """Thread-safe, bounded record of recent hand-offs: state, completing reader and READ."""

    def __init__(self, size: int = LEDGER_SIZE) -> None:
        self._lock = threading.Lock()
        self._states: OrderedDict[str, LedgerEntry] = OrderedDict()
        self._size = size

    def set(self, transfer_id: str, state: LeaseState, reader: str | None = None,
            nonce: str | None = None) -> None:
        with self._lock:
            self._states[transfer_id] = LedgerEntry(state, reader, nonce)
            self._states.move_to_end(transfer_id)
            while len(self._states) > self._size:
                self._states.popitem(last=False)

    def get(self, transfer_id: str) -> tuple[LeaseState, str | None] | None:
        entry = self.entry(transfer_id)
        return None if entry is None else (entry.state, entry.reader)

    def entry(self, transfer_id: str) -> LedgerEntry | None:
        with self._lock:
            return self._states.get(transfer_id)

    def is_held(self, transfer_id: str) -> bool:
        entry = self.entry(transfer_id)
        return entry is not None and entry.state == LeaseState.HELD


@dataclass
class _Held:
    request_id: str
    deadline: float
    hard_deadline: float  # the maximum lifetime: renewals never extend past it
    reader: str | None = None  # the first decode instance to notify; others are ignored
    nonce: str | None = None  # the first notice's per-READ nonce; other READs are ignored
    seen: set[tuple[int, int]] = field(default_factory=set)  # (p_rank, d_rank) notices


class LeaseTable:
    """Prefill side. A hand-off leaves the table when all readers notified, on expiry (no
    renewal for `lease_s`, or `max_lease_s` after it was issued, renewed or not), on D's
    release or on abort; the ledger records which."""

    def __init__(self, lease_s: float, p_tp: int, ledger: TransferLedger | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 max_lease_s: float | None = None) -> None:
        self.lease_s = lease_s
        self.max_lease_s = max(lease_s, max_lease_s if max_lease_s is not None
                               else DEFAULT_MAX_LEASE_FACTOR * lease_s)
        self.p_tp = p_tp
        self.ledger = ledger or TransferLedger()
        self.clock = clock
        self._held: dict[str, _Held] = {}  # transfer id -> lease
        self._by_request: dict[str, str] = {}  # request id -> transfer id

    def hold(self, request_id: str, transfer_id: str) -> None:
        now = self.clock()
        self._held[transfer_id] = _Held(request_id, now + self.lease_s, now + self.max_lease_s)
        self._by_request[request_id] = transfer_id
        self.ledger.set(transfer_id, LeaseState.HELD)

    def renew(self, transfer_id: str) -> bool:
        held = self._held.get(transfer_id)
        if held is None:
            return False
        held.deadline = min(self.clock() + self.lease_s, held.hard_deadline)
        return True

    def notice(self, transfer_id: str, p_rank: int, d_rank: int, d_tp: int,
               reader: str = "", nonce: str = "") -> str | None:
        """D rank d_rank of instance `reader` finished READ `nonce` from P rank p_rank. Returns
        the request id once every expected rank of that reader and READ has notified (free the
        blocks)."""
        held = self._held.get(transfer_id)
        if held is None or held.reader not in (None, reader) or held.nonce not in (None, nonce):
            return None
        held.reader, held.nonce = reader, nonce
        held.seen.add((p_rank, d_rank))
        expected = {(p, d) for p in range(self.p_tp) for d in readers_of_p_rank(p, self.p_tp, d_tp)}
        if expected <= held.seen:
            return self._end(transfer_id, LeaseState.READ, reader, nonce)
        return None

    def release(self, transfer_id: str) -> str | None:
        """D gave up; returns the request id whose blocks to free (None if not held)."""
        return self._end(transfer_id, LeaseState.RELEASED) if transfer_id in self._held else None

    def abort(self, request_id: str) -> bool:
        transfer_id = self._by_request.get(request_id)
        return transfer_id is not None and self._end(transfer_id, LeaseState.RELEASED) is not None

    def expired(self) -> list[str]:
        now = self.clock()
        gone = [tid for tid, h in self._held.items() if h.deadline < now]
        return [self._end(tid, LeaseState.EXPIRED) for tid in gone]

    def _end(self, transfer_id: str, state: LeaseState, reader: str | None = None,
             nonce: str | None = None) -> str:
        held = self._held.pop(transfer_id)
        self._by_request.pop(held.request_id, None)
        self.ledger.set(transfer_id, state, reader, nonce)
        return held.request_id

    def holds_request(self, request_id: str) -> bool:
        return request_id in self._by_request

    def __len__(self) -> int:
        return len(self._held)


def confirm_lease(address: str, transfer_id: str, reader: str, timeout_s: float,
                  nonce: str | None = None, secret: str | None = None) -> tuple[bool, str]:
    """Decode side, after every READ landed: ask P rank 0 what became of the hand-off.
    Returns (the READ `nonce` can be trusted, P's answer in words); unreachable P: not trusted."""
    host, _, port = address.rpartition(":")
    try:
        resp = side_channel_call(host, int(port), {"type": "confirm", "transfer_id": transfer_id},
                                 timeout_s, secret=secret)
        raw = resp.get("state")
        state = None if raw is None else LeaseState(raw)
    except (SideChannelError, ValueError) as exc:
        return False, f"could not be asked ({exc})"
    completed_by, completed_nonce = resp.get("reader"), resp.get("nonce")
    if read_was_valid(state, completed_by, reader, completed_nonce, nonce):
        return True, "held"
    if state == LeaseState.READ and completed_by == reader:
        return False, "saw this hand-off read by an earlier READ (a replayed hand-off)"
    if state == LeaseState.READ:
        return False, f"gave the hand-off to another reader ({completed_by})"
    return False, f"reports the lease {state.value if state else 'unknown'}"
