"""One rank's transfer endpoint, the data plane: its NIXL agent, its registered pool, its notices.

Owns registering the rank's pool buffer once, what a peer's handshake needs of this rank
(`RankAdvert`: NIXL agent metadata, `PeerGeometry`, device, transport facts, compatibility
hash; gathered to rank 0 at start-up, answered there by the instance's side channel,
`disagg/instance_channel.py`, which the transfer service owns), and turning NIXL notifications
into "D rank d of a D instance with TP t finished reading hand-off x" events. Prefill ranks use
it as is; decode ranks add `receiver.KVReceiver` on top. Opens no socket and answers nobody:
the side channel, the ledger, leases and the set of handshaken agents are rank 0's transfer
service's. Knows nothing of the model, the scheduler or requests beyond hand-off ids.

Trust: notices carry a MAC under the deployment secret and name their reader; `read_notices`
keeps only those whose MAC is ours and whose NIXL sender is the agent of the reader rank they
name (an agent speaking for itself). Whether that agent handshook with this instance is
decided by the transfer service, which sees every rank's notices in the step's report
(`TransferService.notice`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from dataclasses import dataclass
from typing import Any

import torch

from hybridpd.cache.geometry import CacheGeometry
from hybridpd.disagg.auth import KeyPurpose, derive_key, mac
from hybridpd.disagg.cuda_ipc import IpcExport, export_buffer
from hybridpd.disagg.errors import TransferError
from hybridpd.disagg.params import PeerGeometry
from hybridpd.disagg.side_channel import RateLimitedLog, decode_bytes, encode_bytes
from hybridpd.disagg.transport import PeerFacts, local_facts

NOTIF_PREFIX = "hpd3"  # "hpd3|<transfer_id>|<d_rank>|<d_tp>|<reader>|<nonce>|<mac>"
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

    @property
    def agent(self) -> str:
        """The NIXL agent that sent it (`read_notices` checked the sender is this agent)."""
        return agent_name(self.reader, self.d_rank)


@dataclass(frozen=True)
class RankAdvert:
    """What a peer's handshake needs of one rank (picklable: gathered to rank 0 at start-up)."""

    engine_id: str
    rank: int
    compat_hash: str
    geometry: PeerGeometry
    device_id: int
    mem_type: str  # "cpu" | "cuda"
    agent_metadata: bytes  # the rank's NIXL agent metadata (only for authenticated peers)
    facts: PeerFacts | None  # None: the peer sent none (reported as unknown)
    ipc: IpcExport | None = None  # a CUDA pool's IPC export (a same-GPU D maps it)

    @property
    def agent(self) -> str:
        return agent_name(self.engine_id, self.rank)

    def handshake_answer(self) -> dict[str, Any]:
        """This rank's part of the handshake response (JSON-safe)."""
        return {
            "engine_id": self.engine_id,
            "rank": self.rank,
            "compat_hash": self.compat_hash,
            "geometry": self.geometry.to_dict(),
            "device_id": self.device_id,
            "mem_type": self.mem_type,
            "agent_metadata": encode_bytes(self.agent_metadata),
            "transport_facts": None if self.facts is None else self.facts.to_dict(),
            "ipc": None if self.ipc is None else self.ipc.to_dict(),
        }

    @classmethod
    def from_answer(cls, d: Any) -> RankAdvert:
        """One rank of a peer's handshake answer (network input): ValueError (or
        SideChannelError for bad base64) on anything missing or mistyped."""
        if not isinstance(d, dict):
            raise ValueError(f"a rank's handshake record must be an object, got {d!r}")
        engine_id, rank, compat = d.get("engine_id"), d.get("rank"), d.get("compat_hash")
        device_id, mem_type = d.get("device_id", 0), d.get("mem_type", "cpu")
        if not isinstance(engine_id, str) or not isinstance(compat, str) or \
                isinstance(rank, bool) or not isinstance(rank, int):
            raise ValueError("a rank's handshake record needs engine_id, rank and compat_hash")
        if isinstance(device_id, bool) or not isinstance(device_id, int) or \
                mem_type not in ("cpu", "cuda"):
            raise ValueError(f"bad device in handshake: {device_id!r} {mem_type!r}")
        return cls(engine_id, rank, compat, PeerGeometry.from_dict(d.get("geometry")),
                   device_id, mem_type, decode_bytes(d.get("agent_metadata")),
                   PeerFacts.from_dict(d.get("transport_facts")),
                   IpcExport.from_dict(d.get("ipc")))


def _export(buffer: torch.Tensor) -> IpcExport | None:
    """The pool's CUDA IPC export, or None (CPU, or an allocation CUDA IPC cannot share, e.g.
    expandable segments: then a same-GPU peer reads over NIXL, and says how fast)."""
    if not buffer.is_cuda:
        return None
    try:
        return export_buffer(buffer)
    except RuntimeError as exc:
        log.warning("pool not shareable over CUDA IPC (%s); same-GPU peers read over NIXL", exc)
        return None


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
        model_fingerprint: str,
        secret: str | None = None,
    ) -> None:
        from hybridpd.disagg.nixl_agent import TransferAgent  # the only NIXL importer

        self.engine_id = engine_id
        self.rank = geometry.tp_rank
        self.secret = secret
        self.notice_key = notice_key(secret)  # notices are MACed: sniffed metadata forges none
        self.agent = TransferAgent(agent_name(engine_id, self.rank))
        self.region = self.agent.register(buffer)
        self.local = PeerGeometry.from_cache(geometry, num_blocks, self.region.base_addr)
        self.compat = compat_hash(geometry, model_fingerprint)
        self.facts = local_facts(buffer)  # advertised: D tells same GPU / host from its own
        self.buffer = buffer
        self.ipc = _export(buffer)  # what a D on the same GPU maps (None on CPU)
        self.counters = {"notices_refused": 0}
        self._refusals = RateLimitedLog(log)

    def advert(self) -> RankAdvert:
        """This rank's part of the instance's handshake (answered by rank 0's side channel)."""
        return RankAdvert(self.engine_id, self.rank, self.compat, self.local,
                          self.region.device_id, self.region.mem_type.value,
                          bytes(self.agent.metadata()), self.facts, self.ipc)

    # ---- engine-loop side ------------------------------------------------------------------
    def read_notices(self) -> list[ReadNotice]:
        """The notices that reached this rank, MAC checked and sent by the agent of the reader
        rank they name (whether that agent handshook is the transfer service's to say)."""
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
                if sender == notice.agent:
                    out.append(notice)
                else:
                    self.counters["notices_refused"] += 1
                    self._refusals.warning(
                        "ignored a notice about %s from agent %r (not the agent of reader %r "
                        "rank %d)", notice.transfer_id, sender, notice.reader, notice.d_rank)
        return out

    def close(self) -> None:
        self.agent.close()
