"""The decode instance's KV connector: receive a prompt's state from a prefill instance,
then decode.

Owns what a `--role decode` engine does for requests marked `do_remote_prefill`: check the
transfer params against the prompt, have the transfer service handshake with P (once per P
instance), have the scheduler allocate blocks, post one READ per rank with every P rank's
handshake record (riding the next step's transfer command to the executor's receivers), renew
P's lease while waiting, confirm with P after the READs that it held the blocks throughout (a
READ of freed blocks "succeeds" on garbage), and on the outcome tell the scheduler to continue
from the transferred state or to fail closed — recompute locally from scratch or finish with a
clear error, per `--on-transfer-failure`. Hand-offs are single-use and bound: the signature was
checked by D's API before it parsed the params (`server/handoff_edge.py`; with a deployment
secret a hand-off not marked verified is refused here), then the prompt digest against this
request's tokens and the issue time, then the transfer id is claimed once
(`disagg/consumed.py`); each READ has a nonce that its notices and the confirmation carry, so P
vouches only for the READ it saw. An aborted request's blocks stay quarantined (held by the
scheduler) until every rank reports that no READ can still write them.
Knows nothing of tensors, NIXL, JSON, the scheduler or the engine (data in, decisions out).
"""

from __future__ import annotations

import enum
import logging
import secrets
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Any

from hybridpd.disagg.commands import TransferCommand, TransferReport
from hybridpd.disagg.consumed import CLOCK_SKEW_S, ConsumedHandoffs, check_binding, claim_or_refuse
from hybridpd.disagg.endpoint import RankAdvert
from hybridpd.disagg.handoff import Handoff, RemotePrefill
from hybridpd.disagg.params import HandoffMode, TransferParams
from hybridpd.disagg.receiver import ReadJob, ReadOutcome, ReadResult
from hybridpd.disagg.signing import NOT_SIGNED
from hybridpd.disagg.transfer_service import TransferService
from hybridpd.engine.args import EngineArgs, FailurePolicy
from hybridpd.engine.kv_connector import (
    NO_EVENTS,
    AbortAction,
    Admission,
    AdmitKind,
    BlockIds,
    NoConnector,
    TransferEvents,
    TransferFailure,
    local,
)
from hybridpd.request import Request

READ_POLL_S = 0.001  # only hand-offs outstanding: the driver may block this long
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
    peers: Future[tuple[RankAdvert, ...]] | None = None  # D's service's handshake with P

    @property
    def reads_live(self) -> bool:
        """READs were started and not all ranks reported: they may still write the blocks."""
        return self.state in (PendingState.READING, PendingState.QUARANTINED)


class DecodeConnector(NoConnector):
    def __init__(self, args: EngineArgs, vocab_size: int, service: TransferService) -> None:
        self.args = args
        self.vocab_size = vocab_size
        self.pending: dict[str, _Pending] = {}
        self.service = service  # renews P's leases, releases them, asks the confirmations
        max_age = float(args.max_lease_s or args.lease_s)
        self.consumed = ConsumedHandoffs(ttl_s=max_age + 2 * CLOCK_SKEW_S)
        # READs to post with the next command (once the handshake with their P is done)
        self._start: list[ReadJob] = []
        self._cancel: list[str] = []  # READs to cancel with the next command
        self._counters = {"kv_transfers_ok": 0.0, "kv_transfers_failed": 0.0,
                          "requests_recomputed": 0.0, "kv_transfer_bytes": 0.0}

    # ---- admission ---------------------------------------------------------------------------
    def admit(self, request: Request, handoff: Handoff | None) -> Admission:
        if handoff is None:
            return local(request)
        if not isinstance(handoff, RemotePrefill):
            raise ValueError("a decode instance accepts kv_transfer_params {do_remote_prefill}")
        if self.args.kv_secret and not handoff.signed:
            raise ValueError(NOT_SIGNED)  # the edge verifies before anything is believed
        params = handoff.params
        self._check_matches_prompt(request, params)
        if (params.handoff == HandoffMode.FIRST_TOKEN and request.params.num_samples > 1
                and not request.params.greedy):
            raise ValueError("n / best_of > 1 with sampling needs --handoff n-1 on the prefill "
                             "instance (in first-token mode every sample would start with the "
                             "prefill instance's one first token)")
        check_binding(params, request.prompt_token_ids[:params.num_tokens],
                      signed=bool(self.args.kv_secret),
                      max_age_s=float(self.args.max_lease_s or self.args.lease_s))
        if params.num_tokens > 0:
            claim_or_refuse(self.consumed, params.transfer_id)  # last: every check passed
        outputs: tuple[int, ...] = ()
        if params.handoff == HandoffMode.FIRST_TOKEN:
            assert params.first_token is not None  # TransferParams checks it in this mode
            outputs = (params.first_token,)  # the first output token came from P
        prompt = tuple(request.prompt_token_ids)
        if params.num_tokens == 0:  # nothing was computed remotely: an ordinary local request
            return Admission(AdmitKind.LOCAL, prompt, outputs)
        # the handshake (rank 0's service, shared per P instance) overlaps the wait for blocks
        peers = self.service.peer(params.engine_id, params.side_channel, params.tp_size)
        self.pending[request.request_id] = _Pending(params, peers=peers)
        self.service.watch(request.request_id, params.side_channel, params.transfer_id)
        return Admission(AdmitKind.REMOTE, prompt, outputs, remote_tokens=params.num_tokens)

    def _check_matches_prompt(self, req: Request, params: TransferParams) -> None:
        n = len(req.prompt_token_ids)
        expected = n if params.handoff == HandoffMode.FIRST_TOKEN else n - 1
        if params.num_tokens != expected:
            raise ValueError(
                f"kv_transfer_params carry {params.num_tokens} tokens of state for a "
                f"{n}-token prompt in {params.handoff.value} mode (expected {expected})"
            )
        vocab = self.vocab_size
        if params.first_token is not None and not 0 <= params.first_token < vocab:
            raise ValueError(f"first_token {params.first_token} is out of range [0, {vocab})")
        if params.handoff == HandoffMode.FIRST_TOKEN and req.params.max_tokens < 2:
            raise ValueError("nothing left to decode: max_tokens < 2 in first-token mode")

    # ---- transfers ---------------------------------------------------------------------------
    def on_blocks_allocated(self, request_id: str, block_ids: BlockIds) -> None:
        p = self.pending[request_id]
        p.nonce = secrets.token_hex(8)
        self._start.append(ReadJob(request_id, p.params, block_ids, p.nonce))
        p.state = PendingState.READING

    def build_command(self) -> TransferCommand | None:
        start = self._handshaken()
        if start or self._cancel:
            cmd = TransferCommand(start=tuple(start), cancel=tuple(self._cancel))
            self._cancel = []
            return cmd
        if any(p.reads_live for p in self.pending.values()):
            return TransferCommand()  # poll the receivers for results
        return None

    def _handshaken(self) -> list[ReadJob]:
        """The queued jobs whose handshake is done, with every P rank's record; a failed
        handshake refuses its job on every rank (nothing was posted)."""
        out: list[ReadJob] = []
        waiting: list[ReadJob] = []
        for job in self._start:
            peers = self.pending[job.request_id].peers
            assert peers is not None  # set at admission
            if not peers.done():
                waiting.append(job)
                continue
            if peers.cancelled():
                why = "handshake with the prefill instance cancelled (the service closed)"
            elif (exc := peers.exception()) is None:
                out.append(replace(job, peers=peers.result()))
                continue
            else:
                why = f"handshake with the prefill instance failed: {type(exc).__name__}: {exc}"
            results = self.pending[job.request_id].results
            for rank in range(self.args.tp_size):
                results[rank] = ReadResult(job.request_id, ReadOutcome.REFUSED, why)
        self._start = waiting
        return out

    def on_report(self, report: TransferReport) -> None:
        for rank, res in report.results:
            p = self.pending.get(res.request_id)
            if p is not None and p.reads_live:
                p.results[rank] = res

    def poll(self) -> TransferEvents:
        ready: list[str] = []
        failed: list[TransferFailure] = []
        releasable: list[str] = []
        stats: list[tuple[str, dict[str, Any]]] = []
        for rid, p in list(self.pending.items()):
            if p.reads_live and len(p.results) == self.args.tp_size:
                if p.state is PendingState.QUARANTINED:  # no READ can write its blocks now
                    del self.pending[rid]
                    releasable.append(rid)
                    continue
                errors = [r.error or r.outcome.value for r in p.results.values() if not r.ok]
                if errors:
                    failed.append(self._fail(rid, p, errors[0], stats))
                    continue
                p.state = PendingState.CONFIRMING
                p.confirm = self.service.confirm(p.params.side_channel,
                                                 p.params.transfer_id, p.nonce)
            elif p.state is PendingState.CONFIRMING and p.confirm is not None \
                    and p.confirm.done():
                trusted, why = p.confirm.result()
                if not trusted:
                    failed.append(self._fail(rid, p, f"the prefill instance {why}: the READ "
                                                     "may have read reused blocks", stats))
                    continue
                del self.pending[rid]
                self.service.unwatch(rid)
                record = _stats(p, [])
                _log(rid, record)
                self._counters["kv_transfers_ok"] += 1
                self._counters["kv_transfer_bytes"] += record["bytes"]
                stats.append((rid, record))
                ready.append(rid)
        if not (ready or failed or releasable):
            return NO_EVENTS
        return TransferEvents(tuple(ready), tuple(failed), tuple(releasable), tuple(stats))

    def _fail(self, rid: str, p: _Pending, error: str,
              stats: list[tuple[str, dict[str, Any]]]) -> TransferFailure:
        del self.pending[rid]
        self.service.unwatch(rid, release=True)
        self.service.forget_peer(p.params.engine_id, p.params.side_channel)  # it may restart
        record = _stats(p, [error])
        _log(rid, record)
        self._counters["kv_transfers_failed"] += 1
        stats.append((rid, record))
        recompute = self.args.on_transfer_failure != FailurePolicy.FAIL
        if recompute:
            self._counters["requests_recomputed"] += 1
        return TransferFailure(rid, f"KV transfer from the prefill instance failed: {error}",
                               recompute)

    # ---- abort / lifecycle -------------------------------------------------------------------
    def abort(self, request_id: str) -> AbortAction:
        p = self.pending.get(request_id)
        if p is None:
            return AbortAction.NOT_MINE
        if p.state is PendingState.QUARANTINED:
            return AbortAction.ALREADY_ENDED  # aborted already: the blocks wait for reports
        self.service.unwatch(request_id, release=True)
        unposted = [j for j in self._start if j.request_id == request_id]
        if not p.reads_live or unposted:  # no READ was posted: none can write its blocks
            self._start = [j for j in self._start if j.request_id != request_id]
            del self.pending[request_id]
            return AbortAction.FINISH
        p.state = PendingState.QUARANTINED  # blocks held until every rank reports
        self._cancel.append(request_id)
        return AbortAction.QUARANTINE

    def on_finished(self, request_id: str) -> None:
        p = self.pending.get(request_id)
        if p is not None and not p.reads_live:  # e.g. its queue deadline passed
            del self.pending[request_id]
            self.service.unwatch(request_id, release=True)

    def has_work(self) -> bool:
        return bool(self.pending)

    def idle_wait_s(self) -> float | None:
        if self._cancel or any(self._handshake_done(j) for j in self._start):
            return 0.0
        return READ_POLL_S if self.pending else None

    def _handshake_done(self, job: ReadJob) -> bool:
        peers = self.pending[job.request_id].peers
        return peers is None or peers.done()

    def knows(self, request_id: str) -> bool:
        return request_id in self.pending

    def counters(self) -> dict[str, float]:
        return dict(self._counters)


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
