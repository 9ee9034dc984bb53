"""Signed hand-offs: a prefill instance signs the transfer params it hands out, a decode
instance of the same deployment accepts only params it can verify.

Owns the HMAC-SHA256 over the params' canonical JSON (every field, sorted keys) with a
deployment secret (`HYBRIDPD_KV_SECRET`, read by `env.py`; `hybridpd up` generates one). Without
it a client could hand a decode instance forged params: other requests' block ids, or any
host:port to connect to. It works on the JSON form, so only the HTTP edge calls it
(`server/handoff_edge.py`: P's API signs what it answers, D's API verifies before it parses);
the engines see the typed hand-off. Knows nothing of NIXL, tensors or HTTP.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

SIGNATURE_FIELD = "signature"
NOT_SIGNED = ("kv_transfer_params are not signed; this decode instance only accepts hand-offs "
              "signed by a prefill instance of its deployment")


def _canonical(params: dict[str, Any]) -> bytes:
    body = {k: v for k, v in params.items() if k != SIGNATURE_FIELD}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def sign(params: dict[str, Any], secret: str) -> dict[str, Any]:
    """A copy of `params` with its signature."""
    mac = hmac.new(secret.encode(), _canonical(params), hashlib.sha256).hexdigest()
    return {**params, SIGNATURE_FIELD: mac}


def verify(params: dict[str, Any], secret: str) -> None:
    """Raise ValueError unless `params` carry a valid signature under `secret`."""
    given = params.get(SIGNATURE_FIELD)
    if not isinstance(given, str):
        raise ValueError(NOT_SIGNED)
    want = hmac.new(secret.encode(), _canonical(params), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(given, want):
        raise ValueError("kv_transfer_params signature is invalid (forged, altered, or signed "
                         "with another deployment's secret)")
