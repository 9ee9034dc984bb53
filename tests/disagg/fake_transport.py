"""An in-memory stand-in for the NIXL transport, for millisecond tests of P/D state machines.

`FakeAgent` has the `TransferAgent` calls the receiver makes (read / poll / release /
send_notif / add_peer / remove_peer / get_notifs) and moves no bytes: each posted READ's state
is scripted (`Script`), a release can be made to fail a number of times (quarantine), and every
call is recorded. `FakeEndpoint` is the part of `KVEndpoint` a `KVReceiver` reads. `FakePeer`
is a P instance of TP 1: it answers handshakes on a real in-process side channel (loopback
TCP, milliseconds) with its rank's record (`advert`, the fake agent's "metadata"), so a
transfer service's real handshake code runs, and confirmations, renewals and releases.
`FakeChannel` is the instance side channel as the transfer service reads it (scripted control
messages, the agents that handshook).
"""

from __future__ import annotations

import enum
import itertools
import threading
from dataclasses import dataclass, field
from typing import Any

from hybridpd.cache.geometry import CacheGeometry
from hybridpd.disagg.endpoint import RankAdvert, agent_name
from hybridpd.disagg.errors import TransferError
from hybridpd.disagg.instance_channel import ControlMessage
from hybridpd.disagg.nixl_agent import TransferHandle, XferState
from hybridpd.disagg.params import PeerGeometry
from hybridpd.disagg.side_channel import SideChannelServer


class Script(str, enum.Enum):
    """What a READ posted to the fake agent does."""

    DONE = "done"  # reported DONE from the first poll on
    PENDING = "pending"  # PENDING until the test calls `finish(handle, state)`
    FAILED = "failed"  # reported FAILED
    RAISE = "raise"  # posting raises TransferError (nothing is posted)


@dataclass
class _Read:
    handle: TransferHandle
    state: XferState
    notice: bytes
    released: bool = False


@dataclass
class FakeAgent:
    name: str
    script: list[Script] = field(default_factory=list)  # one per READ; then DONE
    release_failures: int = 0  # the next N releases raise TransferError
    reads: list[_Read] = field(default_factory=list)
    notifs_sent: list[tuple[str, bytes]] = field(default_factory=list)
    peers: set[str] = field(default_factory=set)
    inbox: dict[str, list[bytes]] = field(default_factory=dict)  # what get_notifs returns
    loads: int = 0  # add_peer calls

    def __post_init__(self) -> None:
        self._ids = itertools.count(1)
        self._lock = threading.Lock()  # reads are posted on the receiver's posting threads

    # ---- peers -------------------------------------------------------------------------------
    def add_peer(self, metadata: bytes) -> str:
        name = metadata.decode()
        self.peers.add(name)
        self.loads += 1
        return name

    def remove_peer(self, name: str) -> None:
        self.peers.discard(name)

    # ---- READs -------------------------------------------------------------------------------
    def read(self, peer: str, local_region: Any, local_offsets: Any, remote_base_addr: int,
             remote_device_id: int, remote_offsets: Any, lengths: Any, notif: bytes,
             **kw: Any) -> TransferHandle:
        with self._lock:
            step = self.script.pop(0) if self.script else Script.DONE
            if step is Script.RAISE:
                raise TransferError("scripted: posting the READ failed")
            handle = TransferHandle(next(self._ids), peer, len(lengths), int(sum(lengths)))
            state = {Script.DONE: XferState.DONE, Script.PENDING: XferState.PENDING,
                     Script.FAILED: XferState.FAILED}[step]
            self.reads.append(_Read(handle, state, notif))
            return handle

    def _find(self, handle: TransferHandle) -> _Read:
        return next(r for r in self.reads if r.handle.xfer_id == handle.xfer_id)

    def poll(self, handle: TransferHandle) -> XferState:
        with self._lock:
            read = self._find(handle)
            if read.released:
                raise TransferError(f"transfer {handle.xfer_id} was already released")
            return read.state

    def finish(self, handle: TransferHandle, state: XferState = XferState.DONE) -> None:
        with self._lock:
            self._find(handle).state = state

    def release(self, handle: TransferHandle) -> None:
        with self._lock:
            if self.release_failures > 0:
                self.release_failures -= 1
                raise TransferError("scripted: release failed")
            read = self._find(handle)
            read.released = True
            if read.state is XferState.PENDING:
                read.state = XferState.FAILED  # aborted: it will never write again

    def live(self) -> list[TransferHandle]:
        """READs not released yet (they could still write local blocks)."""
        with self._lock:
            return [r.handle for r in self.reads if not r.released]

    # ---- notifications -----------------------------------------------------------------------
    def send_notif(self, peer: str, msg: bytes) -> None:
        self.notifs_sent.append((peer, msg))

    def get_notifs(self) -> dict[str, list[bytes]]:
        out, self.inbox = self.inbox, {}
        return out


@dataclass
class FakeEndpoint:
    """What a `KVReceiver` reads of its `KVEndpoint`."""

    engine_id: str
    geometry: CacheGeometry
    num_blocks: int
    agent: FakeAgent = field(init=False)
    compat: str = "fake-compat"
    secret: str | None = None
    notice_key: bytes | None = None
    region: Any = None
    facts: Any = None

    def __post_init__(self) -> None:
        self.agent = FakeAgent(agent_name(self.engine_id, self.geometry.tp_rank))
        self.local = PeerGeometry.from_cache(self.geometry, self.num_blocks, 0)


class FakePeer:
    """A P rank's side channel: answers handshakes for `engine_id` rank `rank`, confirmations
    with `lease_state` (a LeaseState value); renewals and releases get an empty answer and are
    recorded in `control` (`wait_control` waits for one, with a deadline)."""

    def __init__(self, engine_id: str, geometry: CacheGeometry, num_blocks: int,
                 compat: str = "fake-compat", rank: int = 0) -> None:
        self.engine_id, self.rank, self.compat = engine_id, rank, compat
        self.geometry = PeerGeometry.from_cache(geometry, num_blocks, 1 << 20)
        self.handshakes = 0
        self.agents: list[tuple[str, ...]] = []  # the agents each handshake named
        self.lease_state = "held"
        self.control: list[tuple[str, tuple[str, ...]]] = []  # (renew / release, transfer ids)
        self.control_seen = threading.Condition()
        self.server = SideChannelServer("127.0.0.1", 0, self._handle).start()
        self.address = f"127.0.0.1:{self.server.port}"

    def _handle(self, msg: dict[str, Any]) -> dict[str, Any]:
        kind = msg.get("type")
        if kind == "confirm":
            return {"state": self.lease_state}
        if kind in ("renew", "release"):
            with self.control_seen:
                self.control.append((kind, tuple(msg.get("transfer_ids", ()))))
                self.control_seen.notify_all()
            return {}
        self.handshakes += 1
        self.agents.append(tuple(msg.get("agents", ())))
        return {"engine_id": self.engine_id, "tp_size": 1, "compat_hash": self.compat,
                "ranks": [self.advert().handshake_answer()]}

    def advert(self) -> RankAdvert:
        """Its rank's record, as a handshake answers it."""
        return RankAdvert(self.engine_id, self.rank, self.compat, self.geometry, 0, "cpu",
                          agent_name(self.engine_id, self.rank).encode(), None)


    def wait_control(self, kind: str, transfer_id: str, timeout_s: float = 10.0) -> bool:
        """Wait until a `kind` message naming `transfer_id` arrived (False at the deadline)."""
        with self.control_seen:
            return self.control_seen.wait_for(
                lambda: any(k == kind and transfer_id in ids for k, ids in self.control),
                timeout_s)

    def stop(self) -> None:
        self.server.stop()


class FakeChannel:
    """The instance's side channel as the transfer service reads it: control messages the
    test scripts (`messages`; `reads` counts the drains) and the agents that handshook
    (`known`; None: every agent did)."""

    address = "127.0.0.1:5600"

    def __init__(self, known: set[str] | None = None) -> None:
        self.messages: list[ControlMessage] = []
        self.reads = 0
        self.known = known
        self.closed = False

    def control_messages(self) -> list[ControlMessage]:
        self.reads += 1
        out, self.messages = self.messages, []
        return out

    def knows(self, agent: str) -> bool:
        return self.known is None or agent in self.known

    def close(self) -> None:
        self.closed = True


def fake_advert(engine_id: str, geometry: CacheGeometry, num_blocks: int,
                compat: str = "fake-compat") -> RankAdvert:
    """A rank's record with the fake agent's "metadata" (its name), e.g. a decode instance's
    own for its transfer service's side channel."""
    return RankAdvert(engine_id, geometry.tp_rank, compat,
                      PeerGeometry.from_cache(geometry, num_blocks, 0), 0, "cpu",
                      agent_name(engine_id, geometry.tp_rank).encode(), None)
