"""Single-use hand-offs on the decode side: which transfer ids were consumed, and whether a
hand-off is bound to the request that presents it.

Owns `ConsumedHandoffs` (a thread-safe, bounded, expiring set of transfer ids a decode instance
has accepted; a second use is refused with `HandoffRefused`) and `check_binding` (the prompt
digest in the signed params must match the request's own tokens; a signed hand-off older than
the consumed set remembers is refused, so expiry never reopens a replay). P's per-READ nonce
(`leases.confirm_lease`) is the second, independent guard. Knows nothing of NIXL, sockets,
tensors or the scheduler.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

from hybridpd.disagg.errors import HandoffRefused
from hybridpd.disagg.params import TransferParams, prompt_digest

CONSUMED_SIZE = 200_000
CLOCK_SKEW_S = 30.0  # tolerated difference between P's and D's wall clocks
log = logging.getLogger("hybridpd.transfer")


class Claim(str, enum.Enum):
    FRESH = "fresh"  # first use: accepted and remembered
    CONSUMED = "consumed"  # seen before: refuse


class ConsumedHandoffs:
    """Transfer ids accepted in the last `ttl_s` seconds (at most `size`; oldest forgotten)."""

    def __init__(self, ttl_s: float, size: int = CONSUMED_SIZE,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s, self._size, self._clock = ttl_s, size, clock
        self._ids: OrderedDict[str, float] = OrderedDict()  # transfer id -> expiry
        self._lock = threading.Lock()

    def claim(self, transfer_id: str) -> Claim:
        now = self._clock()
        with self._lock:
            while self._ids:
                first, expiry = next(iter(self._ids.items()))
                if expiry > now and len(self._ids) < self._size:
                    break
                if expiry > now:
                    log.warning("consumed hand-off set full (%d): forgetting %s early; P's "
                                "per-READ confirmation still refuses its replay", self._size,
                                first)
                del self._ids[first]
            if transfer_id in self._ids:
                return Claim.CONSUMED
            self._ids[transfer_id] = now + self.ttl_s
            return Claim.FRESH

    def __len__(self) -> int:
        return len(self._ids)


def check_binding(params: TransferParams, state_tokens: Sequence[int], *, signed: bool,
                  max_age_s: float, now: float | None = None) -> None:
    """HandoffRefused unless the hand-off is for exactly these tokens and, when signed, was
    issued within `max_age_s` (plus clock skew) of now."""
    if params.prompt_digest or signed:
        if params.prompt_digest != prompt_digest(state_tokens):
            raise HandoffRefused("kv_transfer_params were issued for another prompt (the "
                                 "prompt digest does not match this request's tokens)")
    if signed:
        age = (time.time() if now is None else now) - params.issued_at
        if not -CLOCK_SKEW_S <= age <= max_age_s + CLOCK_SKEW_S:
            raise HandoffRefused(f"kv_transfer_params were issued {age:.0f}s ago; a hand-off "
                                 f"is valid for {max_age_s:.0f}s")


def claim_or_refuse(consumed: ConsumedHandoffs, transfer_id: str) -> None:
    if consumed.claim(transfer_id) is Claim.CONSUMED:
        raise HandoffRefused(f"hand-off {transfer_id} was already consumed; each hand-off can "
                             "be used once")
