"""The typed P/D hand-off: what an API process hands its engine, below the HTTP layer.

Owns `RemoteDecode` (to a prefill instance: compute the prompt, keep its state for a remote
decoder), `RemotePrefill` (to a decode instance: the state is at the prefill instance its
verified `TransferParams` name, with P's first token in first-token mode) and `Handoff`, their
union (`GenerateRequest.handoff: Handoff | None`). P's engine answers with a `TransferParams`
(`GenerateOutput.kv_transfer_params`). Their JSON form (`kv_transfer_params`), the proxy's two
legs, signing and verification live at the HTTP edge (`server/handoff_edge.py`), the only
place that builds a `RemotePrefill`. Knows nothing of HTTP, JSON, NIXL or the scheduler.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from hybridpd.disagg.params import HandoffMode, TransferParams


@dataclass(frozen=True)
class RemoteDecode:
    """To a prefill instance: compute the prompt, keep its state for a remote decoder."""


@dataclass(frozen=True)
class RemotePrefill:
    """To a decode instance: the prompt's state is at the prefill instance `params` name.

    Built by the HTTP edge from P's JSON answer; `signed` says that the edge verified P's
    signature under the deployment secret before it parsed the params (a decode engine with a
    secret refuses a hand-off that is not)."""

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
