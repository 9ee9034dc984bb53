"""The KV connector: what the scheduler asks of a P/D role, and the decisions it gets back.

Owns the connector interface the `Scheduler` calls at its fixed points (data in, decisions
out, no back-references): `admit` a request with its hand-off (how to schedule it), `hands_off`
/ `on_prompt_done` when a prompt is computed (hold the blocks for a remote reader, and the
`TransferParams` to answer), `on_blocks_allocated` when a remote-prefill request got its blocks,
`build_command` (the READs to post and cancel, riding the next step), `on_report` (what the
ranks' endpoints answered), `poll` (`TransferEvents`: ready, failed, releasable — the scheduler
applies them: it stays the only writer of request status and the only place blocks are freed),
`abort` (an `AbortAction` the scheduler carries out) and `on_finished`. `NoConnector` is the
co-located role's. The prefill and decode connectors live in `engine/prefill_side.py` and
`engine/decode_side.py`; `engine/roles.py` builds one per role. Knows nothing of tensors, NIXL,
JSON, the scheduler's queues or the engine.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Protocol

from hybridpd.disagg.commands import TransferCommand, TransferReport
from hybridpd.disagg.handoff import Handoff
from hybridpd.disagg.params import TransferParams
from hybridpd.request import Request

# per attention group the block ids, then per Mamba group its one state block
BlockIds = tuple[tuple[int, ...], ...]


class AdmitKind(enum.Enum):
    LOCAL = "local"  # schedule it as an ordinary request (its prompt computed here)
    REMOTE = "remote"  # its state arrives from a prefill instance: blocks first, then READs
    ANSWERED = "answered"  # nothing to compute here: the hand-off is answered at once


@dataclass(frozen=True)
class Admission:
    """How the scheduler takes a request in (it applies this; the connector changes nothing
    of the request). `prompt_token_ids` / `output_token_ids`: the tokens as this instance
    schedules them (P in n-1 mode drops the last prompt token; D in first-token mode takes
    P's first token as an output already made); `remote_tokens`: tokens whose state arrives
    (REMOTE); `params`: the answer of an ANSWERED request."""

    kind: AdmitKind
    prompt_token_ids: tuple[int, ...]
    output_token_ids: tuple[int, ...] = ()
    sample_final: bool = True
    remote_tokens: int = 0
    params: TransferParams | None = None


class AbortAction(enum.Enum):
    """What the scheduler does with an aborted request, as its connector says."""

    NOT_MINE = "not-mine"  # no P/D state: finish it as usual (unknown ids change nothing)
    FINISH = "finish"  # its P/D state is dropped: finish it and free its blocks
    QUARANTINE = "quarantine"  # READs may still write its blocks: finish it, keep the blocks
    FREE_HELD = "free-held"  # a finished request's held blocks (P's lease): free them now
    ALREADY_ENDED = "already-ended"  # aborted before and still quarantined: nothing to do


@dataclass(frozen=True)
class TransferFailure:
    request_id: str
    error: str
    recompute: bool  # True: recompute from scratch locally; False: fail the request


@dataclass(frozen=True)
class TransferEvents:
    """What the connector's transfers came to since the last poll, for the scheduler to apply:
    `ready` continue from the transferred state, `failed` recompute or fail, `releasable`
    (finished requests whose held blocks no transfer can touch any more) are freed. `stats`:
    per request one transfer record for its output (engine)."""

    ready: tuple[str, ...] = ()
    failed: tuple[TransferFailure, ...] = ()
    releasable: tuple[str, ...] = ()
    stats: tuple[tuple[str, dict[str, Any]], ...] = ()

    def __bool__(self) -> bool:
        return bool(self.ready or self.failed or self.releasable or self.stats)


NO_EVENTS = TransferEvents()


class KVConnector(Protocol):
    """A role's P/D policy as the scheduler drives it."""

    def admit(self, request: Request, handoff: Handoff | None) -> Admission:
        """Refuse (ValueError, nothing kept) or say how to schedule the request."""

    def hands_off(self, request_id: str) -> bool:
        """Does this request's computed prompt go to a remote decoder?"""

    def on_prompt_done(self, request: Request, block_ids: BlockIds, first_token: int | None,
                       finished: bool) -> tuple[bool, TransferParams | None]:
        """The prompt of a hand-off request is computed (`first_token` sampled, None in n-1
        mode; `finished`: that token already ends it). Returns (hold the blocks for a remote
        reader, the params to answer with)."""

    def on_blocks_allocated(self, request_id: str, block_ids: BlockIds) -> None:
        """A REMOTE request got the blocks its transferred state goes to."""

    def build_command(self) -> TransferCommand | None:
        """What the ranks' endpoints do after this step (READs to post, to cancel, or a bare
        poll); None: nothing to do or ask."""

    def on_report(self, report: TransferReport) -> None:
        """What the endpoints answered to the last command."""

    def poll(self) -> TransferEvents:
        """Transfers that came to an end (confirmations, expiries included) since the last
        poll."""

    def abort(self, request_id: str) -> AbortAction: ...

    def on_finished(self, request_id: str) -> None:
        """The scheduler finished the request (any reason): drop what is left of its state
        (never called for a request the connector said to quarantine or hold)."""

    def has_work(self) -> bool:
        """Transfers or leases outstanding."""

    def idle_wait_s(self) -> float | None:
        """None: nothing outstanding; 0: the next poll answers something; else the interval
        at which to poll while only transfers or leases are outstanding."""

    def knows(self, request_id: str) -> bool:
        """Is the id in use by a transfer or a lease (duplicate-id check)?"""

    def counters(self) -> dict[str, float]: ...

    def shutdown(self) -> None: ...


class NoConnector:
    """The co-located role: every request is local; nothing is ever handed off."""

    def admit(self, request: Request, handoff: Handoff | None) -> Admission:
        if handoff is not None:
            raise ValueError(
                "kv_transfer_params sent to an instance started with --role both; "
                "send P/D requests to --role prefill / --role decode instances"
            )
        return local(request)

    def hands_off(self, request_id: str) -> bool:
        return False

    def on_prompt_done(self, request: Request, block_ids: BlockIds, first_token: int | None,
                       finished: bool) -> tuple[bool, TransferParams | None]:
        raise AssertionError("co-located requests are never handed off")

    def on_blocks_allocated(self, request_id: str, block_ids: BlockIds) -> None:
        raise AssertionError("co-located engines never wait for remote KV")

    def build_command(self) -> TransferCommand | None:
        return None

    def on_report(self, report: TransferReport) -> None:
        pass

    def poll(self) -> TransferEvents:
        return NO_EVENTS

    def abort(self, request_id: str) -> AbortAction:
        return AbortAction.NOT_MINE

    def on_finished(self, request_id: str) -> None:
        pass

    def has_work(self) -> bool:
        return False

    def idle_wait_s(self) -> float | None:
        return None

    def knows(self, request_id: str) -> bool:
        return False

    def counters(self) -> dict[str, float]:
        return {}

    def shutdown(self) -> None:
        pass


def local(request: Request) -> Admission:
    """Schedule `request` as it is."""
    return Admission(AdmitKind.LOCAL, tuple(request.prompt_token_ids),
                     sample_final=request.sample_final)
