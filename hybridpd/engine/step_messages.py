"""Typed messages of the tensor-parallel executor, and the step delta codec.

Owns what rank 0 broadcasts to ranks 1..N-1 (`RankMessage`: one `StepMessage` per step, carrying
the schedule and any transfer command, so a step costs one broadcast; `TransferMessage`,
`AttachMessage`, `Shutdown`) and how a step's schedule travels: a request a worker does not
know yet (or whose state does not continue what it knows: preempted and recomputed, forked,
other parameters) is sent in full as a `ScheduledRequest`; a running one as a `RunningDelta`
(its new tokens, appended block ids, the small per-step fields). `StepEncoder` (rank 0) keeps
what each worker knows; `StepDecoder` (each worker) rebuilds the `SchedulerOutput` exactly and
checks every delta against its state (sequence number, context length, block counts): a
mismatch raises `StepDesyncError`, never a silent divergence.

Knows nothing of torch.distributed, models or scheduling policy. Structured-output masks
(`SchedulerOutput.token_masks`) are sampling data that only rank 0 uses: they are not sent.
"""

from __future__ import annotations

from dataclasses import dataclass

from hybridpd.disagg.commands import TransferCommand
from hybridpd.engine.scheduler import ScheduledRequest, SchedulerOutput


class StepDesyncError(RuntimeError):
    """A worker's view of the running requests disagrees with rank 0's step message."""


@dataclass(frozen=True)
class RunningDelta:
    """A request the worker already holds, continued by one more step."""

    request_id: str
    num_computed: int  # check: the worker's num_computed + the tokens it was fed last step
    token_ids: tuple[int, ...]  # the new tokens computed this step
    new_attn_block_ids: tuple[tuple[int, ...], ...]  # per attention group: ids appended
    num_attn_blocks: tuple[int, ...]  # check: per attention group, the table's length after
    sample: bool
    output_index: int
    score_from: int = 0
    score_targets: tuple[int, ...] = ()
    context_token_ids: tuple[int, ...] | None = None  # one-off (the token history's sync)


# How each `ScheduledRequest` field crosses a delta (a test checks this covers every field):
PER_STEP_FIELDS = frozenset({"token_ids", "num_computed", "attn_block_ids", "sample",
                             "output_index", "score_from", "score_targets", "context_token_ids"})
KEPT_FIELDS = frozenset({"request_id", "mamba_block_ids", "params", "num_samples",
                         "num_prompt_tokens"})  # a change here: the request goes in full

StepEntry = ScheduledRequest | RunningDelta  # in full (new to the worker) or as a delta


@dataclass(frozen=True)
class StepMessage:
    """One step for every rank: the schedule (in batch order) and any transfer command."""

    seq: int  # 1, 2, ...: a worker checks it got every step message, in order
    entries: tuple[StepEntry, ...]
    dropped: tuple[str, ...] = ()  # requests the worker forgets (not scheduled this step)
    preempted: tuple[str, ...] = ()
    remote_ready: tuple[str, ...] = ()
    copies: tuple[tuple[int, int], ...] = ()
    finished: tuple[str, ...] = ()
    transfer: TransferCommand | None = None  # ranks run it after the step, report gathered


@dataclass(frozen=True)
class TransferMessage:
    """A transfer command between steps; every rank's report is gathered to rank 0."""

    command: TransferCommand


@dataclass(frozen=True)
class AttachMessage:
    """Register the pool with NIXL; every rank's `RankAdvert` (its handshake record) gathered."""


@dataclass(frozen=True)
class Shutdown:
    """The ranks leave their loop and close."""


RankMessage = StepMessage | TransferMessage | AttachMessage | Shutdown


def _continues(prev: ScheduledRequest, s: ScheduledRequest) -> bool:
    """Is `s` the step after `prev` for the same request (so a delta describes it)?"""
    if s.num_computed != prev.num_computed + len(prev.token_ids):
        return False  # e.g. preempted and recomputed from 0
    if not (s.params is prev.params or s.params == prev.params):
        return False
    if (s.num_samples, s.num_prompt_tokens, s.mamba_block_ids) != (
            prev.num_samples, prev.num_prompt_tokens, prev.mamba_block_ids):
        return False
    if len(s.attn_block_ids) != len(prev.attn_block_ids):
        return False
    return all(new[: len(old)] == old for new, old in zip(s.attn_block_ids, prev.attn_block_ids))


class StepEncoder:
    """Rank 0: turns each `SchedulerOutput` into the `StepMessage` workers decode. It mirrors
    what they hold: the requests of the previous step, as last sent."""

    def __init__(self) -> None:
        self.seq = 0
        self.known: dict[str, ScheduledRequest] = {}

    def encode(self, out: SchedulerOutput, transfer: TransferCommand | None = None
               ) -> StepMessage:
        ids = {s.request_id for s in out.scheduled}
        if len(ids) != len(out.scheduled):
            raise ValueError("a step schedules one request id twice")
        dropped = tuple(rid for rid in self.known if rid not in ids)
        for rid in dropped:
            del self.known[rid]
        entries: list[StepEntry] = []
        for s in out.scheduled:
            prev = self.known.get(s.request_id)
            entries.append(s if prev is None or not _continues(prev, s) else _delta(prev, s))
            self.known[s.request_id] = s
        self.seq += 1
        return StepMessage(self.seq, tuple(entries), dropped, out.preempted, out.remote_ready,
                           out.copies, out.finished, transfer)


def _delta(prev: ScheduledRequest, s: ScheduledRequest) -> RunningDelta:
    return RunningDelta(
        request_id=s.request_id,
        num_computed=s.num_computed,
        token_ids=s.token_ids,
        new_attn_block_ids=tuple(new[len(old):]
                                 for new, old in zip(s.attn_block_ids, prev.attn_block_ids)),
        num_attn_blocks=tuple(len(g) for g in s.attn_block_ids),
        sample=s.sample,
        output_index=s.output_index,
        score_from=s.score_from,
        score_targets=s.score_targets,
        context_token_ids=s.context_token_ids,
    )


class StepDecoder:
    """A worker: rebuilds each step's `SchedulerOutput` (without `token_masks`) from the step
    messages, in order, checking each delta against what it holds."""

    def __init__(self) -> None:
        self.seq = 0
        self.known: dict[str, ScheduledRequest] = {}

    def decode(self, msg: StepMessage) -> SchedulerOutput:
        if msg.seq != self.seq + 1:
            raise StepDesyncError(f"step message {msg.seq} after {self.seq}: one was lost")
        for rid in msg.dropped:
            if self.known.pop(rid, None) is None:
                raise StepDesyncError(f"step {msg.seq} drops {rid!r}, which this rank lacks")
        scheduled = tuple(self._apply(msg.seq, e) for e in msg.entries)
        self.seq = msg.seq
        return SchedulerOutput(scheduled, msg.preempted, msg.remote_ready, None, msg.copies,
                               msg.finished)

    def _apply(self, seq: int, e: StepEntry) -> ScheduledRequest:
        if isinstance(e, ScheduledRequest):
            self.known[e.request_id] = e
            return e
        prev = self.known.get(e.request_id)
        if prev is None:
            raise StepDesyncError(f"step {seq}: a delta for {e.request_id!r}, unknown here")
        expect = prev.num_computed + len(prev.token_ids)
        if e.num_computed != expect:
            raise StepDesyncError(
                f"step {seq}: {e.request_id!r} has {e.num_computed} tokens computed on rank 0, "
                f"{expect} here")
        attn = tuple(old + new for old, new in zip(prev.attn_block_ids, e.new_attn_block_ids))
        if len(e.new_attn_block_ids) != len(prev.attn_block_ids) or \
                tuple(len(g) for g in attn) != e.num_attn_blocks:
            raise StepDesyncError(
                f"step {seq}: {e.request_id!r} has block tables of {e.num_attn_blocks} on "
                f"rank 0, {tuple(len(g) for g in attn)} here")
        s = ScheduledRequest(  # every field named: one missed here fails the codec's tests
            request_id=prev.request_id, token_ids=e.token_ids, num_computed=e.num_computed,
            attn_block_ids=attn, mamba_block_ids=prev.mamba_block_ids, sample=e.sample,
            params=prev.params, output_index=e.output_index, num_samples=prev.num_samples,
            score_from=e.score_from, score_targets=e.score_targets,
            num_prompt_tokens=prev.num_prompt_tokens, context_token_ids=e.context_token_ids)
        self.known[e.request_id] = s
        return s
