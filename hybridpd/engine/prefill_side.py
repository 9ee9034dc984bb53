"""The prefill instance's KV connector: compute the prompt's state, hand it off, hold it
under a lease.

Owns what a `--role prefill` engine does for requests marked `do_remote_decode`: prefill N
tokens and sample the first (first-token mode) or prefill N-1 tokens (n-1 mode), answer with
`TransferParams`, keep the blocks until every reader notified, the lease expired, D released
them, or the request was aborted — then tell the scheduler they are releasable (it frees them,
exactly once; at the latest `max_lease_s` after issuing, however often D renews). Each hand-off
carries the digest of its tokens and its issue time, which P's API covers with the signature
when it serialises the params (the engine hands out the unsigned dataclass; signing is the HTTP
edge's, `server/handoff_edge.py`). Plain requests run as co-located. Knows nothing of tensors,
NIXL, JSON, the scheduler or the engine (it gets data, it returns decisions).
"""

from __future__ import annotations

import time
import uuid

from hybridpd.disagg.commands import TransferCommand, TransferReport
from hybridpd.disagg.handoff import Handoff, RemoteDecode
from hybridpd.disagg.leases import LeaseState
from hybridpd.disagg.params import HandoffMode, TransferParams, prompt_digest
from hybridpd.disagg.transfer_service import TransferService
from hybridpd.engine.args import EngineArgs
from hybridpd.engine.kv_connector import (
    NO_EVENTS,
    AbortAction,
    Admission,
    AdmitKind,
    BlockIds,
    NoConnector,
    TransferEvents,
    local,
)
from hybridpd.request import Request

LEASE_POLL_S = 0.002  # nothing to compute, only leases to watch: the driver may block this long
# the counter a lease that D released or nobody renewed adds to (D's release counts as an abort)
_COUNTER = {LeaseState.RELEASED: "blocks_released_by_abort", LeaseState.EXPIRED: "leases_expired"}


class PrefillConnector(NoConnector):
    def __init__(self, args: EngineArgs, side_channel: str, service: TransferService) -> None:
        self.args = args
        self.side_channel = side_channel  # the instance's (rank 0's), named in every hand-off
        self.service = service  # the leases (and the ledger), renewals and releases from D
        self.n_minus_1 = args.handoff == HandoffMode.N_MINUS_1
        self._handing_off: set[str] = set()  # admitted with RemoteDecode, prompt not done yet
        self._releasable: list[str] = []  # lease ended since the last poll
        self._counters = {"leases_expired": 0.0, "blocks_released_by_reader": 0.0,
                          "blocks_released_by_abort": 0.0}

    # ---- admission ---------------------------------------------------------------------------
    def admit(self, request: Request, handoff: Handoff | None) -> Admission:
        if handoff is None:
            return local(request)
        if not isinstance(handoff, RemoteDecode):
            raise ValueError("a prefill instance accepts kv_transfer_params {do_remote_decode}")
        if request.params.max_tokens == 0:
            return local(request)  # prompt only (scoring): answered here, nothing to hand off
        if not self.n_minus_1:
            self._handing_off.add(request.request_id)
            return local(request)
        prompt = tuple(request.prompt_token_ids[:-1])  # D computes token N itself
        if not prompt:  # a 1-token prompt: nothing for P to compute, nothing to hold
            return Admission(AdmitKind.ANSWERED, prompt, sample_final=False,
                             params=self._params(request.request_id, prompt, (), None, ""))
        self._handing_off.add(request.request_id)
        return Admission(AdmitKind.LOCAL, prompt, sample_final=False)

    def hands_off(self, request_id: str) -> bool:
        return request_id in self._handing_off

    # ---- end of the prompt -------------------------------------------------------------------
    def on_prompt_done(self, request: Request, block_ids: BlockIds, first_token: int | None,
                       finished: bool) -> tuple[bool, TransferParams | None]:
        rid = request.request_id
        self._handing_off.discard(rid)
        if finished:  # the first token already ends the request: nothing to hand off
            return False, None
        transfer_id = uuid.uuid4().hex
        self.service.hold(rid, transfer_id)
        return True, self._params(rid, tuple(request.prompt_token_ids), block_ids, first_token,
                                  transfer_id)

    def _params(self, rid: str, tokens: tuple[int, ...], block_ids: BlockIds,
                first_token: int | None, transfer_id: str) -> TransferParams:
        return TransferParams(
            request_id=rid,
            engine_id=self.args.engine_id,
            side_channel=self.side_channel,
            tp_size=self.args.tp_size,
            block_ids=block_ids,
            num_tokens=len(tokens),
            handoff=HandoffMode.N_MINUS_1 if first_token is None else HandoffMode.FIRST_TOKEN,
            first_token=first_token,
            transfer_id=transfer_id,
            prompt_digest=prompt_digest(list(tokens)),  # the state's tokens: D checks its prompt
            issued_at=time.time(),
        )

    # ---- every step --------------------------------------------------------------------------
    def build_command(self) -> TransferCommand | None:
        # the workers read the readers' notices (every P rank gets its own)
        return TransferCommand() if self.service.num_leases() else None

    def on_report(self, report: TransferReport) -> None:
        for p_rank, n in report.notices:
            rid = self.service.notice(n.transfer_id, p_rank, n.d_rank, n.d_tp, n.reader,
                                      n.nonce)
            if rid is not None:
                self._release(rid, "blocks_released_by_reader")

    def poll(self) -> TransferEvents:
        for rid, end in self.service.ended():  # D's releases, expiries
            self._release(rid, _COUNTER[end])
        if not self._releasable:
            return NO_EVENTS
        out, self._releasable = tuple(self._releasable), []
        return TransferEvents(releasable=out)

    def _release(self, request_id: str, counter: str) -> None:
        self._releasable.append(request_id)
        self._counters[counter] += 1

    def abort(self, request_id: str) -> AbortAction:
        if self.service.abort(request_id):
            self._counters["blocks_released_by_abort"] += 1
            return AbortAction.FREE_HELD
        if request_id in self._releasable:
            return AbortAction.ALREADY_ENDED  # its lease ended: freed at the next poll
        self._handing_off.discard(request_id)
        return AbortAction.NOT_MINE

    def on_finished(self, request_id: str) -> None:
        self._handing_off.discard(request_id)

    def has_work(self) -> bool:
        return bool(self.service.num_leases() or self._releasable)

    def idle_wait_s(self) -> float | None:
        if self._releasable:
            return 0.0
        return LEASE_POLL_S if self.service.num_leases() else None

    def knows(self, request_id: str) -> bool:
        return self.service.holds(request_id) or request_id in self._releasable

    def counters(self) -> dict[str, float]:
        return dict(self._counters)
