"""Decode-instance hooks: receive a prompt's state from a prefill instance, then decode.

Owns what a `--role decode` engine does for requests marked `do_remote_prefill`: check the
transfer params against the prompt, allocate blocks (the scheduler), start one READ per rank
(the executor's receivers), renew P's lease while waiting, confirm with P after the READs that
it held the blocks throughout (a READ of freed blocks "succeeds" on garbage), and on the outcome
either continue from the transferred state or fail closed — recompute locally from scratch or
finish with a clear error, per `--on-transfer-failure`. Hand-offs are single-use and bound: the
signature was checked by D's API before it parsed the params (`server/handoff_edge.py`; with a
deployment secret a hand-off not marked verified is refused here), then the prompt digest
against this request's tokens and the issue time, then the transfer id is claimed once
(`disagg/consumed.py`); each READ has a nonce that its notices and the confirmation carry, so
P vouches only for the READ it saw. An aborted request's blocks stay quarantined until every
rank reports that no READ can still write them.
Knows nothing of tensors, NIXL or JSON.
"""

from __future__ import annotations

import enum
import logging
import secrets
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from hybridpd.disagg.commands import TransferCommand, TransferReport
from hybridpd.disagg.consumed import CLOCK_SKEW_S, ConsumedHandoffs, check_binding, claim_or_refuse
from hybridpd.disagg.handoff import Handoff, RemotePrefill
from hybridpd.disagg.leases import LeaseRenewer, confirm_lease
from hybridpd.disagg.params import HandoffMode, TransferParams
from hybridpd.disagg.receiver import ReadJob, ReadResult
from hybridpd.disagg.signing import NOT_SIGNED
from hybridpd.engine.args import FailurePolicy
from hybridpd.engine.disagg_hooks import ColocatedHooks, HookHost
from hybridpd.engine.protocol import ErrorKind, GenerateOutput
from hybridpd.request import FinishReason, Request

READ_POLL_S = 0.001  # only hand-offs outstanding: the driver may block this long
CONFIRM_TIMEOUT_S = 2.0
log = logging.getLogger("hybridpd.transfer")


class TransferOutcome(str, enum.Enum):
    OK = "ok"
    FAILED = "failed"


class PendingState(enum.Enum):
    """Where a remote-prefill request's hand-off stands on D (the request leaves `pending`
    when it ends: recompute, error, success, or abort once no READ can write its blocks)."""

    QUEUED = "queued"  # admitted; waiting for the scheduler to give it blocks
    READING = "reading"  # READs started on every rank; their results are coming in
    QUARANTINED = "quarantined"  # aborted while READs may still write: blocks held till all report
    CONFIRMING = "confirming"  # every READ ok; asking P whether it held the blocks throughout


@dataclass
class _Pending:
    params: TransferParams
    results: dict[int, ReadResult] = field(default_factory=dict)  # per D rank
    state: PendingState = PendingState.QUEUED
    nonce: str = ""  # this request's READ (set when it starts)
    confirm: Future[tuple[bool, str]] | None = None  # set in CONFIRMING

    @property
    def reads_live(self) -> bool:
        """READs were started and not all ranks reported: they may still write the blocks."""
        return self.state in (PendingState.READING, PendingState.QUARANTINED)


class DecodeHooks(ColocatedHooks):
    def __init__(self, engine: HookHost) -> None:
        super().__init__(engine)
        self.pending: dict[str, _Pending] = {}
        self.renewer = LeaseRenewer(period_s=max(0.2, engine.args.lease_s / 3),
                                    secret=engine.args.kv_secret)
        max_age = float(engine.args.max_lease_s or engine.args.lease_s)
        self.consumed = ConsumedHandoffs(ttl_s=max_age + 2 * CLOCK_SKEW_S)
        self._confirms = ThreadPoolExecutor(max_workers=4, thread_name_prefix="kv-confirm")
        self._counters = {"kv_transfers_ok": 0.0, "kv_transfers_failed": 0.0,
                          "requests_recomputed": 0.0, "kv_transfer_bytes": 0.0}

    # ---- admission ---------------------------------------------------------------------------
    def on_add(self, req: Request, handoff: Handoff | None) -> bool:
        if handoff is None:
            return True
        if not isinstance(handoff, RemotePrefill):
            raise ValueError("a decode instance accepts kv_transfer_params {do_remote_prefill}")
        if self.engine.args.kv_secret and not handoff.signed:
            raise ValueError(NOT_SIGNED)  # the edge verifies before anything is believed
        params = handoff.params
        self._check_matches_prompt(req, params)
        if (params.handoff == HandoffMode.FIRST_TOKEN and req.params.num_samples > 1
                and not req.params.greedy):
            raise ValueError("n / best_of > 1 with sampling needs --handoff n-1 on the prefill "
                             "instance (in first-token mode every sample would start with the "
                             "prefill instance's one first token)")
        check_binding(params, req.prompt_token_ids[:params.num_tokens],
                      signed=bool(self.engine.args.kv_secret),
                      max_age_s=float(self.engine.args.max_lease_s or self.engine.args.lease_s))
        if params.num_tokens > 0:
            claim_or_refuse(self.consumed, params.transfer_id)  # last: every check passed
        if params.handoff == HandoffMode.FIRST_TOKEN:
            assert params.first_token is not None  # TransferParams checks it in this mode
            req.prompt_token_ids = [*req.prompt_token_ids, params.first_token]
            req.max_tokens = req.params.max_tokens - 1
            req.output_offset = 1  # the first output token came from P
        if params.num_tokens == 0:
            return True  # nothing was computed remotely: an ordinary local request
        req.remote_tokens = params.num_tokens
        self.pending[req.request_id] = _Pending(params)
        self.renewer.watch(req.request_id, params.side_channels[0], params.transfer_id)
        return True

    def _check_matches_prompt(self, req: Request, params: TransferParams) -> None:
        n = len(req.prompt_token_ids)
        expected = n if params.handoff == HandoffMode.FIRST_TOKEN else n - 1
        if params.num_tokens != expected:
            raise ValueError(
                f"kv_transfer_params carry {params.num_tokens} tokens of state for a "
                f"{n}-token prompt in {params.handoff.value} mode (expected {expected})"
            )
        vocab = self.engine.model_config.vocab_size
        if params.first_token is not None and not 0 <= params.first_token < vocab:
            raise ValueError(f"first_token {params.first_token} is out of range [0, {vocab})")
        if params.handoff == HandoffMode.FIRST_TOKEN and req.params.max_tokens < 2:
            raise ValueError("nothing left to decode: max_tokens < 2 in first-token mode")

    # ---- transfers ---------------------------------------------------------------------------
    def start_transfers(self, request_ids: tuple[str, ...]) -> None:
        jobs = []
        for rid in request_ids:
            p = self.pending[rid]
            attn, mamba = self.engine.blocks.get(rid).frozen()
            p.nonce = secrets.token_hex(8)
            jobs.append(ReadJob(rid, p.params, (*attn, *((b,) for b in mamba)), p.nonce))
            p.state = PendingState.READING
        if jobs:
            self._absorb(self.engine.executor.transfer(TransferCommand(start=tuple(jobs))))

    def before_schedule(self, outputs: list[GenerateOutput]) -> None:
        if any(p.reads_live for p in self.pending.values()):
            self._absorb(self.engine.executor.transfer(TransferCommand()))
        for rid, p in list(self.pending.items()):
            if p.reads_live and len(p.results) == self.engine.args.tp_size:
                self._reads_finished(rid, p, outputs)
            elif p.state is PendingState.CONFIRMING and p.confirm is not None \
                    and p.confirm.done():
                self._confirmed(rid, p, p.confirm.result(), outputs)

    def _absorb(self, report: TransferReport) -> None:
        for rank, res in report.results:
            p = self.pending.get(res.request_id)
            if p is not None:
                p.results[rank] = res

    def _reads_finished(self, rid: str, p: _Pending, outputs: list[GenerateOutput]) -> None:
        """Every rank reported: no READ can write the request's blocks any more."""
        if p.state is PendingState.QUARANTINED:
            del self.pending[rid]
            self.engine.scheduler.free_held(rid)  # end of the quarantine
            return
        errors = [r.error or r.outcome.value for r in p.results.values() if not r.ok]
        if errors:
            self._fail(rid, p, errors[0], outputs)
            return
        p.state = PendingState.CONFIRMING
        p.confirm = self._confirms.submit(confirm_lease, p.params.side_channels[0],
                                          p.params.transfer_id, self.engine.args.engine_id,
                                          CONFIRM_TIMEOUT_S, p.nonce, self.engine.args.kv_secret)

    def _confirmed(self, rid: str, p: _Pending, answer: tuple[bool, str],
                   outputs: list[GenerateOutput]) -> None:
        trusted, why = answer
        if not trusted:
            self._fail(rid, p, f"the prefill instance {why}: the READ may have read reused "
                               "blocks", outputs)
            return
        del self.pending[rid]
        self.renewer.unwatch(rid)
        stats = _stats(p, [])
        _log(rid, stats)
        self._counters["kv_transfers_ok"] += 1
        self._counters["kv_transfer_bytes"] += stats["bytes"]
        self.engine.scheduler.remote_done(rid, ok=True)
        outputs.append(GenerateOutput(rid, (), transfer_stats=stats))

    def _fail(self, rid: str, p: _Pending, error: str, outputs: list[GenerateOutput]) -> None:
        del self.pending[rid]
        self.renewer.unwatch(rid, release=True)
        stats = _stats(p, [error])
        _log(rid, stats)
        self._counters["kv_transfers_failed"] += 1
        outputs.append(GenerateOutput(rid, (), transfer_stats=stats))
        if self.engine.args.on_transfer_failure == FailurePolicy.FAIL:
            req = self.engine.scheduler.requests[rid]
            self.engine.finish_with_error(
                req, f"KV transfer from the prefill instance failed: {error}", outputs,
                ErrorKind.TRANSFER_FAILED)
            return
        self._counters["requests_recomputed"] += 1
        self.engine.scheduler.remote_done(rid, ok=False)  # recompute from scratch, locally

    # ---- abort / lifecycle -------------------------------------------------------------------
    def on_abort(self, request_id: str) -> bool:
        p = self.pending.get(request_id)
        if p is None:
            return False
        if p.state is PendingState.QUARANTINED:
            return True  # aborted already: the blocks wait for the READs' reports
        self.renewer.unwatch(request_id, release=True)
        reads_live = p.reads_live
        self.engine.scheduler.finish(request_id, FinishReason.ABORT, keep_blocks=reads_live)
        if not reads_live:
            del self.pending[request_id]
            return True
        p.state = PendingState.QUARANTINED  # blocks held until every rank reports
        self._absorb(self.engine.executor.transfer(TransferCommand(cancel=(request_id,))))
        return True

    def has_work(self) -> bool:
        return bool(self.pending)

    def idle_wait_s(self) -> float | None:
        if self.pending:
            return READ_POLL_S
        return None

    def knows(self, request_id: str) -> bool:
        return request_id in self.pending

    def counters(self) -> dict[str, float]:
        return dict(self._counters)

    def shutdown(self) -> None:
        self.renewer.close()
        self._confirms.shutdown(wait=False, cancel_futures=True)


def _stats(p: _Pending, errors: list[str]) -> dict[str, Any]:
    res = [p.results[r] for r in sorted(p.results)]
    nbytes = sum(r.nbytes for r in res)
    seconds = max((r.seconds for r in res), default=0.0)
    return {
        "outcome": (TransferOutcome.FAILED if errors else TransferOutcome.OK).value,
        "bytes": nbytes,
        "descriptors": sum(r.descriptors for r in res),
        "seconds": seconds,
        "gbps": nbytes / seconds / 1e9 if seconds > 0 and not errors else 0.0,
        "num_tokens": p.params.num_tokens,
        "error": errors[0] if errors else None,
        "ranks": len(res),
        "rank_bytes": [r.nbytes for r in res],
        "rank_descriptors": [r.descriptors for r in res],
        **_transport_fields(res),
    }


def _transport_fields(res: list[ReadResult]) -> dict[str, Any]:
    """The transport of the slowest calibrated source pair (disagg/transport.py)."""
    pairs = [r.pair for r in res if r.pair is not None]
    if not pairs:
        return {"transport": None}
    slow = min(pairs, key=lambda p: p.calibrated_gbps)
    return {"transport": slow.transport, "topology": slow.topology_label,
            "calibrated_gbps": slow.calibrated_gbps, "peer": slow.peer,
            "transport_verdict": slow.verdict.value}


def _log(rid: str, stats: dict[str, Any]) -> None:
    log.info(
        "kv transfer %s: %s, %d bytes, %d descriptors, %.3f ms, %.3f GB/s%s", rid,
        stats["outcome"], stats["bytes"], stats["descriptors"], stats["seconds"] * 1e3,
        stats["gbps"], f" ({stats['error']})" if stats["error"] else "",
    )
