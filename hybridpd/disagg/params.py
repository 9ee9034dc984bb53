"""Wire records of a P/D transfer: what P hands the proxy, and what a rank advertises to peers.

Owns `TransferParams` (P's answer: where and what to read), `PeerGeometry` (one rank's pool
layout + buffer address, sent in the handshake), `HandoffMode` and `PROTOCOL_VERSION`, with
JSON-safe `to_dict` / `from_dict`. These dicts come from the network: `from_dict` rejects
missing fields and wrong types with ValueError, and re-derives every size from the geometry so
a peer with a different layout code is caught. Knows nothing of NIXL, tensors, the model code
or scheduling.
"""

from __future__ import annotations

import enum
import hashlib
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from hybridpd.cache.geometry import CacheGeometry

PROTOCOL_VERSION = 2  # 2: one side channel per P instance (rank 0's), handshakes name a rank


class HandoffMode(str, enum.Enum):
    FIRST_TOKEN = "first-token"  # P prefills all N tokens and samples the first output token
    N_MINUS_1 = "n-1"  # P prefills N-1 tokens; D computes token N and samples


def prompt_digest(tokens: Sequence[int]) -> str:
    """SHA-256 of the token ids whose effect is in a hand-off's state (little-endian int64)."""
    return hashlib.sha256(np.asarray(tokens, dtype="<i8").tobytes()).hexdigest()


# ---- field checks (network input) ------------------------------------------------------------
def _get(d: Any, key: str) -> Any:
    if not isinstance(d, dict):
        raise ValueError(f"expected a JSON object, got {type(d).__name__}")
    if key not in d:
        raise ValueError(f"missing field {key!r}")
    return d[key]


def _get_opt(d: Any, key: str) -> Any:
    return d.get(key) if isinstance(d, dict) else None


def _int(d: Any, key: str, minimum: int | None = 0) -> int:
    v = _get(d, key)
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise ValueError(f"field {key!r} must be an integer, got {v!r}")
    if minimum is not None and v < minimum:
        raise ValueError(f"field {key!r} must be >= {minimum}, got {v}")
    return int(v)


def _str(d: Any, key: str) -> str:
    v = _get(d, key)
    if not isinstance(v, str):
        raise ValueError(f"field {key!r} must be a string, got {v!r}")
    return v


def _float(d: Any, key: str) -> float:
    v = _get(d, key)
    # numpy's stubs do not accept numbers.Real (the numeric tower is untyped)
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or \
            not np.isfinite(v):  # type: ignore[call-overload]
        raise ValueError(f"field {key!r} must be a finite number, got {v!r}")
    return float(v)


def _int_list(v: Any, key: str, minimum: int = 0) -> tuple[int, ...]:
    if not isinstance(v, list | tuple):
        raise ValueError(f"field {key!r} must be a list of integers, got {v!r}")
    for x in v:
        if isinstance(x, bool) or not isinstance(x, numbers.Integral) or x < minimum:
            raise ValueError(f"field {key!r} must hold integers >= {minimum}, got {x!r}")
    return tuple(int(x) for x in v)


def _nested_int_list(d: Any, key: str, minimum: int = 0) -> tuple[tuple[int, ...], ...]:
    v = _get(d, key)
    if not isinstance(v, list | tuple):
        raise ValueError(f"field {key!r} must be a list of lists of integers, got {v!r}")
    return tuple(_int_list(x, key, minimum) for x in v)


# ---- TransferParams --------------------------------------------------------------------------
@dataclass(frozen=True)
class TransferParams:
    """What P returns with its last output so D can pull the request's state."""

    request_id: str
    engine_id: str  # P instance id (one per instance, all its TP ranks share it)
    side_channel: str  # "host:port" of the P instance's side channel (its rank 0's service)
    tp_size: int  # P's tensor parallel size
    block_ids: tuple[tuple[int, ...], ...]  # per group: attention groups, then Mamba groups
    num_tokens: int  # tokens whose effect is in the transferred state
    handoff: HandoffMode
    protocol_version: int = PROTOCOL_VERSION
    first_token: int | None = None  # set in first-token mode
    # One hand-off's identity (a fresh nonce): notices, renewals, releases and the final
    # confirmation name it, so a stale message about a reused request id changes nothing.
    transfer_id: str = ""
    # Binding (covered by the signature): the digest of the state's tokens, which D checks
    # against its own prompt, and when P issued the hand-off (wall clock), which bounds how
    # long D must remember a consumed transfer id.
    prompt_digest: str = ""
    issued_at: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "block_ids", tuple(tuple(int(b) for b in g)
                                                    for g in self.block_ids))
        object.__setattr__(self, "handoff", HandoffMode(self.handoff))
        if self.tp_size < 1:
            raise ValueError(f"tp_size must be >= 1, got {self.tp_size}")
        addr = self.side_channel
        if not isinstance(addr, str):
            raise ValueError(f"side_channel must be a host:port string, got {addr!r}")
        host, _, port = addr.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"side channel {addr!r} is not host:port")
        if any(b < 1 for g in self.block_ids for b in g):
            raise ValueError("block ids must be >= 1 (block 0 is the null block)")
        if self.handoff == HandoffMode.FIRST_TOKEN and self.first_token is None:
            raise ValueError("first-token handoff needs first_token")
        if self.first_token is not None and self.first_token < 0:
            raise ValueError(f"first_token must be >= 0, got {self.first_token}")
        if self.num_tokens > 0 and not self.transfer_id:
            raise ValueError("transfer_id is required when there is state to transfer")
        if len(self.prompt_digest) > 64:
            raise ValueError("prompt_digest must be a SHA-256 hex digest")
        if len(self.transfer_id) > 128 or "|" in self.transfer_id:
            raise ValueError("transfer_id must be <= 128 characters without '|'")

    def to_dict(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "engine_id": self.engine_id,
            "side_channel": self.side_channel,
            "tp_size": self.tp_size,
            "block_ids": [list(g) for g in self.block_ids],
            "num_tokens": self.num_tokens,
            "handoff": self.handoff.value,
            "protocol_version": self.protocol_version,
            "first_token": self.first_token,
            "transfer_id": self.transfer_id,
            "prompt_digest": self.prompt_digest,
            "issued_at": self.issued_at,
        }

    @classmethod
    def from_dict(cls, d: Any) -> TransferParams:
        version = _int(d, "protocol_version")
        if version != PROTOCOL_VERSION:
            raise ValueError(f"protocol_version {version} != ours ({PROTOCOL_VERSION})")
        handoff = _str(d, "handoff")
        if handoff not in {m.value for m in HandoffMode}:
            raise ValueError(f"unknown handoff mode {handoff!r}")
        first = _get(d, "first_token")
        if first is not None:
            first = _int(d, "first_token")
        return cls(
            request_id=_str(d, "request_id"),
            engine_id=_str(d, "engine_id"),
            side_channel=_str(d, "side_channel"),
            tp_size=_int(d, "tp_size", 1),
            block_ids=_nested_int_list(d, "block_ids", 1),
            num_tokens=_int(d, "num_tokens"),
            handoff=HandoffMode(handoff),
            protocol_version=version,
            first_token=first,
            transfer_id=_str(d, "transfer_id") if _get_opt(d, "transfer_id") else "",
            prompt_digest=_str(d, "prompt_digest") if _get_opt(d, "prompt_digest") else "",
            issued_at=_float(d, "issued_at") if _get_opt(d, "issued_at") else 0.0,
        )


# ---- PeerGeometry ----------------------------------------------------------------------------
_DERIVED = ("page_bytes", "block_tokens", "blocks_per_logical", "kernel_page_bytes", "conv_bytes",
            "x_bytes", "bc_bytes", "ssm_offset", "ssm_bytes", "mamba_page_bytes")


def _geometry_from_dict(d: Any) -> CacheGeometry:
    kw: dict[str, Any] = {}
    for f in fields(CacheGeometry):
        if f.type == "int":
            kw[f.name] = _int(d, f.name)
        elif f.type == "str":
            kw[f.name] = _str(d, f.name)
        else:  # tuple[tuple[int, ...], ...]
            kw[f.name] = _nested_int_list(d, f.name)
    try:
        return CacheGeometry(**kw)
    except (TypeError, KeyError) as exc:
        raise ValueError(f"bad geometry: {exc}") from exc


@dataclass(frozen=True)
class PeerGeometry:
    """One rank's pool as a peer sees it: layout, pool size, registered buffer address."""

    geometry: CacheGeometry
    num_blocks: int  # blocks in the buffer, null block included
    base_addr: int  # address of buffer[0, 0, 0] (what NIXL registered)
    compat_hash: str

    def __post_init__(self) -> None:
        if self.num_blocks < 2:
            raise ValueError(f"num_blocks must be >= 2, got {self.num_blocks}")
        if self.compat_hash != self.geometry.compat_hash():
            raise ValueError("compat_hash does not match the advertised geometry")

    @classmethod
    def from_cache(cls, geometry: CacheGeometry, num_blocks: int, base_addr: int) -> PeerGeometry:
        return cls(geometry, num_blocks, base_addr, geometry.compat_hash())

    @property
    def nbytes(self) -> int:
        return self.num_blocks * self.geometry.block_bytes

    def to_dict(self) -> dict[str, Any]:
        geo = {f.name: getattr(self.geometry, f.name) for f in fields(CacheGeometry)}
        geo["attention_groups"] = [list(g) for g in self.geometry.attention_groups]
        geo["mamba_groups"] = [list(g) for g in self.geometry.mamba_groups]
        return {
            "geometry": geo,
            "derived": {name: getattr(self.geometry, name) for name in _DERIVED},
            "num_blocks": self.num_blocks,
            "base_addr": self.base_addr,
            "nbytes": self.nbytes,
            "compat_hash": self.compat_hash,
        }

    @classmethod
    def from_dict(cls, d: Any) -> PeerGeometry:
        geometry = _geometry_from_dict(_get(d, "geometry"))
        derived = _get(d, "derived")
        for name in _DERIVED:
            theirs, ours = _int(derived, name), getattr(geometry, name)
            if theirs != ours:
                raise ValueError(f"peer says {name}={theirs}, its geometry gives {ours}")
        peer = cls(geometry, _int(d, "num_blocks", 2), _int(d, "base_addr"),
                   _str(d, "compat_hash"))
        if _int(d, "nbytes") != peer.nbytes:
            raise ValueError(f"peer says nbytes={d['nbytes']}, its geometry gives {peer.nbytes}")
        return peer
