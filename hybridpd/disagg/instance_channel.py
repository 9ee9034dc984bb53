"""The instance's side channel: the ONE side-channel server of a P/D instance, on rank 0.

Owned and built by the instance's transfer service (`disagg/transfer_service.py`); the ranks'
endpoints open no socket. Answers, for every rank of the instance:
- `handshake` (`{"compat_hash", "agents": [the caller's rank agents]}`): every rank's
  `RankAdvert` (gathered from the ranks at start-up), `{"engine_id", "tp_size", "ranks":
  [...]}` — only to an authenticated caller (with a deployment secret every frame is,
  `side_channel.py`), only with a matching compatibility hash, never on a decode instance
  (nobody may READ its pools). The caller's NIXL agents become *known*: the transfer service
  believes notices only from agents that handshook here (`knows`).
- `renew` / `release` (`transfer_ids`): queued for the engine thread (`control_messages`,
  drained by the service), only for hand-offs the ledger says are held, into a bounded queue
  (pruned of what ended, oldest dropped), so nothing grows while no lease drains it.
- `confirm` (`transfer_id`): what became of a hand-off, from the service's `TransferLedger`.
Runs on the server's connection threads; thread-safe. Knows nothing of NIXL, tensors, the
scheduler or the engine.
"""

from __future__ import annotations

import enum
import logging
import threading
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from hybridpd.disagg.endpoint import RankAdvert
from hybridpd.disagg.leases import TransferLedger
from hybridpd.disagg.side_channel import SideChannelServer, error_response

CONTROL_QUEUE_MAX = 1024  # renew / release messages waiting for the engine loop
MAX_IDS_PER_MESSAGE = 4096
KNOWN_AGENTS_MAX = 4096
SIDE_CHANNEL_CONNECTIONS = 64
SIDE_CHANNEL_PER_PEER = 32  # connections from one address at once
MAX_AGENT_NAME = 256
MAX_AGENTS_PER_HANDSHAKE = 64  # a decode instance's ranks
log = logging.getLogger("hybridpd.transfer")


class ControlKind(str, enum.Enum):
    RENEW = "renew"  # D still wants the blocks
    RELEASE = "release"  # D will never read them


@dataclass(frozen=True)
class ControlMessage:
    kind: ControlKind
    transfer_ids: tuple[str, ...]


class InstanceSideChannel:
    def __init__(self, engine_id: str, adverts: Sequence[RankAdvert], host: str, port: int,
                 ledger: TransferLedger, *, secret: str | None = None,
                 serves_reads: bool = True) -> None:
        if [a.rank for a in adverts] != list(range(len(adverts))) or not adverts:
            raise ValueError("the side channel needs one advert per rank, in rank order")
        if any(a.engine_id != engine_id for a in adverts):
            raise ValueError("every rank's advert must name this instance")
        if len({a.compat_hash for a in adverts}) != 1:
            raise ValueError("every rank's advert must carry one compatibility hash")
        self.engine_id = engine_id
        self.adverts = tuple(adverts)
        self.ledger = ledger
        self.serves_reads = serves_reads  # False (decode role): nobody may READ these pools
        self.counters = {"control_ignored": 0}
        self._control: deque[ControlMessage] = deque(maxlen=CONTROL_QUEUE_MAX)
        self._control_lock = threading.Lock()
        self._known: OrderedDict[str, None] = OrderedDict()  # handshaken peer agents
        self._known_lock = threading.Lock()
        self.host = host
        self.server = SideChannelServer(host, port, self._handle, secret=secret,
                                        max_connections=SIDE_CHANNEL_CONNECTIONS,
                                        max_per_peer=SIDE_CHANNEL_PER_PEER).start()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.server.port}"

    # ---- requests (the server's threads) ---------------------------------------------------
    def _handle(self, msg: dict[str, Any]) -> dict[str, Any]:
        kind = msg.get("type")
        if kind == "handshake":
            return self._handshake(msg)
        if kind in (ControlKind.RENEW.value, ControlKind.RELEASE.value):
            return self._queue_control(ControlKind(kind), msg.get("transfer_ids"))
        if kind == "confirm":
            entry = self.ledger.entry(str(msg.get("transfer_id")))
            if entry is None:
                return {"state": None, "reader": None, "nonce": None}
            return {"state": entry.state.value, "reader": entry.reader, "nonce": entry.nonce}
        return error_response(f"unknown side-channel request type {kind!r}")

    def _handshake(self, msg: dict[str, Any]) -> dict[str, Any]:
        if not self.serves_reads:
            return error_response("this instance's pools are not readable by peers "
                                  "(decode role)")
        ours = self.adverts[0].compat_hash
        theirs = msg.get("compat_hash")
        if theirs != ours:
            return error_response(
                f"compatibility hash mismatch (ours {ours[:12]}, theirs "
                f"{str(theirs)[:12]}): the instances differ in model, dtypes or cache layout"
            )
        agents = msg.get("agents")
        if not isinstance(agents, list) or not 0 < len(agents) <= MAX_AGENTS_PER_HANDSHAKE or \
                not all(isinstance(a, str) and 0 < len(a) <= MAX_AGENT_NAME for a in agents):
            return error_response(f'handshake needs "agents": 1 to {MAX_AGENTS_PER_HANDSHAKE} '
                                  f"NIXL agent names of at most {MAX_AGENT_NAME} characters")
        with self._known_lock:
            for agent in agents:
                self._known[agent] = None
                self._known.move_to_end(agent)
            while len(self._known) > KNOWN_AGENTS_MAX:
                self._known.popitem(last=False)
        return {"engine_id": self.engine_id, "tp_size": len(self.adverts), "compat_hash": ours,
                "ranks": [a.handshake_answer() for a in self.adverts]}

    def _queue_control(self, kind: ControlKind, ids: Any) -> dict[str, Any]:
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            return error_response("transfer_ids must be a list of strings")
        if len(ids) > MAX_IDS_PER_MESSAGE:
            return error_response(f"at most {MAX_IDS_PER_MESSAGE} transfer_ids per message")
        held = tuple(dict.fromkeys(i for i in ids if self.ledger.is_held(i)))
        with self._control_lock:
            self.counters["control_ignored"] += len(ids) - len(held)
            if held:
                if len(self._control) >= CONTROL_QUEUE_MAX // 2:
                    self._prune_control()
                self._control.append(ControlMessage(kind, held))
        return {}

    def _prune_control(self) -> None:  # under _control_lock
        """Drop what no longer concerns a held hand-off (the engine may not be draining)."""
        kept = []
        for msg in self._control:
            ids = tuple(i for i in msg.transfer_ids if self.ledger.is_held(i))
            if ids:
                kept.append(ControlMessage(msg.kind, ids))
        self._control.clear()
        self._control.extend(kept)

    # ---- the transfer service's side -------------------------------------------------------
    def control_messages(self) -> list[ControlMessage]:
        """Renew / release messages received since the last call."""
        with self._control_lock:
            out = list(self._control)
            self._control.clear()
        return out

    def knows(self, agent: str) -> bool:
        """Did NIXL agent `agent` handshake with this instance (recently)?"""
        with self._known_lock:
            return agent in self._known

    def close(self) -> None:
        self.server.stop()
