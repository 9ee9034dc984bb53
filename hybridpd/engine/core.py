"""The engine loop of one instance: requests in, token deltas out.

Owns request admission and validation, the step (release/promote transfers -> schedule -> run
-> update), stop conditions (max_tokens, EOS, stop token ids, context limit, a complete
structured-output grammar; the per-request matchers are `engine/structured.py`'s) and the outputs
of P/D events (a hand-off's params, a transfer's stats, a failed transfer's error). The P/D
policy is the KV connector's, which the scheduler owns and drives (`engine/kv_connector.py`);
a step's transfer command rides the step (`Executor.execute_with_transfer`). Knows nothing of
HTTP, detokenization or stop strings (the API process and `LLM` handle text). Tensors live in
the executor's workers.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import replace

from hybridpd.cache.pool import BlockPool
from hybridpd.disagg.commands import TransferReport
from hybridpd.disagg.handoff import RemotePrefill
from hybridpd.disagg.transfer_service import TransferService
from hybridpd.engine.args import EngineArgs, Role
from hybridpd.engine.block_manager import BlockManager
from hybridpd.engine.executor import Executor, make_executor
from hybridpd.engine.fork_groups import ForkGroup, ForkGroups, sample_id
from hybridpd.engine.kv_connector import AdmitKind, TransferEvents
from hybridpd.engine.protocol import (
    QUEUE_TIMEOUT_MESSAGE,
    DuplicateRequestError,
    EngineStats,
    ErrorKind,
    GenerateOutput,
    GenerateRequest,
    TokenLogprob,
)
from hybridpd.engine.roles import make_connector
from hybridpd.engine.runner import StepResult
from hybridpd.engine.sampler import PromptScores
from hybridpd.engine.scheduler import Scheduler, SchedulerOutput
from hybridpd.engine.structured import GrammarMatcher, MatchOutcome, StructuredOutputs
from hybridpd.request import FinishReason, Request, RequestStatus

log = logging.getLogger(__name__)


class Engine:
    def __init__(self, args: EngineArgs, executor: Executor | None = None) -> None:
        self.args = args
        self.executor = executor or make_executor(args)
        geo = self.executor.geometry
        self.model_config = self.executor.model_config
        self.max_model_len = self.model_config.context_limit(args.max_model_len)
        self.blocks = BlockManager(
            BlockPool(self.executor.num_blocks),
            len(geo.attention_groups),
            len(geo.mamba_groups),
            geo.block_tokens,
        )
        # the P/D control plane on rank 0 (leases, renewals, confirmations): P/D roles only
        self.transfers: TransferService | None = None
        side_channel = ""
        if args.role != Role.BOTH:
            self.transfers = TransferService(
                lease_s=args.lease_s, p_tp=args.tp_size, reader=args.engine_id,
                max_lease_s=args.max_lease_s, secret=args.kv_secret,
                handshake_timeout_s=args.handshake_timeout_s)
            try:  # the instance's one side channel, answering for every rank
                side_channel = self.transfers.open_side_channel(
                    args.engine_id, self.executor.adverts, args.side_channel_host,
                    args.side_channel_port, serves_reads=args.role == Role.PREFILL)
            except BaseException:
                self.transfers.close()
                self.executor.shutdown()
                raise
        self.connector = make_connector(args, self.model_config.vocab_size, side_channel,
                                        self.transfers)
        self.scheduler = Scheduler(self.blocks, args.max_num_batched_tokens, args.max_num_seqs,
                                   self.connector)
        self.eos_ids = frozenset(self.model_config.eos_token_ids)
        self.counters: dict[str, float] = {"requests_preempted": 0.0, "step_failures": 0.0,
                                           "queue_timeouts": 0.0, "prompt_tokens_computed": 0.0,
                                           "forks": 0.0, "samples_forked": 0.0}
        self.structured = StructuredOutputs(args.model_dir, self.model_config.vocab_size,
                                            sorted(self.eos_ids))
        self.forks = ForkGroups()
        self._pending: list[GenerateOutput] = []  # n / best_of: outputs owed to the next step
        self._answered: list[GenerateOutput] = []  # hand-offs answered at admission (next step)
        # requests admitted with outputs made elsewhere (D, first-token mode): the tokens they
        # came with, all of them input here (prompt_tokens_computed counts them)
        self._given: dict[str, int] = {}
        # requests whose prompt logprobs are still to be sent (with their first output)
        self._unsent_scores: dict[str, Request] = {}
        # the last step scheduled nothing and no request came or went since: only a transfer
        # or lease event (or time) can give the next step something to compute
        self._stalled = False

    # ---- EngineCore protocol ---------------------------------------------------------------
    def add_request(self, g: GenerateRequest) -> None:
        self._stalled = False
        self._validate(g)
        req = Request(
            request_id=g.request_id,
            prompt_token_ids=list(g.prompt_token_ids),
            params=g.params,
            arrival=time.monotonic(),
        )
        spec = g.params.structured
        if spec is not None:  # compile (or fetch) before anything is set up: a bad spec is a 400
            req.grammar = self.structured.matcher(spec)
        if g.params.prompt_logprobs is not None:
            req.scored_token_ids = list(g.prompt_token_ids)  # before a role hook trims it
        if g.params.max_tokens == 0:
            req.sample_final = False  # prefill only: score the prompt, finish with "length"
        admission = self.scheduler.add(req, g.handoff)
        if admission.kind is AdmitKind.ANSWERED:  # nothing to compute: answered next step
            self._answered.append(GenerateOutput(
                request_id=req.request_id, new_token_ids=(), finished=True,
                finish_reason=FinishReason.LENGTH,
                num_prompt_tokens=len(req.prompt_token_ids) + 1,
                kv_transfer_params=admission.params))
            self._track_scores(req)
            return
        if req.output_token_ids:
            self._given[req.request_id] = req.num_tokens
            if req.grammar is not None:
                self._replay_remote_outputs(req, req.grammar)
        if g.params.num_samples > 1:
            self.forks.add(req.request_id, g.params, len(g.prompt_token_ids))
        self._track_scores(req)

    def _track_scores(self, req: Request) -> None:
        if req.params.prompt_logprobs is not None:
            self._unsent_scores[req.request_id] = req

    def abort_request(self, request_id: str) -> bool:
        self._stalled = False
        self._unsent_scores.pop(request_id, None)
        self.scheduler.queue_s.pop(request_id, None)
        group = self.forks.get(request_id)
        if group is not None:  # every sample (or the prompt still being computed)
            self.forks.drop(group)
            for rid in self.forks.live_ids(group):
                self.scheduler.abort(rid)
            return True
        owner = self.forks.owner(request_id)
        if owner is not None:  # one sample (its stop string matched): the others go on
            self.scheduler.finish(request_id, FinishReason.ABORT)
            self._pending.extend(self.forks.mark_aborted(*owner))
            return True
        return self.scheduler.abort(request_id)

    def step(self) -> list[GenerateOutput]:
        outputs = self._step()
        if len(self.forks):  # samples' outputs -> their request's, before the scores
            outputs = self.forks.translate(outputs)
        if self._unsent_scores:
            outputs = self._attach_scores(outputs)
        if self._pending:  # client outputs already (a stopped sample ended its request)
            outputs, self._pending = self._pending + outputs, []
        return outputs

    def _attach_scores(self, outputs: list[GenerateOutput]) -> list[GenerateOutput]:
        """A request's first output carries its prompt logprobs (first entry None). Every
        first output comes once the whole prompt was computed (a first token, the end of a
        prompt-only request, P's hand-off), whichever path (role hooks included) made it; an
        error output carries none."""
        for i, o in enumerate(outputs):
            req = self._unsent_scores.pop(o.request_id, None)
            if req is not None and o.error is None:
                outputs[i] = replace(o, prompt_logprobs=(None, *req.prompt_scores))
        return outputs

    def _step(self) -> list[GenerateOutput]:
        outputs, self._answered = self._answered, []
        self._transfer_outputs(self.scheduler.apply_transfers(), outputs)
        self._expire_queued(outputs)
        out = self._with_token_masks(self.scheduler.schedule())
        self.counters["requests_preempted"] += len(out.preempted)
        cmd = self.scheduler.transfer_command()  # READs to post / cancel, or a poll
        self._stalled = not (out.scheduled or out.copies or out.remote_ready or outputs)
        if out.scheduled or out.copies:
            try:
                if cmd is None:
                    result, report = self.executor.execute(out), None
                else:  # one call (one broadcast under TP) carries the step and the command
                    result, report = self.executor.execute_with_transfer(out, cmd)
            except Exception as exc:  # noqa: BLE001 - fail this batch, keep serving others
                if not self.executor.recoverable:
                    raise
                self._fail_batch(out, exc, outputs)
                if cmd is not None:  # the step raised before its transfer command ran
                    self._absorb(self.executor.transfer(cmd), outputs)
                return self._with_queue_times(outputs)
            self._count_prompt_tokens(out)
            self.scheduler.on_computed(out)
            self._update(out, result, outputs)
        else:
            report = None if cmd is None else self.executor.transfer(cmd)
        if report is not None:
            self._absorb(report, outputs)
        return self._with_queue_times(outputs)

    def _absorb(self, report: TransferReport, outputs: list[GenerateOutput]) -> None:
        self._transfer_outputs(self.scheduler.on_transfer_report(report), outputs)

    def _transfer_outputs(self, events: TransferEvents, outputs: list[GenerateOutput]) -> None:
        """The outputs of P/D events the scheduler applied: one transfer record per request,
        and the error of a failed transfer under `--on-transfer-failure fail`."""
        if not events:
            return
        for rid, stats in events.stats:
            outputs.append(GenerateOutput(rid, (), transfer_stats=stats))
        for f in events.failed:
            req = self.scheduler.requests.get(f.request_id)
            if not f.recompute and req is not None:
                self.finish_with_error(req, f.error, outputs, ErrorKind.TRANSFER_FAILED)

    def _with_queue_times(self, outputs: list[GenerateOutput]) -> list[GenerateOutput]:
        """A request's first output carries its queue time (arrival -> first scheduled)."""
        pending = self.scheduler.queue_s
        if pending:
            for i, o in enumerate(outputs):
                if o.request_id in pending:
                    outputs[i] = replace(o, queued_s=pending.pop(o.request_id))
        return outputs

    def _fail_batch(self, out: SchedulerOutput, exc: Exception, outputs: list) -> None:
        """A model step raised (e.g. out of device memory): the requests of that batch end
        with an error, their blocks are freed, every other request goes on."""
        log.exception("model step failed; failing its %d requests", len(out.scheduled))
        self.counters["step_failures"] += 1
        for s in out.scheduled:
            req = self.scheduler.requests.get(s.request_id)
            if req is not None:
                self.finish_with_error(req, f"the model step failed: {type(exc).__name__}: "
                                            f"{str(exc).splitlines()[0] if str(exc) else ''}",
                                       outputs, ErrorKind.INTERNAL)

    def has_work(self) -> bool:
        return (self.scheduler.has_work() or self.connector.has_work() or bool(self._pending)
                or bool(self._answered))

    def idle_wait_s(self) -> float | None:
        """How long the driver may block before the next step (the step itself never
        sleeps): 0 when a step would compute or answer something, the role's poll interval
        when only transfers or leases are outstanding, None when there is nothing at all."""
        if self._pending or self._answered:
            return 0.0
        wait = self.connector.idle_wait_s()
        if wait == 0.0 or (self.scheduler.has_work() and not self._stalled):
            return 0.0
        if wait is not None:
            return wait  # only transfers or leases can change anything now
        return 0.0 if self.scheduler.has_work() else None

    @property
    def side_channels(self) -> tuple[str, ...]:
        """"host:port" of the instance's one side channel as bound (rank 0's transfer
        service; P/D roles), empty otherwise."""
        address = None if self.transfers is None else self.transfers.address
        return () if address is None else (address,)

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting,
            pool_total_blocks=self.blocks.num_usable,
            pool_free_blocks=self.blocks.num_free,
            counters={**self.counters, **self.connector.counters()},
        )

    def shutdown(self) -> None:
        self.connector.shutdown()
        if self.transfers is not None:
            self.transfers.close()
        self.executor.shutdown()

    # ---- internals -------------------------------------------------------------------------
    def _with_token_masks(self, out: SchedulerOutput) -> SchedulerOutput:
        """Structured output: the allowed-token masks of this step's sampled rows."""
        rows = []
        for s in out.scheduled:
            req = self.scheduler.requests.get(s.request_id)
            if s.sample and req is not None and req.grammar is not None:
                rows.append((s.request_id, req.grammar))
        masks = self.structured.token_masks(rows)
        return out if masks is None else dataclasses.replace(out, token_masks=masks)

    def _replay_remote_outputs(self, req: Request, grammar: GrammarMatcher) -> None:
        """D in first-token mode: the grammar takes the output token(s) P already sampled
        (the request's outputs at admission)."""
        for token in req.output_token_ids:
            if grammar.consume(token) == MatchOutcome.REJECTED:
                self.scheduler.abort(req.request_id)
                raise ValueError(f"the first token {token} from the prefill instance does not "
                                 f"fit the structured-output grammar: {grammar.error}")

    def _expire_queued(self, outputs: list) -> None:
        """The queue deadline: a request that could not start within `queue_timeout_s` ends
        with ErrorKind.QUEUE_TIMEOUT, saying it never started (so a proxy may try another
        instance); on D its pending hand-off goes with it (the connector tells P)."""
        timeout = self.args.queue_timeout_s
        if timeout is None or not self.scheduler.waiting:
            return
        for req in self.scheduler.expired_waiting(time.monotonic(), timeout):
            self.counters["queue_timeouts"] += 1
            self.finish_with_error(
                req, f"{QUEUE_TIMEOUT_MESSAGE}: the request could not start within "
                     f"{timeout:g} s (the instance is saturated)", outputs,
                ErrorKind.QUEUE_TIMEOUT)

    def _validate(self, g: GenerateRequest) -> None:
        n = len(g.prompt_token_ids)
        if n == 0:
            raise ValueError("the prompt is empty")
        vocab = self.model_config.vocab_size
        bad = [t for t in g.prompt_token_ids if not 0 <= int(t) < vocab]
        if bad:
            raise ValueError(f"prompt token ids out of range [0, {vocab}): {bad[:5]}")
        g.params.check_token_ids(vocab)
        if n + g.params.max_tokens > self.max_model_len:
            raise ValueError(
                f"prompt ({n} tokens) + max_tokens ({g.params.max_tokens}) exceeds the maximum "
                f"context length {self.max_model_len}"
            )
        if isinstance(g.handoff, RemotePrefill):
            if g.params.prompt_logprobs is not None:
                raise ValueError("prompt_logprobs are computed by the prefill instance "
                                 "(it sees the prompt); do not send them to the decode leg")
            if g.params.max_tokens == 0:
                raise ValueError("max_tokens=0 computes the prompt only; send it to a "
                                 "prefill or co-located instance, not the decode leg")
        ids = [g.request_id]
        k = g.params.num_samples
        if k > 1:
            if k > self.args.max_num_seqs:
                raise ValueError(f"n / best_of ({k}) exceeds max_num_seqs "
                                 f"({self.args.max_num_seqs}): its samples could never run")
            if self.args.role == Role.PREFILL:
                raise ValueError("n / best_of > 1 goes to the decode instance (it forks the "
                                 "transferred prompt); the prefill leg runs n = 1")
            ids += [sample_id(g.request_id, i) for i in range(k)]
        for rid in ids:
            if (rid in self.scheduler.requests or self.connector.knows(rid)
                    or self.forks.knows(rid)):
                raise DuplicateRequestError(f"request id {rid!r} is already in use")

    def _count_prompt_tokens(self, out: SchedulerOutput) -> None:
        """prompt_tokens_computed: prompt tokens run through the model (a forked prompt counts
        once, a recomputed one again; on D in first-token mode P's first token is input too)."""
        if len(self._given) > len(self.scheduler.requests):  # forget the finished ones
            self._given = {r: n for r, n in self._given.items() if r in self.scheduler.requests}
        for s in out.scheduled:
            req = self.scheduler.requests.get(s.request_id)
            if req is not None:
                given = self._given.get(s.request_id, len(req.prompt_token_ids))
                end = min(given, s.num_computed + len(s.token_ids))
                self.counters["prompt_tokens_computed"] += max(0, end - s.num_computed)

    def _update(self, out: SchedulerOutput, result: StepResult, outputs: list) -> None:
        sampled: dict[str, list[int]] = {}
        for i, rid in enumerate(result.sampled):
            sampled.setdefault(rid, []).append(i)
        scores = result.scores or {}
        for s in out.scheduled:
            req = self.scheduler.requests.get(s.request_id)
            if req is None:
                continue
            if s.request_id in scores:
                req.prompt_scores.extend(_prompt_scores(scores[s.request_id], s.score_targets))
            rows = sampled.get(s.request_id)
            group = self.forks.get(s.request_id) if rows and s.num_samples > 1 else None
            if group is not None and rows is not None:
                self._fork(req, group, rows, result, outputs)
            elif rows:
                self._append_token(req, result, rows[0], outputs)
            elif not req.sample_final and req.num_uncomputed == 0:
                if self.scheduler.hands_off(req.request_id):
                    self._hand_off(req, None, None, None, outputs)  # n-1: D computes token N
                else:
                    self._finish_prefill_only(req, outputs)

    def _finish_prefill_only(self, req: Request, outputs: list) -> None:
        """max_tokens = 0: the prompt is computed (and scored); nothing is sampled."""
        self.scheduler.finish(req.request_id, FinishReason.LENGTH)
        outputs.append(GenerateOutput(
            request_id=req.request_id,
            new_token_ids=(),
            finished=True,
            finish_reason=FinishReason.LENGTH,
            num_prompt_tokens=len(req.prompt_token_ids),
        ))

    def _fork(self, parent: Request, group: ForkGroup, rows: list[int], result: StepResult,
              outputs: list) -> None:
        """The prompt of an n / best_of request is computed and one first token per sample
        was drawn from its logits: fork its state into the samples (the scheduler shares the
        full attention blocks and copies the rest), then give each sample its token."""
        children = [
            Request(
                request_id=sid, prompt_token_ids=list(parent.prompt_token_ids),
                params=parent.params.for_sample(i), arrival=parent.arrival,
                max_tokens=parent.max_tokens, output_token_ids=list(parent.output_token_ids),
                num_preemptions=parent.num_preemptions,
            )
            for i, sid in enumerate(self.forks.forked(group))
        ]
        if parent.grammar is not None:  # each sample its own matcher, where the parent's is
            for child in children:
                child.grammar = self._matcher_like(parent)
        self.counters["forks"] += 1
        self.counters["samples_forked"] += self.scheduler.fork(parent, children)
        for child, row in zip(children, rows):
            self._append_token(child, result, row, outputs)

    def _matcher_like(self, req: Request) -> GrammarMatcher:
        """A fresh matcher of `req`'s grammar in the state of `req`'s (which has taken only
        the outputs produced elsewhere: the prompt's tail on D in first-token mode)."""
        spec = req.params.structured
        assert spec is not None
        grammar = self.structured.matcher(spec)
        for token in req.output_token_ids:
            grammar.consume(token)  # the parent's matcher took it: it fits
        return grammar

    def _append_token(self, req: Request, result: StepResult, row: int, outputs: list) -> None:
        sample = result.sample
        assert sample is not None  # the request is among result.sampled: a row was sampled
        token = int(sample.token_ids[row])
        req.output_token_ids.append(token)
        lp = _logprob(sample, row, req.params.logprobs) if sample.logprobs is not None else None
        reason = self._stop_reason(req, token)
        if req.grammar is not None:
            outcome = req.grammar.consume(token)
            if outcome == MatchOutcome.REJECTED:
                self.finish_with_error(req, f"sampled token {token} is outside the structured-"
                                            f"output grammar: {req.grammar.error}", outputs,
                                       ErrorKind.INTERNAL)
                return
            if outcome == MatchOutcome.COMPLETE and reason is None:
                reason = FinishReason.STOP  # the grammar can take nothing more
        if self.scheduler.hands_off(req.request_id):
            self._hand_off(req, token, lp, reason, outputs)
            return
        if reason is not None:
            self.scheduler.finish(req.request_id, reason)
        outputs.append(
            GenerateOutput(
                request_id=req.request_id,
                new_token_ids=(token,),
                finished=reason is not None,
                finish_reason=reason,
                new_logprobs=None if lp is None else (lp,),
                num_prompt_tokens=len(req.prompt_token_ids),
            )
        )

    def _hand_off(self, req: Request, token: int | None, lp: TokenLogprob | None,
                  reason: FinishReason | None, outputs: list[GenerateOutput]) -> None:
        """P: the prompt of a `do_remote_decode` request is computed (its first token sampled,
        or None in n-1 mode): its one output carries the params of the held state (none when
        that token already ends the request)."""
        params = self.scheduler.hand_off(req, token, reason)
        outputs.append(GenerateOutput(
            request_id=req.request_id,
            new_token_ids=() if token is None else (token,),
            finished=True,
            finish_reason=reason or FinishReason.LENGTH,
            new_logprobs=None if lp is None else (lp,),
            num_prompt_tokens=len(req.prompt_token_ids) + (token is None),
            kv_transfer_params=params,
        ))

    def _stop_reason(self, req: Request, token: int) -> FinishReason | None:
        p = req.params
        if len(req.output_token_ids) >= p.min_tokens:
            if not p.ignore_eos and token in self.eos_ids:
                return FinishReason.STOP
            if token in p.stop_token_ids:
                return FinishReason.STOP
        if len(req.output_token_ids) >= req.max_tokens or req.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH
        return None

    def finish_with_error(self, req: Request, message: str, outputs: list,
                          kind: ErrorKind) -> None:
        owner = self.forks.owner(req.request_id)
        if owner is not None:  # one failed sample fails its request: end the others too
            for rid in self.forks.live_ids(owner[0]):
                if rid != req.request_id:
                    self.scheduler.finish(rid, FinishReason.ABORT)
        self.scheduler.finish(req.request_id, FinishReason.ERROR)
        req.status = RequestStatus.FINISHED
        outputs.append(
            GenerateOutput(
                request_id=req.request_id,
                new_token_ids=(),
                finished=True,
                finish_reason=FinishReason.ERROR,
                error=message,
                error_kind=kind,
            )
        )


def _logprob(sample, row: int, n: int | None) -> TokenLogprob | None:  # noqa: ANN001
    if n is None:
        return None
    top: tuple[tuple[int, float], ...] = ()
    if n > 0 and sample.top_ids is not None:
        top = tuple(
            (int(sample.top_ids[row, j]), float(sample.top_logprobs[row, j])) for j in range(n)
        )
    return TokenLogprob(int(sample.token_ids[row]), float(sample.logprobs[row]), top)


def _prompt_scores(scores: PromptScores, targets: tuple[int, ...]) -> list[TokenLogprob]:
    top: list[tuple[tuple[int, float], ...]] = [()] * len(targets)
    if scores.top_ids is not None and scores.top_logprobs is not None:
        ids, lps = scores.top_ids.tolist(), scores.top_logprobs.tolist()
        top = [tuple(zip(i, lp)) for i, lp in zip(ids, lps)]
    return [TokenLogprob(t, lp, tp, rank) for t, lp, tp, rank
            in zip(targets, scores.logprobs.tolist(), top, scores.ranks.tolist())]


def build_engine_core(args: EngineArgs) -> Engine:
    """Factory used by the engine process (picklable via functools.partial)."""
    return Engine(args)


__all__ = ["Engine", "build_engine_core", "Role"]
