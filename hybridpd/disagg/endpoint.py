"""One rank's transfer endpoint: its NIXL agent, its registered pool, its side channel.

Owns registering the rank's pool buffer once, answering side-channel requests (handshake:
protocol version, geometry, compatibility hash, NIXL metadata; renew / release of leases;
confirm: what became of a hand-off, from the prefill ledger), and turning NIXL notifications
into "D rank d of a D instance with TP t finished reading hand-off x" events. Prefill ranks use
it as is; decode ranks add `receiver.KVReceiver` on top. Knows nothing of the model, the
scheduler or requests beyond hand-off ids.
"""

from __future__ import annotations

import enum
import hashlib
import json
import queue
from dataclasses import dataclass
from typing import Any

import torch

from hybridpd.cache.geometry import CacheGeometry
from hybridpd.disagg.errors import TransferError
from hybridpd.disagg.leases import TransferLedger
from hybridpd.disagg.params import PeerGeometry
from hybridpd.disagg.side_channel import SideChannelServer, encode_bytes, error_response
from hybridpd.disagg.transport import local_facts

NOTIF_PREFIX = "hpd2"  # notification: "hpd2|<transfer_id>|<d_rank>|<d_tp>|<reader>"


@dataclass(frozen=True)
class ReadNotice:
    """A D rank of instance `reader` told this P rank it finished reading one hand-off."""

    transfer_id: str
    d_rank: int
    d_tp: int
    reader: str  # the decode instance's engine id


class ControlKind(str, enum.Enum):
    RENEW = "renew"  # D still wants the blocks
    RELEASE = "release"  # D will never read them


@dataclass(frozen=True)
class ControlMessage:
    kind: ControlKind
    transfer_ids: tuple[str, ...]


def encode_notice(transfer_id: str, d_rank: int, d_tp: int, reader: str) -> bytes:
    return f"{NOTIF_PREFIX}|{transfer_id}|{d_rank}|{d_tp}|{reader}".encode()


def decode_notice(raw: bytes) -> ReadNotice | None:
    """None for anything that is not one of our notices (never raises on peer bytes)."""
    try:
        prefix, tid, rank, tp, reader = raw.decode().split("|")
        if prefix != NOTIF_PREFIX:
            return None
        return ReadNotice(tid, int(rank), int(tp), reader)
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
    ) -> None:
        from hybridpd.disagg.nixl_agent import TransferAgent  # the only NIXL importer

        self.engine_id = engine_id
        self.rank = geometry.tp_rank
        self.agent = TransferAgent(f"{engine_id}-rank{self.rank}")
        self.region = self.agent.register(buffer)
        self.local = PeerGeometry.from_cache(geometry, num_blocks, self.region.base_addr)
        self.compat = compat_hash(geometry, model_fingerprint)
        self.facts = local_facts(buffer)  # advertised: D tells same GPU / host from its own
        self.control: queue.SimpleQueue[ControlMessage] = queue.SimpleQueue()
        self.ledger = TransferLedger()  # written by the prefill engine loop (rank 0)
        self.server = SideChannelServer(host, port, self._handle).start()
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
            self.control.put(ControlMessage(ControlKind(kind), tuple(ids)))
            return {}
        if kind == "confirm":
            entry = self.ledger.get(str(msg.get("transfer_id")))
            if entry is None:
                return {"state": None, "reader": None}
            return {"state": entry[0].value, "reader": entry[1]}
        return error_response(f"unknown side-channel request type {kind!r}")

    def _handshake(self, msg: dict[str, Any]) -> dict[str, Any]:
        theirs = msg.get("compat_hash")
        if theirs != self.compat:
            return error_response(
                f"compatibility hash mismatch (ours {self.compat[:12]}, theirs "
                f"{str(theirs)[:12]}): the instances differ in model, dtypes or cache layout"
            )
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
        out = []
        try:
            notifs = self.agent.get_notifs()
        except TransferError:
            return out
        for msgs in notifs.values():
            out.extend(n for n in map(decode_notice, msgs) if n is not None)
        return out

    def control_messages(self) -> list[ControlMessage]:
        out = []
        while True:
            try:
                out.append(self.control.get_nowait())
            except queue.Empty:
                return out

    def close(self) -> None:
        self.server.stop()
        self.agent.close()
