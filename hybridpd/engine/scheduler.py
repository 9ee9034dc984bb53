"""Continuous-batching scheduler: who runs this step, with how many tokens, in which blocks.

Owns the waiting queue, the running list, chunked prefill under a per-step token budget,
block growth and preemption by recompute. Never touches tensors, the model or NIXL: the engine
asks it for a `SchedulerOutput` and reports back which tokens were computed.

It owns the role's KV connector (`engine/kv_connector.py`) and calls it at fixed points:
admission (`add`), blocks given to a remote-prefill request (`schedule`), a handed-off prompt
computed (`hand_off`), the transfer command of a step and its report, the connector's events
(`apply_transfers`: ready / failed / releasable), `abort` and `finish`. It is the only writer
of request status and the only place blocks are freed (`finish`, `free_held`, preemption); P/D
state lives in the connector.

Policy: running requests first, in arrival order (decodes take one token, prefills a chunk);
a running request that cannot grow preempts the newest running request (its blocks are freed
and it recomputes later from its prompt + outputs). Then waiting requests, FCFS, while the
token budget, `max_num_seqs` and the pool allow. A waiting request never preempts anybody, so
a full pool makes requests wait, never crash, never deadlock: `check_fits` refuses at admission
any request that could not run even with the whole pool to itself.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from hybridpd.disagg.commands import TransferCommand, TransferReport
from hybridpd.disagg.handoff import Handoff
from hybridpd.disagg.params import TransferParams
from hybridpd.engine.block_manager import BlockManager
from hybridpd.engine.kv_connector import (
    AbortAction,
    Admission,
    AdmitKind,
    BlockIds,
    KVConnector,
    NoConnector,
    TransferEvents,
)
from hybridpd.engine.structured import TokenMasks
from hybridpd.request import FinishReason, Request, RequestStatus, SamplingParams


@dataclass(frozen=True)
class ScheduledRequest:
    request_id: str
    token_ids: tuple[int, ...]  # the new tokens computed this step
    num_computed: int  # tokens already in the cache (context)
    attn_block_ids: tuple[tuple[int, ...], ...]  # per attention group
    mamba_block_ids: tuple[int, ...]  # per Mamba group
    sample: bool  # this chunk reaches the end of the known tokens and a token is wanted
    params: SamplingParams
    output_index: int  # outputs so far, P's first token included (seeds the token's generator)
    num_samples: int = 1  # > 1: the prompt of an n / best_of request; one row per sample

    def sample_params(self) -> list[SamplingParams]:
        """Parameters of each row sampled from this request's logits."""
        if self.num_samples == 1:
            return [self.params]
        return [self.params.for_sample(i) for i in range(self.num_samples)]
    # prompt_logprobs: chunk rows score_from .. score_from + len(score_targets) - 1 are scored,
    # row score_from + i against prompt token score_targets[i] (empty: nothing to score)
    score_from: int = 0
    score_targets: tuple[int, ...] = ()
    # For the sampler's token history (`engine/token_history.py`), set when params need it:
    num_prompt_tokens: int = 0  # the sequence's first tokens that are prompt, not output
    context_token_ids: tuple[int, ...] | None = None  # tokens [0, num_computed) not fed here

    @property
    def is_decode(self) -> bool:
        return len(self.token_ids) == 1 and self.num_computed > 0


@dataclass(frozen=True)
class SchedulerOutput:
    scheduled: tuple[ScheduledRequest, ...]
    preempted: tuple[str, ...] = ()
    remote_ready: tuple[str, ...] = ()  # decode side: blocks allocated, READ may start
    token_masks: TokenMasks | None = None  # structured output: set by the engine, not here
    # forks: (src, dst) block contents to copy before this step's forward pass runs
    copies: tuple[tuple[int, int], ...] = ()
    finished: tuple[str, ...] = ()  # finished since the last step (token history rows freed)

    @property
    def num_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.scheduled)


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_batched_tokens: int, max_num_seqs: int,
                 connector: KVConnector | None = None) -> None:
        self.blocks = blocks
        self.connector: KVConnector = connector or NoConnector()
        self.budget = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.remote: dict[str, Request] = {}  # WAITING_FOR_REMOTE_KV
        self._remote_tokens: dict[str, int] = {}  # admitted REMOTE: tokens whose state arrives
        self.num_preemptions = 0
        self._copies: list[tuple[int, int]] = []  # from forks, go out with the next step
        self._finished: list[str] = []  # with token history, not yet told to the runner
        self.queue_s: dict[str, float] = {}  # started, queue time not yet reported (core pops)

    def _started(self, req: Request) -> None:
        """It leaves the waiting queue: the first time, its queue time is recorded."""
        if req.first_scheduled is None:
            req.first_scheduled = time.monotonic()
            self.queue_s[req.request_id] = req.first_scheduled - req.arrival

    # ---- admission -------------------------------------------------------------------------
    def check_fits(self, num_tokens: int) -> None:
        need = self.blocks.blocks_for(num_tokens)
        if need > self.blocks.num_usable:
            raise ValueError(
                f"request needs {need} cache blocks for {num_tokens} tokens, but the whole "
                f"pool has {self.blocks.num_usable}; shorten the prompt or max_tokens"
            )

    def add(self, req: Request, handoff: Handoff | None = None) -> Admission:
        """Admit `req` as its connector says (ValueError: refused, nothing kept). An ANSWERED
        request is not queued: the caller answers it with `Admission.params`."""
        admission = self.connector.admit(req, handoff)
        req.prompt_token_ids = list(admission.prompt_token_ids)
        req.output_token_ids = list(admission.output_token_ids)
        req.sample_final = admission.sample_final
        if admission.kind is AdmitKind.ANSWERED:
            return admission
        try:
            self.check_fits(len(req.prompt_token_ids) + req.max_tokens)
        except ValueError:
            self.connector.abort(req.request_id)
            raise
        req.status = RequestStatus.WAITING
        self.requests[req.request_id] = req
        self.waiting.append(req)
        if admission.kind is AdmitKind.REMOTE:
            self._remote_tokens[req.request_id] = admission.remote_tokens
        return admission

    def expired_waiting(self, now: float, timeout_s: float) -> list[Request]:
        """Waiting requests that never started (never left the queue: no preemption, no
        output of this instance's) and arrived more than `timeout_s` before `now`; the caller
        finishes them."""
        return [r for r in self.waiting
                if r.num_preemptions == 0 and r.first_scheduled is None
                and now - r.arrival > timeout_s]

    # ---- one step --------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        budget = self.budget
        chosen: list[tuple[Request, int]] = []
        preempted: list[str] = []
        budget = self._schedule_running(budget, chosen, preempted)
        ready: list[str] = []
        if not preempted:
            self._schedule_waiting(budget, chosen, ready)
        copies, self._copies = tuple(self._copies), []
        finished: tuple[str, ...] = ()
        if chosen and self._finished:  # only a step that runs reaches the runner
            finished, self._finished = tuple(self._finished), []
        return SchedulerOutput(
            scheduled=tuple(self._describe(r, n) for r, n in chosen),
            preempted=tuple(preempted),
            remote_ready=tuple(ready),
            copies=copies,
            finished=finished,
        )

    def _schedule_running(
        self, budget: int, chosen: list[tuple[Request, int]], preempted: list[str]
    ) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_uncomputed, budget)
            while not self.blocks.ensure(req.request_id, req.num_computed_tokens + n):
                victim = self.running.pop()
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is req:
                    break
            if req.status == RequestStatus.PREEMPTED:
                break
            chosen.append((req, n))
            budget -= n
            i += 1
        return budget

    def _schedule_waiting(
        self, budget: int, chosen: list[tuple[Request, int]], ready: list[str]
    ) -> None:
        while self.waiting and budget > 0:
            req = self.waiting[0]
            width = req.params.num_samples  # an n / best_of prompt forks into that many
            if len(self.running) + len(self.remote) + width > self.max_num_seqs:
                return
            remote = self._remote_tokens.get(req.request_id, 0)
            if remote > 0:
                # Room for the transferred state plus the next token.
                if not self.blocks.ensure(req.request_id, remote + 1):
                    return
                self._started(self.waiting.popleft())
                req.status = RequestStatus.WAITING_FOR_REMOTE_KV
                self.remote[req.request_id] = req
                ready.append(req.request_id)
                self.connector.on_blocks_allocated(req.request_id, self.block_ids(req.request_id))
                continue
            n = min(req.num_uncomputed, budget)
            if not self.blocks.ensure(req.request_id, req.num_computed_tokens + n):
                return
            self._started(self.waiting.popleft())
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            chosen.append((req, n))
            budget -= n

    def _describe(self, req: Request, n: int) -> ScheduledRequest:
        start = req.num_computed_tokens
        attn, mamba = self.blocks.get(req.request_id).frozen()
        reaches_end = start + n == req.num_tokens
        score_from, targets = _score_rows(req, start, n)
        context = None
        if req.params.needs_history:
            if start > 0 and not req.history_synced:  # e.g. D's first step: P computed these
                context = tuple(req.all_token_ids[:start])
            req.history_synced = True
        return ScheduledRequest(
            request_id=req.request_id,
            token_ids=tuple(req.all_token_ids[start : start + n]),
            num_computed=start,
            attn_block_ids=attn,
            mamba_block_ids=mamba,
            sample=reaches_end and req.sample_final,
            params=req.params,
            output_index=len(req.output_token_ids),
            num_samples=req.params.num_samples if reaches_end else 1,
            score_from=score_from,
            score_targets=targets,
            num_prompt_tokens=len(req.prompt_token_ids),
            context_token_ids=context,
        )

    def _preempt(self, req: Request) -> None:
        self.blocks.free(req.request_id)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    # ---- forks (n / best_of) ---------------------------------------------------------------
    def fork(self, parent: Request, children: list[Request]) -> int:
        """Replace the running `parent`, whose prompt (and nothing else) is computed, by
        `children` (each with its first output token appended): the first takes the parent's
        blocks, the others share its full attention blocks and get copies of the rest (copied
        at the start of the next step). A sibling the pool has no room for waits to recompute
        from its prompt and first token, as a preempted request does. Returns how many
        siblings got the parent's state without recomputing it."""
        pos = self.running.index(parent)
        self.running.pop(pos)
        del self.requests[parent.request_id]
        if parent.history_synced:  # its token history row goes; each sample syncs its own
            self._finished.append(parent.request_id)
        n_tokens = parent.num_computed_tokens
        forked: list[Request] = []
        for i, child in enumerate(children):
            child.first_scheduled = parent.first_scheduled  # it started with its parent
            self.requests[child.request_id] = child
            if i == 0:
                self.blocks.rename(parent.request_id, child.request_id)
                copies: list[tuple[int, int]] | None = []
            else:
                copies = self.blocks.fork(children[0].request_id, child.request_id, n_tokens)
            if copies is None:  # no room: recompute later, never preempt a running request
                child.status = RequestStatus.PREEMPTED
                child.num_computed_tokens = 0
                self.waiting.append(child)
                continue
            self._copies.extend(copies)
            child.status = RequestStatus.RUNNING
            child.num_computed_tokens = n_tokens
            forked.append(child)
        self.running[pos:pos] = forked
        return len(forked)

    # ---- feedback from the engine ----------------------------------------------------------
    def on_computed(self, out: SchedulerOutput) -> None:
        for s in out.scheduled:
            self.requests[s.request_id].num_computed_tokens += len(s.token_ids)

    def remote_done(self, request_id: str, ok: bool) -> None:
        """Decode side: the READ finished (ok) or failed (recompute from scratch)."""
        req = self.remote.pop(request_id)
        remote = self._remote_tokens.pop(request_id, 0)
        req.num_computed_tokens = remote if ok else 0
        req.status = RequestStatus.RUNNING
        self.running.insert(0, req)  # it already waited: first in line

    # ---- the connector's fixed points ------------------------------------------------------
    def block_ids(self, request_id: str) -> BlockIds:
        """Per attention group its block ids, then per Mamba group its one state block."""
        attn, mamba = self.blocks.get(request_id).frozen()
        return (*attn, *((b,) for b in mamba))

    def hands_off(self, request_id: str) -> bool:
        return self.connector.hands_off(request_id)

    def hand_off(self, req: Request, first_token: int | None,
                 reason: FinishReason | None) -> TransferParams | None:
        """The prompt of a request its connector hands off is computed (`first_token` sampled,
        None in n-1 mode; `reason`: that token already ends it): the request finishes here,
        its blocks held for the remote reader when the connector says so. Returns the params
        to answer with (None: nothing handed off)."""
        hold, params = self.connector.on_prompt_done(
            req, self.block_ids(req.request_id), first_token, reason is not None)
        self.finish(req.request_id, FinishReason.LENGTH if hold else reason or FinishReason.LENGTH,
                    keep_blocks=hold)
        return params

    def transfer_command(self) -> TransferCommand | None:
        """What the ranks' endpoints do after this step (None: nothing)."""
        return self.connector.build_command()

    def on_transfer_report(self, report: TransferReport) -> TransferEvents:
        """The endpoints' answer to the step's command; applies what it settled."""
        self.connector.on_report(report)
        return self.apply_transfers()

    def apply_transfers(self) -> TransferEvents:
        """Carry out the connector's events: ready requests continue from the transferred
        state, failed ones recompute from scratch (or are left to the caller to fail, per the
        connector's policy: `TransferFailure.recompute` False), releasable held blocks are
        freed. Returns the events (the caller emits their stats and failures)."""
        events = self.connector.poll()
        for rid in events.ready:
            self.remote_done(rid, ok=True)
        for f in events.failed:
            if f.recompute:
                self.remote_done(f.request_id, ok=False)
        for rid in events.releasable:
            self.free_held(rid)
        return events

    def abort(self, request_id: str) -> bool:
        """Abort a request as its connector says (quarantine its blocks while READs may still
        write them, free a held hand-off, or finish it); False for an id nobody knows."""
        action = self.connector.abort(request_id)
        if action is AbortAction.FREE_HELD:
            self.free_held(request_id)
            return True
        if action is AbortAction.ALREADY_ENDED:
            return True
        known = request_id in self.requests or action is not AbortAction.NOT_MINE
        self.finish(request_id, FinishReason.ABORT,
                    keep_blocks=action is AbortAction.QUARANTINE)
        return known

    def finish(self, request_id: str, reason: FinishReason, keep_blocks: bool = False) -> None:
        req = self.requests.pop(request_id, None)
        if req is None:
            return
        self._remote_tokens.pop(request_id, None)
        if not keep_blocks:
            self.connector.on_finished(request_id)
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        if req.history_synced:
            self._finished.append(request_id)
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.remote.pop(request_id, None)
        if not keep_blocks:
            self.blocks.free(request_id)

    def free_held(self, request_id: str) -> None:
        """Free the blocks of a request finished with `keep_blocks=True` (a P hand-off whose
        lease ended, a D request whose quarantine ended): block lifetime has this one owner."""
        if request_id in self.requests:
            raise ValueError(f"request {request_id!r} is still scheduled: finish it instead")
        self.blocks.free(request_id)

    # ---- introspection ---------------------------------------------------------------------
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_running(self) -> int:
        return len(self.running) + len(self.remote)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)


def _score_rows(req: Request, start: int, n: int) -> tuple[int, tuple[int, ...]]:
    """The prompt rows of the chunk [start, start + n) whose scores are still due: position p
    predicts scored token p + 1; rows already scored (before a preemption) are not redone."""
    if req.params.prompt_logprobs is None:
        return 0, ()
    full = req.scored_token_ids
    first = max(start, len(req.prompt_scores))
    end = min(start + n, len(req.prompt_token_ids), len(full) - 1)
    if first >= end:
        return 0, ()
    return first - start, tuple(full[first + 1 : end + 1])
