"""Who may call an HTTP route: an API key (`Authorization: Bearer`) or the deployment secret.

Owns the two checks hybridpd's HTTP processes use, both constant-time:
* `bearer_matches(headers, api_key)`: the client's `Authorization: Bearer <key>` (vLLM's
  `--api-key` convention);
* `internal_token(secret, purpose, subject)` / `internal_token_ok(...)`: a short-lived
  HMAC-SHA256 token over (purpose, subject, unix time) sent in `INTERNAL_AUTH_HEADER`, with which
  the deployment's own processes (the proxy asking P to drop a hand-off) prove they hold the
  deployment secret without sending it. Tokens are valid within `WINDOW_S` of their time.
`OPEN_PATHS` lists the routes that stay open when an API key is set. Knows nothing of what
the routes do or of what the subjects mean.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Mapping

INTERNAL_AUTH_HEADER = "X-Hybridpd-Auth"
WINDOW_S = 60.0
ABORT_PURPOSE = "abort"  # what internal tokens for /v1/abort are bound to
# routes that need no API key (probes, scrapers, the version, the API's schema); every other
# route of an instance or the proxy does when a key is configured
OPEN_PATHS = frozenset({"/health", "/metrics", "/version", "/openapi.json"})


def bearer_matches(headers: Mapping[str, str], api_key: str) -> bool:
    value = headers.get("Authorization", "")
    scheme, _, token = value.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(),
                                                              api_key.encode())


def internal_token(secret: str, purpose: str, subject: str, now: float | None = None) -> str:
    """`<unix seconds>.<hex mac>` binding `purpose` and `subject` (e.g. "abort", a request id)."""
    ts = int(time.time() if now is None else now)
    return f"{ts}.{_mac(secret, purpose, subject, ts)}"


def internal_token_ok(
    token: str | None, secret: str, purpose: str, subject: str, now: float | None = None
) -> bool:
    if not token:
        return False
    ts_text, _, mac = token.partition(".")
    try:
        ts = int(ts_text)
    except ValueError:
        return False
    current = time.time() if now is None else now
    if abs(current - ts) > WINDOW_S:
        return False
    return hmac.compare_digest(mac.encode(), _mac(secret, purpose, subject, ts).encode())


def _mac(secret: str, purpose: str, subject: str, ts: int) -> str:
    msg = f"hybridpd-http|{purpose}|{ts}|{subject}".encode()
    return hmac.new(secret.encode(), msg, hashlib.sha256).hexdigest()
