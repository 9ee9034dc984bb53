"""The HTTP edge of the P/D hand-off: the `kv_transfer_params` JSON convention, and the only
place where a hand-off is parsed, verified and signed.

Owns the one statement of who asks for what along a P/D request: the proxy asks P for
`{"do_remote_decode": true}` (`prefill_request`); P answers with its signed `TransferParams`
and — in first-token mode — the first output token, which the client gets from P
(`to_answer`; `hands_off` says whether P left state for D); the proxy then asks D with
`{"do_remote_prefill": true, **P's params}` (`decode_request`); D's engine appends P's first
token to the prompt and decodes the rest, and D's API replays that token (`first_token`)
through its detokenizer and stop-string matcher without emitting it again. P's API, D's API
and the proxy ask this module instead of reading the raw dict.

`from_request` turns a request's `kv_transfer_params` into the typed hand-off
(`disagg/handoff.py`): `RemoteDecode` (to P) or `RemotePrefill` (to D) — with a deployment
secret D's API verifies P's signature *before* it believes any field, then
`TransferParams.from_dict` checks every field. Both directions run in the API process before
anything is queued (a refused hand-off never reaches the engine); the engines see only the
dataclasses (what D's engine still checks — prompt digest, issue time, single use — needs its
own state). Knows nothing of aiohttp, engines or NIXL.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any

from hybridpd.disagg.handoff import Handoff, RemoteDecode, RemotePrefill
from hybridpd.disagg.params import HandoffMode, TransferParams
from hybridpd.disagg.signing import SIGNATURE_FIELD, sign, verify

DO_REMOTE_DECODE = "do_remote_decode"  # to P: compute the prompt, hand its state off
DO_REMOTE_PREFILL = "do_remote_prefill"  # to D: pull the state P computed, then decode


# ---- the proxy's two legs (JSON) --------------------------------------------------------------
def prefill_request() -> dict[str, Any]:
    """The `kv_transfer_params` the proxy sends P."""
    return {DO_REMOTE_DECODE: True}


def decode_request(p_params: Mapping[str, Any]) -> dict[str, Any]:
    """The `kv_transfer_params` the proxy sends D: P's answer, marked for remote prefill."""
    return {DO_REMOTE_PREFILL: True, **p_params}


def asks_remote_decode(kv_transfer: Mapping[str, Any] | None) -> bool:
    """Is this (P's) request one whose state goes to a decode instance?"""
    return bool(kv_transfer and kv_transfer.get(DO_REMOTE_DECODE))


def asks_remote_prefill(kv_transfer: Mapping[str, Any] | None) -> bool:
    """Is this (D's) request one whose prompt state comes from a prefill instance?"""
    return bool(kv_transfer and kv_transfer.get(DO_REMOTE_PREFILL))


def transfer_fields(kv_transfer: Mapping[str, Any]) -> dict[str, Any]:
    """D's request without its marker: P's params as P sent them (signature included)."""
    return {k: v for k, v in kv_transfer.items() if k != DO_REMOTE_PREFILL}


def hands_off(kv_transfer_params: TransferParams | Mapping[str, Any] | None) -> bool:
    """Did P's final answer (its engine's params, or its JSON) leave state for D (so P's text
    stays unflushed and D continues)? An answer without params ended on P (e.g. its first
    token was the last)."""
    return kv_transfer_params is not None


def first_token(kv_transfer: Handoff | Mapping[str, Any] | None) -> int | None:
    """The first output token P sampled and the client already got, carried in D's request
    (first-token mode): the typed hand-off D's API holds, or the JSON the proxy relays; None
    for n-1 hand-offs and for anything that is not a D request. A malformed JSON value is None
    here: `from_request` refuses the request with the reason."""
    if isinstance(kv_transfer, RemotePrefill):
        return kv_transfer.first_token
    if isinstance(kv_transfer, RemoteDecode) or not asks_remote_prefill(kv_transfer):
        return None
    assert kv_transfer is not None
    if kv_transfer.get("handoff", HandoffMode.FIRST_TOKEN.value) != HandoffMode.FIRST_TOKEN.value:
        return None
    tok = kv_transfer.get("first_token")
    if isinstance(tok, bool) or not isinstance(tok, numbers.Integral):
        return None
    return int(tok)


# ---- JSON <-> the typed hand-off ----------------------------------------------------------------
def from_request(kv: Mapping[str, Any] | None, secret: str | None) -> Handoff | None:
    """The typed hand-off of a request's `kv_transfer_params` (None or {}: none). Raises
    ValueError (a clear message for a 400) for a forged, unsigned (with a secret) or malformed
    hand-off."""
    if not kv:
        return None
    if not isinstance(kv, Mapping):
        raise ValueError(f"kv_transfer_params must be an object, got {type(kv).__name__}")
    to_p, to_d = asks_remote_decode(kv), asks_remote_prefill(kv)
    if to_p and to_d:
        raise ValueError("kv_transfer_params ask for both do_remote_decode and "
                         "do_remote_prefill; a request is one leg")
    if to_p:
        return RemoteDecode()
    if not to_d:
        raise ValueError("kv_transfer_params need do_remote_decode (to a prefill instance) or "
                         "do_remote_prefill (to a decode instance)")
    fields = transfer_fields(kv)
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
