"""The HTTP edge of the P/D hand-off: `kv_transfer_params` JSON <-> the typed hand-off.

Owns the only place where a hand-off is parsed, verified and signed: `from_request` turns a
request's `kv_transfer_params` into `RemoteDecode` (to P) or `RemotePrefill` (to D) — with a
deployment secret D's API verifies P's signature *before* it believes any field, then
`TransferParams.from_dict` checks every field — and `to_answer` turns the `TransferParams`
P's engine returns into the JSON P's API answers, signed under the deployment secret. Both run
in the API process before anything is queued (a refused hand-off never reaches the engine).
The engines see only the dataclasses; what D's engine still checks (the prompt digest, the
issue time, single use) needs its own state. Knows nothing of aiohttp, engines or NIXL.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hybridpd.disagg import handoff
from hybridpd.disagg.handoff import Handoff, RemoteDecode, RemotePrefill
from hybridpd.disagg.params import TransferParams
from hybridpd.disagg.signing import SIGNATURE_FIELD, sign, verify


def from_request(kv: Mapping[str, Any] | None, secret: str | None) -> Handoff | None:
    """The typed hand-off of a request's `kv_transfer_params` (None or {}: none). Raises
    ValueError (a clear message for a 400) for a forged, unsigned (with a secret) or malformed
    hand-off."""
    if not kv:
        return None
    if not isinstance(kv, Mapping):
        raise ValueError(f"kv_transfer_params must be an object, got {type(kv).__name__}")
    to_p, to_d = handoff.asks_remote_decode(kv), handoff.asks_remote_prefill(kv)
    if to_p and to_d:
        raise ValueError("kv_transfer_params ask for both do_remote_decode and "
                         "do_remote_prefill; a request is one leg")
    if to_p:
        return RemoteDecode()
    if not to_d:
        raise ValueError("kv_transfer_params need do_remote_decode (to a prefill instance) or "
                         "do_remote_prefill (to a decode instance)")
    fields = handoff.transfer_fields(kv)
    if secret:
        verify(fields, secret)  # before anything is believed
    params = TransferParams.from_dict({k: v for k, v in fields.items() if k != SIGNATURE_FIELD})
    return RemotePrefill(params, signed=bool(secret))


def to_answer(params: TransferParams | None, secret: str | None) -> dict[str, Any] | None:
    """The `kv_transfer_params` P's API answers with: P's params, signed under the deployment
    secret when there is one; None when the request ended on P."""
    if params is None:
        return None
    d = params.to_dict()
    return sign(d, secret) if secret else d
