"""Decode-instance hooks: receive a prompt's state from a prefill instance, then decode.

Owns what a `--role decode` engine does for requests marked `do_remote_prefill`: check the
transfer params against the prompt, allocate blocks (the scheduler), start one READ per rank
(the executor's receivers), renew P's lease while waiting, and on the outcome either continue
from the transferred state or fail closed — recompute locally from scratch or finish with a
clear error, per `--on-transfer-failure`. Knows nothing of tensors or NIXL.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hybridpd.disagg.commands import TransferCommand
from hybridpd.disagg.leases import LeaseRenewer
from hybridpd.disagg.params import HandoffMode, TransferParams
from hybridpd.disagg.receiver import ReadJob, ReadResult
from hybridpd.engine.args import FailurePolicy
from hybridpd.engine.disagg_hooks import ColocatedHooks
from hybridpd.engine.protocol import GenerateOutput
from hybridpd.request import FinishReason, Request, RequestStatus

if TYPE_CHECKING:
    from hybridpd.engine.core import Engine

IDLE_SLEEP_S = 0.001
log = logging.getLogger("hybridpd.transfer")


@dataclass
class _Pending:
    params: TransferParams
    results: dict[int, ReadResult] = field(default_factory=dict)  # per D rank
    started: bool = False


class DecodeHooks(ColocatedHooks):
    def __init__(self, engine: Engine) -> None:
        super().__init__(engine)
        self.pending: dict[str, _Pending] = {}
        self.renewer = LeaseRenewer(period_s=max(0.2, engine.args.lease_s / 3))
        self._counters = {"kv_transfers_ok": 0.0, "kv_transfers_failed": 0.0,
                          "requests_recomputed": 0.0, "kv_transfer_bytes": 0.0}

    # ---- admission ---------------------------------------------------------------------------
    def on_add(self, req: Request, kv_transfer: dict[str, Any] | None) -> bool:
        if not kv_transfer:
            return True
        if not kv_transfer.get("do_remote_prefill"):
            raise ValueError("a decode instance accepts kv_transfer_params {do_remote_prefill}")
        fields = {k: v for k, v in kv_transfer.items() if k != "do_remote_prefill"}
        params = TransferParams.from_dict(fields)
        n = len(req.prompt_token_ids)
        expected = n if params.handoff == HandoffMode.FIRST_TOKEN else n - 1
        if params.num_tokens != expected:
            raise ValueError(
                f"kv_transfer_params carry {params.num_tokens} tokens of state for a "
                f"{n}-token prompt in {params.handoff.value} mode (expected {expected})"
            )
        if params.handoff == HandoffMode.FIRST_TOKEN:
            if req.params.max_tokens < 2:
                raise ValueError("nothing left to decode: max_tokens < 2 in first-token mode")
            req.prompt_token_ids = [*req.prompt_token_ids, params.first_token]
            req.max_tokens = req.params.max_tokens - 1
        if params.num_tokens == 0:
            return True  # nothing was computed remotely: an ordinary local request
        req.remote_tokens = params.num_tokens
        self.pending[req.request_id] = _Pending(params)
        self.renewer.watch(req.request_id, params.side_channels[0])
        return True

    # ---- transfers ---------------------------------------------------------------------------
    def start_transfers(self, request_ids: tuple[str, ...]) -> None:
        jobs = []
        for rid in request_ids:
            p = self.pending[rid]
            attn, mamba = self.engine.blocks.get(rid).frozen()
            jobs.append(ReadJob(rid, p.params.to_dict(), (*attn, *((b,) for b in mamba))))
            p.started = True
        if jobs:
            self._absorb(self.engine.executor.transfer(TransferCommand(start=tuple(jobs))))

    def before_schedule(self, outputs: list[GenerateOutput]) -> None:
        if any(p.started for p in self.pending.values()):
            self._absorb(self.engine.executor.transfer(TransferCommand()))
        self._finish_transfers(outputs)
        if self.pending and not self.engine.scheduler.running:
            time.sleep(IDLE_SLEEP_S)

    def _absorb(self, report: Any) -> None:
        for rank, res in report.results:
            p = self.pending.get(res.request_id)
            if p is not None:
                p.results[rank] = res

    def _finish_transfers(self, outputs: list[GenerateOutput]) -> None:
        tp = self.engine.args.tp_size
        for rid, p in list(self.pending.items()):
            if len(p.results) < tp:
                continue
            del self.pending[rid]
            errors = [r.error for r in p.results.values() if not r.ok]
            self.renewer.unwatch(rid, release=bool(errors))
            stats = _stats(p, errors)
            log.info(
                "kv transfer %s: %s, %d bytes, %d descriptors, %.3f ms, %.3f GB/s%s", rid,
                stats["outcome"], stats["bytes"], stats["descriptors"], stats["seconds"] * 1e3,
                stats["gbps"], f" ({stats['error']})" if errors else "",
            )
            if errors:
                self._on_failure(rid, errors[0], stats, outputs)
                continue
            self._counters["kv_transfers_ok"] += 1
            self._counters["kv_transfer_bytes"] += stats["bytes"]
            self.engine.scheduler.remote_done(rid, ok=True)
            outputs.append(GenerateOutput(rid, (), transfer_stats=stats))

    def _on_failure(self, rid: str, error: str, stats: dict, outputs: list) -> None:
        self._counters["kv_transfers_failed"] += 1
        req = self.engine.scheduler.requests[rid]
        if self.engine.args.on_transfer_failure == FailurePolicy.FAIL:
            outputs.append(GenerateOutput(rid, (), transfer_stats=stats))
            self.engine.finish_with_error(req, f"KV transfer from the prefill instance failed: "
                                               f"{error}", outputs)
            return
        self._counters["requests_recomputed"] += 1
        self.engine.scheduler.remote_done(rid, ok=False)  # recompute from scratch, locally
        outputs.append(GenerateOutput(rid, (), transfer_stats=stats))

    # ---- abort / lifecycle -------------------------------------------------------------------
    def on_abort(self, request_id: str) -> bool:
        p = self.pending.pop(request_id, None)
        if p is None:
            return False
        if p.started:  # release the READs before the blocks can be reused
            self.engine.executor.transfer(TransferCommand(cancel=(request_id,)))
        self.renewer.unwatch(request_id, release=True)
        self.engine.scheduler.finish(request_id, FinishReason.ABORT)
        return True

    def has_work(self) -> bool:
        return bool(self.pending)

    def knows(self, request_id: str) -> bool:
        return request_id in self.pending

    def counters(self) -> dict[str, float]:
        return dict(self._counters)

    def shutdown(self) -> None:
        self.renewer.close()


def _stats(p: _Pending, errors: list[str]) -> dict[str, Any]:
    res = list(p.results.values())
    nbytes = sum(r.nbytes for r in res)
    seconds = max(r.seconds for r in res)
    return {
        "outcome": "failed" if errors else "ok",
        "bytes": nbytes,
        "descriptors": sum(r.descriptors for r in res),
        "seconds": seconds,
        "gbps": nbytes / seconds / 1e9 if seconds > 0 and not errors else 0.0,
        "num_tokens": p.params.num_tokens,
        "error": errors[0] if errors else None,
        "ranks": len(res),
        "rank_bytes": [p.results[r].nbytes for r in sorted(p.results)],
        "rank_descriptors": [p.results[r].descriptors for r in sorted(p.results)],
    }


__all__ = ["DecodeHooks", "RequestStatus"]
