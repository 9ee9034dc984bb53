"""Leases on prefill-side blocks: P's table of held requests, D's renewal thread.

Owns `LeaseTable` (prefill side, pure bookkeeping: which requests hold blocks for a remote
reader, until when, and which readers have finished) and `LeaseRenewer` (decode side: a daemon
thread that renews the leases of requests still waiting for their state and delivers release
messages, every call with a deadline). Knows nothing of NIXL, tensors or the scheduler.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from hybridpd.disagg.errors import SideChannelError
from hybridpd.disagg.plan import readers_of_p_rank
from hybridpd.disagg.side_channel import side_channel_call

logger = logging.getLogger(__name__)


@dataclass
class _Held:
    deadline: float
    p_tp: int
    seen: set[tuple[int, int]] = field(default_factory=set)  # (p_rank, d_rank) notices
    d_tp: int | None = None


class LeaseTable:
    """Prefill side. A request leaves the table when all readers notified, on expiry or abort."""

    def __init__(self, lease_s: float, p_tp: int, clock: Callable[[], float] = time.monotonic):
        self.lease_s = lease_s
        self.p_tp = p_tp
        self.clock = clock
        self._held: dict[str, _Held] = {}

    def hold(self, request_id: str) -> None:
        self._held[request_id] = _Held(self.clock() + self.lease_s, self.p_tp)

    def renew(self, request_id: str) -> bool:
        held = self._held.get(request_id)
        if held is None:
            return False
        held.deadline = self.clock() + self.lease_s
        return True

    def notice(self, request_id: str, p_rank: int, d_rank: int, d_tp: int) -> bool:
        """Record that D rank d_rank finished reading from P rank p_rank. True: all done."""
        held = self._held.get(request_id)
        if held is None:
            return False
        held.d_tp = d_tp
        held.seen.add((p_rank, d_rank))
        expected = {
            (p, d) for p in range(held.p_tp) for d in readers_of_p_rank(p, held.p_tp, d_tp)
        }
        if expected <= held.seen:
            del self._held[request_id]
            return True
        return False

    def drop(self, request_id: str) -> bool:
        return self._held.pop(request_id, None) is not None

    def expired(self) -> list[str]:
        now = self.clock()
        gone = [rid for rid, h in self._held.items() if h.deadline < now]
        for rid in gone:
            del self._held[rid]
        return gone

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._held

    def __len__(self) -> int:
        return len(self._held)


class LeaseRenewer:
    """Decode side. Renews, every `period_s`, the leases of requests still waiting."""

    def __init__(self, period_s: float, timeout_s: float = 1.0) -> None:
        self.period_s = period_s
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._waiting: dict[str, str] = {}  # request id -> P rank 0 side channel "host:port"
        self._releases: list[tuple[str, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lease-renewer", daemon=True)
        self._thread.start()

    def watch(self, request_id: str, address: str) -> None:
        with self._lock:
            self._waiting[request_id] = address

    def unwatch(self, request_id: str, release: bool = False) -> None:
        """Stop renewing; with release=True also tell P it may free the blocks now."""
        with self._lock:
            address = self._waiting.pop(request_id, None)
            if release and address is not None:
                self._releases.append((request_id, address))

    def _run(self) -> None:
        while not self._stop.wait(self.period_s / 2):
            with self._lock:
                waiting = dict(self._waiting)
                releases, self._releases = self._releases, []
            self._send("release", _by_address(releases))
            self._send("renew", _by_address(list(waiting.items())))

    def _send(self, kind: str, by_addr: dict[str, list[str]]) -> None:
        for address, ids in by_addr.items():
            host, _, port = address.rpartition(":")
            try:
                side_channel_call(
                    host, int(port), {"type": kind, "request_ids": ids}, self.timeout_s
                )
            except (SideChannelError, ValueError) as exc:
                logger.info("lease %s to %s failed: %s", kind, address, exc)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _by_address(pairs: list[tuple[str, str]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for rid, address in pairs:
        out.setdefault(address, []).append(rid)
    return out
