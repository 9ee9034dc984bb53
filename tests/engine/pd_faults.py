"""A transport fault injector at the `TransferAgent` boundary, for in-process P/D tests.

`FaultyAgent` wraps a real agent and spoils every `every`-th READ in turn with one of the
`Fault`s: posting raises, the READ lands but reports FAILED, it is reported late, or its
completion notice is lost (P then only learns from lease expiry). Everything else passes
through to the real agent, so the data that does move is moved by NIXL.
"""

from __future__ import annotations

import enum
import itertools
import threading
import time
from typing import Any

from hybridpd.disagg.errors import TransferError
from hybridpd.disagg.nixl_agent import TransferAgent, TransferHandle, XferState


class Fault(str, enum.Enum):
    FAIL_POST = "fail-post"
    FAIL_COMPLETION = "fail-completion"
    DELAY = "delay"
    DROP_NOTICE = "drop-notice"


class FaultyAgent:
    def __init__(self, real: TransferAgent, every: int, delay_s: float = 0.2,
                 faults: tuple[Fault, ...] = tuple(Fault)) -> None:
        self._real, self._every, self._delay_s = real, every, delay_s
        self._faults = itertools.cycle(faults)
        self._count = itertools.count(1)
        self._lock = threading.Lock()
        self._failed: set[int] = set()
        self._late: dict[int, float] = {}
        self.injected: dict[Fault, int] = dict.fromkeys(Fault, 0)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def _next_fault(self) -> Fault | None:
        with self._lock:
            if next(self._count) % self._every:
                return None
            fault = next(self._faults)
            self.injected[fault] += 1
            return fault

    def read(self, peer: str, local_region: Any, local_offsets: Any, remote_base_addr: int,
             remote_device_id: int, remote_offsets: Any, lengths: Any, notif: bytes,
             **kw: Any) -> TransferHandle:
        fault = self._next_fault()
        if fault is Fault.FAIL_POST:
            raise TransferError("injected: posting the READ failed")
        if fault is Fault.DROP_NOTICE:
            notif = b"lost"  # not one of our notices: P ignores it
        handle = self._real.read(peer, local_region, local_offsets, remote_base_addr,
                                 remote_device_id, remote_offsets, lengths, notif, **kw)
        with self._lock:
            if fault is Fault.FAIL_COMPLETION:
                self._failed.add(handle.xfer_id)
            elif fault is Fault.DELAY:
                self._late[handle.xfer_id] = time.monotonic() + self._delay_s
        return handle

    def poll(self, handle: TransferHandle) -> XferState:
        state = self._real.poll(handle)
        with self._lock:
            if handle.xfer_id in self._failed and state is XferState.DONE:
                return XferState.FAILED
            if time.monotonic() < self._late.get(handle.xfer_id, 0.0):
                return XferState.PENDING
        return state
