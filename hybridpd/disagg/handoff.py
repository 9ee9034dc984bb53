"""The first-token convention: the typed hand-off the engines see, and the
`kv_transfer_params` JSON objects P, the proxy and D exchange over HTTP.

Owns the one statement of who asks for what along a P/D request: the proxy asks P for
`{"do_remote_decode": true}`; P answers with its (signed) `TransferParams` and — in first-token
mode — the first output token, which the client gets from P; the proxy then asks D with
`{"do_remote_prefill": true, **P's params}`; D's engine appends P's first token to the prompt
and decodes the rest, and D's API replays that token through its detokenizer and stop-string
matcher without emitting it again.

Below the HTTP layer the hand-off is typed: `GenerateRequest.handoff` is `RemoteDecode` (to
P), `RemotePrefill` (to D: P's verified `TransferParams`) or None, and P's engine answers
with a `TransferParams`. The JSON helpers here (`prefill_request`, `decode_request`,
`asks_remote_*`, `transfer_fields`) are for the HTTP layers only (the proxy and
`server/handoff_edge.py`, which parses, verifies and signs). P's API, D's API and the proxy ask
`first_token` / `hands_off` instead of reading the raw dict. Knows nothing of HTTP, NIXL or the
scheduler; the fields of P's params are validated by `TransferParams.from_dict`, not here.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Union

from hybridpd.disagg.params import HandoffMode, TransferParams

DO_REMOTE_DECODE = "do_remote_decode"  # to P: compute the prompt, hand its state off
DO_REMOTE_PREFILL = "do_remote_prefill"  # to D: pull the state P computed, then decode


@dataclass(frozen=True)
class RemoteDecode:
    """To a prefill instance: compute the prompt, keep its state for a remote decoder."""


@dataclass(frozen=True)
class RemotePrefill:
    """To a decode instance: the prompt's state is at the prefill instance `params` name.

    Built only by the HTTP edge (`server/handoff_edge.py`) from P's JSON answer; `signed`
    says that the edge verified P's signature under the deployment secret before parsing
    (a decode engine with a secret refuses a hand-off that is not)."""

    params: TransferParams
    signed: bool = False

    @property
    def first_token(self) -> int | None:
        """P's first output token (first-token mode), which the client already got."""
        if self.params.handoff is not HandoffMode.FIRST_TOKEN:
            return None
        return self.params.first_token


# what an API process hands its engine (`GenerateRequest.handoff`: Handoff | None)
Handoff = Union[RemoteDecode, RemotePrefill]  # noqa: UP007 - a runtime alias on Python 3.10


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
    """Did P's final answer leave state for D (so P's text stays unflushed and D continues)?
    An answer without params ended on P (e.g. its first token was the last)."""
    return kv_transfer_params is not None


def first_token(kv_transfer: Handoff | Mapping[str, Any] | None) -> int | None:
    """The first output token P sampled and the client already got, carried in D's request
    (first-token mode): the typed hand-off D's API holds, or the JSON the proxy relays; None
    for n-1 hand-offs and for anything that is not a D request. A malformed JSON value is None
    here: D's edge refuses the request with the reason."""
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
