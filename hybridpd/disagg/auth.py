"""Deployment-secret authentication of the P/D control plane: side-channel frames and the
proxy's request for a hand-off.

Owns the keys derived from the deployment secret (`HYBRIDPD_KV_SECRET`; one sub-key per use,
so a MAC made for one purpose is never valid for another), the MAC of a side-channel frame body
(`frame_mac`), the replay guard (a bounded, expiring record of nonces seen inside the replay
window) and the proxy's `X-Hybridpd-Handoff-Auth` header (HMAC over request id + body digest +
timestamp + nonce), which a prefill instance requires before it hands off state.

Must not know sockets, JSON framing, NIXL, tensors or HTTP frameworks: callers pass bytes and
strings and get `AuthError` (a ValueError) with a clear reason.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

HANDOFF_AUTH_HEADER = "X-Hybridpd-Handoff-Auth"
REPLAY_WINDOW_S = 30.0  # a frame or header older (or newer, clock skew) than this is refused
REPLAY_GUARD_SIZE = 200_000  # nonces remembered at most (oldest forgotten first)
MAC_BYTES = 32


class KeyPurpose(str, enum.Enum):
    SIDE_CHANNEL = "hybridpd side-channel frames v1"
    HANDOFF_REQUEST = "hybridpd proxy hand-off request v1"
    NOTICE = "hybridpd read notices v1"


class AuthFailure(str, enum.Enum):
    MISSING = "missing"  # no credentials where they are required
    BAD_MAC = "bad-mac"  # forged, altered, or made with another secret
    STALE = "stale"  # timestamp outside the replay window
    REPLAYED = "replayed"  # nonce already seen inside the window
    MALFORMED = "malformed"


class AuthError(ValueError):
    """Authentication refused; `.failure` says why (the message says it in words)."""

    def __init__(self, failure: AuthFailure, message: str) -> None:
        super().__init__(message)
        self.failure = failure


def derive_key(secret: str, purpose: KeyPurpose) -> bytes:
    """The sub-key of `secret` for one purpose."""
    return hmac.new(secret.encode(), purpose.value.encode(), hashlib.sha256).digest()


def new_nonce() -> str:
    return secrets.token_hex(16)


def mac(key: bytes, *parts: bytes) -> bytes:
    """HMAC-SHA256 over length-prefixed parts (no ambiguity between part boundaries)."""
    h = hmac.new(key, digestmod=hashlib.sha256)
    for part in parts:
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.digest()


def check_fresh(ts: float, now: float, window_s: float = REPLAY_WINDOW_S) -> None:
    if not abs(now - ts) <= window_s:  # also refuses NaN
        raise AuthError(AuthFailure.STALE,
                        f"timestamp is {now - ts:+.1f}s off (replay window {window_s:.0f}s)")


class ReplayGuard:
    """Thread-safe record of nonces seen in the last `ttl_s` seconds, at most `size` of them."""

    def __init__(self, ttl_s: float = 2 * REPLAY_WINDOW_S, size: int = REPLAY_GUARD_SIZE,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl_s, self._size, self._clock = ttl_s, size, clock
        self._seen: OrderedDict[str, float] = OrderedDict()  # nonce -> expiry, oldest first
        self._lock = threading.Lock()

    def check_and_remember(self, nonce: str) -> None:
        """AuthError(REPLAYED) if `nonce` was seen and has not expired; else remember it."""
        now = self._clock()
        with self._lock:
            while self._seen:
                first, expiry = next(iter(self._seen.items()))
                if expiry > now and len(self._seen) < self._size:
                    break
                del self._seen[first]
            if nonce in self._seen:
                raise AuthError(AuthFailure.REPLAYED, "nonce already used (replayed frame)")
            self._seen[nonce] = now + self._ttl_s

    def __len__(self) -> int:
        return len(self._seen)


# ---- the proxy's request for a hand-off ------------------------------------------------------
def _handoff_mac(key: bytes, request_id: str, body: bytes, ts: str, nonce: str) -> str:
    digest = hashlib.sha256(body).digest()
    return mac(key, b"handoff-request", request_id.encode(), digest, ts.encode(),
               nonce.encode()).hex()


def sign_handoff_request(secret: str, request_id: str, body: bytes,
                         now: float | None = None) -> str:
    """The `X-Hybridpd-Handoff-Auth` header value for a `do_remote_decode` request."""
    ts = f"{time.time() if now is None else now:.3f}"
    nonce = new_nonce()
    key = derive_key(secret, KeyPurpose.HANDOFF_REQUEST)
    return f"{ts}:{nonce}:{_handoff_mac(key, request_id, body, ts, nonce)}"


def verify_handoff_request(header: str | None, secret: str, request_id: str, body: bytes,
                           guard: ReplayGuard | None = None, now: float | None = None) -> None:
    """AuthError unless `header` was made by a holder of `secret` for exactly this request id
    and body, inside the replay window (and, with a guard, never seen before)."""
    if not header:
        raise AuthError(AuthFailure.MISSING,
                        "do_remote_decode is only accepted from the deployment's proxy "
                        f"(missing {HANDOFF_AUTH_HEADER})")
    ts, _, rest = header.partition(":")
    nonce, _, given = rest.partition(":")
    try:
        when = float(ts)
    except ValueError:
        raise AuthError(AuthFailure.MALFORMED, f"malformed {HANDOFF_AUTH_HEADER}") from None
    key = derive_key(secret, KeyPurpose.HANDOFF_REQUEST)
    want = _handoff_mac(key, request_id, body, ts, nonce)
    if not hmac.compare_digest(given.encode(), want.encode()):
        raise AuthError(AuthFailure.BAD_MAC,
                        f"{HANDOFF_AUTH_HEADER} is invalid (forged, for another request or body, "
                        "or made with another deployment's secret)")
    check_fresh(when, time.time() if now is None else now)
    if guard is not None:
        guard.check_and_remember(nonce)
