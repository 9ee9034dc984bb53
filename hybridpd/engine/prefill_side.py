"""Prefill-instance hooks: compute the prompt's state, hand it off, hold it under a lease.

Owns what a `--role prefill` engine does for requests marked `do_remote_decode`: prefill N
tokens and sample the first (first-token mode) or prefill N-1 tokens (n-1 mode), answer with
`TransferParams`, keep the blocks until every reader notified, the lease expired, D released
them, or the request was aborted — then free them exactly (and at the latest `max_lease_s`
after issuing, however often D renews). Each hand-off carries the digest of its tokens and its
issue time, which P's API covers with the signature when it serialises the params (the engine
hands out the unsigned dataclass; signing is the HTTP edge's, `server/handoff_edge.py`).
Plain requests run as co-located. Knows nothing of tensors, NIXL or JSON.
"""

from __future__ import annotations

import time
import uuid

from hybridpd.disagg.commands import TransferCommand
from hybridpd.disagg.endpoint import ControlKind
from hybridpd.disagg.handoff import Handoff, RemoteDecode
from hybridpd.disagg.leases import LeaseTable
from hybridpd.disagg.params import HandoffMode, TransferParams, prompt_digest
from hybridpd.engine.disagg_hooks import ColocatedHooks, HookHost
from hybridpd.engine.protocol import GenerateOutput, TokenLogprob
from hybridpd.request import FinishReason, Request

LEASE_POLL_S = 0.002  # nothing to compute, only leases to watch: the driver may block this long


class PrefillHooks(ColocatedHooks):
    def __init__(self, engine: HookHost) -> None:
        super().__init__(engine)
        self.leases = LeaseTable(engine.args.lease_s, engine.args.tp_size,
                                 ledger=engine.executor.ledger,
                                 max_lease_s=engine.args.max_lease_s)
        self.n_minus_1 = engine.args.handoff == HandoffMode.N_MINUS_1
        self._immediate: list[Request] = []
        self._counters = {"leases_expired": 0.0, "blocks_released_by_reader": 0.0,
                          "blocks_released_by_abort": 0.0}

    # ---- admission ---------------------------------------------------------------------------
    def on_add(self, req: Request, handoff: Handoff | None) -> bool:
        if handoff is None:
            return True
        if not isinstance(handoff, RemoteDecode):
            raise ValueError("a prefill instance accepts kv_transfer_params {do_remote_decode}")
        if req.params.max_tokens == 0:
            return True  # prompt only (scoring): answered here, nothing to hand off
        req.hold_on_finish = True
        if not self.n_minus_1:
            return True
        req.prompt_token_ids = req.prompt_token_ids[:-1]  # D computes token N itself
        req.sample_final = False
        if not req.prompt_token_ids:  # a 1-token prompt: nothing for P to compute
            self._immediate.append(req)
            return False
        return True

    # ---- end of the prompt -------------------------------------------------------------------
    def on_first_token(
        self,
        req: Request,
        token: int,
        lp: TokenLogprob | None,
        reason: FinishReason | None,
        outputs: list[GenerateOutput],
    ) -> None:
        if reason is None:  # more to decode: hand the state off, hold the blocks
            params = self._hand_off(req, token)
        else:  # the first token already ends the request: nothing to hand off
            params = None
            self.engine.scheduler.finish(req.request_id, reason)
        outputs.append(
            GenerateOutput(
                request_id=req.request_id,
                new_token_ids=(token,),
                finished=True,
                finish_reason=reason or FinishReason.LENGTH,
                new_logprobs=None if lp is None else (lp,),
                num_prompt_tokens=len(req.prompt_token_ids),
                kv_transfer_params=params,
            )
        )

    def on_prefill_done(self, req: Request, outputs: list[GenerateOutput]) -> None:
        outputs.append(
            GenerateOutput(
                request_id=req.request_id,
                new_token_ids=(),
                finished=True,
                finish_reason=FinishReason.LENGTH,
                num_prompt_tokens=len(req.prompt_token_ids) + 1,
                kv_transfer_params=self._hand_off(req, None),
            )
        )

    def _hand_off(self, req: Request, first_token: int | None) -> TransferParams:
        rid = req.request_id
        num_tokens = len(req.prompt_token_ids)
        attn: tuple[tuple[int, ...], ...] = ()
        mamba: tuple[int, ...] = ()
        transfer_id = ""
        digest = prompt_digest(req.prompt_token_ids)  # the state's tokens: D checks its prompt
        if num_tokens:
            attn, mamba = self.engine.blocks.get(rid).frozen()
            self.engine.scheduler.finish(rid, FinishReason.LENGTH, keep_blocks=True)
            transfer_id = uuid.uuid4().hex
            self.leases.hold(rid, transfer_id)
        return TransferParams(
            request_id=rid,
            engine_id=self.engine.args.engine_id,
            side_channels=self.engine.executor.side_channels,
            tp_size=self.engine.args.tp_size,
            block_ids=(*attn, *((b,) for b in mamba)),
            num_tokens=num_tokens,
            handoff=HandoffMode.N_MINUS_1 if first_token is None else HandoffMode.FIRST_TOKEN,
            first_token=first_token,
            transfer_id=transfer_id,
            prompt_digest=digest,
            issued_at=time.time(),
        )

    # ---- every step --------------------------------------------------------------------------
    def before_schedule(self, outputs: list[GenerateOutput]) -> None:
        while self._immediate:
            self.on_prefill_done(self._immediate.pop(0), outputs)
        if not len(self.leases):
            return
        report = self.engine.executor.transfer(TransferCommand())
        for p_rank, n in report.notices:
            rid = self.leases.notice(n.transfer_id, p_rank, n.d_rank, n.d_tp, n.reader, n.nonce)
            if rid is not None:
                self._release(rid, "blocks_released_by_reader")
        for msg in report.control:
            for tid in msg.transfer_ids:
                if msg.kind == ControlKind.RENEW:
                    self.leases.renew(tid)
                    continue
                rid = self.leases.release(tid)
                if rid is not None:
                    self._release(rid, "blocks_released_by_abort")
        for rid in self.leases.expired():
            self._release(rid, "leases_expired")

    def _release(self, request_id: str, counter: str) -> None:
        self.engine.scheduler.free_held(request_id)
        self._counters[counter] += 1

    def on_abort(self, request_id: str) -> bool:
        if self.leases.abort(request_id):
            self._release(request_id, "blocks_released_by_abort")
            return True
        return False

    def has_work(self) -> bool:
        return bool(len(self.leases) or self._immediate)

    def idle_wait_s(self) -> float | None:
        if self._immediate:
            return 0.0  # answered by the next step
        if len(self.leases):
            return LEASE_POLL_S
        return None

    def knows(self, request_id: str) -> bool:
        return self.leases.holds_request(request_id)

    def counters(self) -> dict[str, float]:
        return dict(self._counters)
