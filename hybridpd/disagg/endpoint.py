"""One rank's transfer endpoint: its NIXL agent, its registered pool, its side channel.

Owns registering the rank's pool buffer once, answering side-channel requests (handshake:
protocol version, geometry, compatibility hash, NIXL metadata; renew / release of leases;
confirm: what became of a hand-off, from the prefill ledger), and turning NIXL notifications
into "D rank d of a D instance with TP t finished reading hand-off x" events. Prefill ranks use
it as is; decode ranks add `receiver.KVReceiver` on top. Knows nothing of the model, the
scheduler or requests beyond hand-off ids.

Trust (with a deployment secret every side-channel frame is authenticated, see
`side_channel.py`): metadata and the pool address go only to authenticated handshakes; a
handshake names the peer's NIXL agent (decode ranks, whose pools nobody reads, answer no
handshake at all), and only notices *sent by* such an agent, naming that
agent as their reader and carrying a MAC under the deployment secret, are believed
(`read_notices`). Renew / release messages are queued only
for hand-offs the ledger says are held, into a bounded queue (oldest dropped), so nothing grows
while the engine has no lease to drain it for.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
import logging
import threading
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any

import torch

from hybridpd.cache.geometry import CacheGeometry
from hybridpd.disagg.auth import KeyPurpose, derive_key, mac
from hybridpd.disagg.errors import TransferError
from hybridpd.disagg.leases import TransferLedger
from hybridpd.disagg.params import PeerGeometry
from hybridpd.disagg.side_channel import (
    RateLimitedLog,
    SideChannelServer,
    encode_bytes,
    error_response,
)
from hybridpd.disagg.transport import local_facts

NOTIF_PREFIX = "hpd3"  # "hpd3|<transfer_id>|<d_rank>|<d_tp>|<reader>|<nonce>|<mac>"
CONTROL_QUEUE_MAX = 1024  # renew / release messages waiting for the engine loop
MAX_IDS_PER_MESSAGE = 4096
KNOWN_AGENTS_MAX = 4096
SIDE_CHANNEL_CONNECTIONS = 64
SIDE_CHANNEL_PER_PEER = 32  # connections from one address at once
log = logging.getLogger("hybridpd.transfer")


def agent_name(engine_id: str, rank: int) -> str:
    """The NIXL agent name of one rank of an instance (what its notices are sent from)."""
    return f"{engine_id}-rank{rank}"


@dataclass(frozen=True)
class ReadNotice:
    """A D rank of instance `reader` told this P rank it finished READ `nonce` of a hand-off."""

    transfer_id: str
    d_rank: int
    d_tp: int
    reader: str  # the decode instance's engine id
    nonce: str = ""  # the per-READ nonce (D's confirmation names it too)


class ControlKind(str, enum.Enum):
    RENEW = "renew"  # D still wants the blocks
    RELEASE = "release"  # D will never read them


@dataclass(frozen=True)
class ControlMessage:
    kind: ControlKind
    transfer_ids: tuple[str, ...]


def notice_key(secret: str | None) -> bytes | None:
    return None if not secret else derive_key(secret, KeyPurpose.NOTICE)


def encode_notice(transfer_id: str, d_rank: int, d_tp: int, reader: str,
                  nonce: str = "", key: bytes | None = None) -> bytes:
    """The notification a D rank posts with its READ; with a key it carries a MAC."""
    body = f"{NOTIF_PREFIX}|{transfer_id}|{d_rank}|{d_tp}|{reader}|{nonce}"
    tag = mac(key, body.encode()).hex() if key is not None else ""
    return f"{body}|{tag}".encode()


def decode_notice(raw: bytes, key: bytes | None = None) -> ReadNotice | None:
    """None for anything that is not one of our notices, or (with a key) whose MAC is not
    ours; never raises on peer bytes."""
    try:
        body, _, tag = raw.decode().rpartition("|")
        prefix, tid, rank, tp, reader, nonce = body.split("|")
        if prefix != NOTIF_PREFIX:
            return None
        if key is not None and not hmac.compare_digest(tag, mac(key, body.encode()).hex()):
            return None
        return ReadNotice(tid, int(rank), int(tp), reader, nonce)
    except (UnicodeDecodeError, ValueError):
        return None


def compat_hash(geometry: CacheGeometry, model_fingerprint: str) -> str:
    """Everything that changes the bytes: the geometry's key plus the model's identity."""
    blob = json.dumps([geometry.compat_key(), model_fingerprint], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


class KVEndpoint:
    def __init__(
        self,
        engine_id: str,
        geometry: CacheGeometry,
        num_blocks: int,
        buffer: torch.Tensor,  # the rank's whole pool: uint8 (num_blocks, S, page_bytes)
        host: str,
        port: int,
        model_fingerprint: str,
        secret: str | None = None,
        serves_reads: bool = True,
    ) -> None:
        from hybridpd.disagg.nixl_agent import TransferAgent  # the only NIXL importer

        self.engine_id = engine_id
        self.rank = geometry.tp_rank
        self.secret = secret
        self.notice_key = notice_key(secret)  # notices are MACed: sniffed metadata forges none
        self.serves_reads = serves_reads  # False (decode ranks): nobody may READ this pool
        self.agent = TransferAgent(agent_name(engine_id, self.rank))
        self.region = self.agent.register(buffer)
        self.local = PeerGeometry.from_cache(geometry, num_blocks, self.region.base_addr)
        self.compat = compat_hash(geometry, model_fingerprint)
        self.facts = local_facts(buffer)  # advertised: D tells same GPU / host from its own
        self._control: deque[ControlMessage] = deque(maxlen=CONTROL_QUEUE_MAX)
        self._control_lock = threading.Lock()
        self._known_agents: OrderedDict[str, None] = OrderedDict()  # handshaken peer agents
        self._agents_lock = threading.Lock()
        self.ledger = TransferLedger()  # written by the prefill engine loop (rank 0)
        self.counters = {"notices_refused": 0, "control_ignored": 0}
        self._refusals = RateLimitedLog(log)
        self.server = SideChannelServer(host, port, self._handle, secret=secret,
                                         max_connections=SIDE_CHANNEL_CONNECTIONS,
                                         max_per_peer=SIDE_CHANNEL_PER_PEER).start()
        self.host = host

    @property
    def address(self) -> str:
        return f"{self.host}:{self.server.port}"

    # ---- side channel (runs on the server's threads) ---------------------------------------
    def _handle(self, msg: dict[str, Any]) -> dict[str, Any]:
        kind = msg.get("type")
        if kind == "handshake":
            return self._handshake(msg)
        if kind in (ControlKind.RENEW.value, ControlKind.RELEASE.value):
            ids = msg.get("transfer_ids")
            if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
                return error_response("transfer_ids must be a list of strings")
            if len(ids) > MAX_IDS_PER_MESSAGE:
                return error_response(f"at most {MAX_IDS_PER_MESSAGE} transfer_ids per message")
            held = tuple(dict.fromkeys(i for i in ids if self.ledger.is_held(i)))
            self.counters["control_ignored"] += len(ids) - len(held)
            if held:
                with self._control_lock:
                    if len(self._control) >= CONTROL_QUEUE_MAX // 2:
                        self._prune_control()
                    self._control.append(ControlMessage(ControlKind(kind), held))
            return {}
        if kind == "confirm":
            entry = self.ledger.entry(str(msg.get("transfer_id")))
            if entry is None:
                return {"state": None, "reader": None, "nonce": None}
            return {"state": entry.state.value, "reader": entry.reader, "nonce": entry.nonce}
        return error_response(f"unknown side-channel request type {kind!r}")

    def _handshake(self, msg: dict[str, Any]) -> dict[str, Any]:
        if not self.serves_reads:
            return error_response("this rank's pool is not readable by peers (decode role)")
        theirs = msg.get("compat_hash")
        if theirs != self.compat:
            return error_response(
                f"compatibility hash mismatch (ours {self.compat[:12]}, theirs "
                f"{str(theirs)[:12]}): the instances differ in model, dtypes or cache layout"
            )
        peer_agent = msg.get("agent_name")
        if isinstance(peer_agent, str) and 0 < len(peer_agent) <= 256:
            with self._agents_lock:
                self._known_agents[peer_agent] = None
                self._known_agents.move_to_end(peer_agent)
                while len(self._known_agents) > KNOWN_AGENTS_MAX:
                    self._known_agents.popitem(last=False)
        return {
            "engine_id": self.engine_id,
            "rank": self.rank,
            "compat_hash": self.compat,
            "geometry": self.local.to_dict(),
            "device_id": self.region.device_id,
            "mem_type": self.region.mem_type.value,
            "agent_metadata": encode_bytes(self.agent.metadata()),
            "transport_facts": self.facts.to_dict(),
        }

    # ---- engine-loop side ------------------------------------------------------------------
    def read_notices(self) -> list[ReadNotice]:
        out: list[ReadNotice] = []
        try:
            notifs = self.agent.get_notifs()
        except TransferError:
            return out
        for sender, msgs in notifs.items():
            for raw in msgs:
                notice = decode_notice(raw, self.notice_key)
                if notice is None:
                    if raw.startswith(NOTIF_PREFIX.encode()):
                        self.counters["notices_refused"] += 1
                        self._refusals.warning("ignored a notice from agent %r: bad MAC",
                                               sender)
                    continue
                if self._believed(sender, notice):
                    out.append(notice)
                else:
                    self.counters["notices_refused"] += 1
                    self._refusals.warning(
                        "ignored a notice about %s from agent %r (not the handshaken agent of "
                        "reader %r rank %d)", notice.transfer_id, sender, notice.reader,
                        notice.d_rank)
        return out

    def _believed(self, sender: str, notice: ReadNotice) -> bool:
        """Only the agent that handshook with us, speaking for itself."""
        if sender != agent_name(notice.reader, notice.d_rank):
            return False
        with self._agents_lock:
            return sender in self._known_agents

    def _prune_control(self) -> None:  # under _control_lock
        """Drop what no longer concerns a held hand-off (the engine may not be draining)."""
        kept = []
        for msg in self._control:
            ids = tuple(i for i in msg.transfer_ids if self.ledger.is_held(i))
            if ids:
                kept.append(ControlMessage(msg.kind, ids))
        self._control.clear()
        self._control.extend(kept)

    def control_messages(self) -> list[ControlMessage]:
        with self._control_lock:
            out = list(self._control)
            self._control.clear()
        return out

    def close(self) -> None:
        self.server.stop()
        self.agent.close()
