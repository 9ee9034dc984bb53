"""The TP executor's step messages: new requests go in full, running ones as deltas, and a
worker rebuilds exactly the schedule rank 0 ran (preempted and recomputed, finished, forked
n > 1 samples that share blocks, prompt-logprob rows); a delta that does not fit the worker's
state is a clear error."""

from __future__ import annotations

import pickle
from dataclasses import replace

import pytest

from hybridpd.cache.pool import BlockPool
from hybridpd.disagg.commands import TransferCommand
from hybridpd.engine.block_manager import BlockManager
from hybridpd.engine.scheduler import ScheduledRequest, Scheduler, SchedulerOutput
from hybridpd.engine.step_messages import (
    RunningDelta,
    StepDecoder,
    StepDesyncError,
    StepEncoder,
    StepMessage,
)
from hybridpd.request import FinishReason, Request, SamplingParams


class Loop:
    """A scheduler driven like the engine does (tokens appended, max_tokens finishes, n > 1
    prompts forked), every step encoded, pickled (as the broadcast does) and decoded."""

    def __init__(self, pool_blocks: int, budget: int = 32, seqs: int = 8) -> None:
        self.blocks = BlockManager(BlockPool(pool_blocks), 2, 1, 4)
        self.sched = Scheduler(self.blocks, max_num_batched_tokens=budget, max_num_seqs=seqs)
        self.enc, self.dec = StepEncoder(), StepDecoder()
        self.messages: list[StepMessage] = []
        self.preempted: set[str] = set()
        self.forked: set[str] = set()

    def add(self, rid: str, prompt_len: int, params: SamplingParams) -> None:
        req = Request(rid, [3 + (i * 7) % 50 for i in range(prompt_len)], params)
        if params.prompt_logprobs is not None:
            req.scored_token_ids = list(req.prompt_token_ids)  # as the engine sets it
        self.sched.add(req)

    def step(self) -> SchedulerOutput:
        out = self.sched.schedule()
        msg = pickle.loads(pickle.dumps(self.enc.encode(out)))
        self.messages.append(msg)
        assert self.dec.decode(msg) == replace(out, token_masks=None)
        self.preempted.update(out.preempted)
        self.sched.on_computed(out)
        for s in out.scheduled:
            if s.sample:
                self._sampled(s)
        return out

    def _sampled(self, s: ScheduledRequest) -> None:
        req = self.sched.requests[s.request_id]
        if s.num_samples > 1:  # the prompt of an n > 1 request: fork its state
            kids = [Request(f"{s.request_id}.{i}", list(req.prompt_token_ids),
                            req.params.for_sample(i)) for i in range(s.num_samples)]
            self.sched.fork(req, kids)
            for k in kids:
                k.output_token_ids.append(11)
                self.forked.add(k.request_id)
            return
        req.output_token_ids.append(5 + len(req.output_token_ids))
        if len(req.output_token_ids) >= req.params.max_tokens:
            self.sched.finish(s.request_id, FinishReason.LENGTH)

    def run(self, max_steps: int = 200) -> None:
        for _ in range(max_steps):
            if not self.sched.has_work():
                return
            self.step()
        raise AssertionError("the requests did not finish")


def _entries(loop: Loop, rid: str) -> list[type]:
    return [type(e) for m in loop.messages for e in m.entries if e.request_id == rid]


def test_new_requests_in_full_then_running_ones_as_deltas() -> None:
    loop = Loop(pool_blocks=64)
    loop.add("a", 10, SamplingParams(max_tokens=6))
    loop.add("b", 3, SamplingParams(max_tokens=4))
    loop.run()
    for rid, outputs in (("a", 6), ("b", 4)):
        kinds = _entries(loop, rid)
        assert kinds[0] is ScheduledRequest and set(kinds[1:]) == {RunningDelta}
        assert len(kinds) == outputs  # the prompt step, then one decode per further token


def test_finished_requests_are_dropped_and_the_worker_forgets_them() -> None:
    loop = Loop(pool_blocks=64)
    loop.add("short", 2, SamplingParams(max_tokens=2))
    loop.add("long", 2, SamplingParams(max_tokens=8))
    loop.run()
    dropped = [rid for m in loop.messages for rid in m.dropped]
    assert dropped == ["short"]  # "long" ends with the last step: nothing later drops it
    assert set(loop.dec.known) == {"long"} == set(loop.enc.known)


def test_chunked_prompt_continues_as_deltas_with_appended_blocks() -> None:
    loop = Loop(pool_blocks=64, budget=8)
    loop.add("p", 30, SamplingParams(max_tokens=2))  # 4 chunks of 8 tokens, 4 per block
    loop.run()
    deltas = [e for m in loop.messages for e in m.entries if isinstance(e, RunningDelta)]
    assert deltas and all(len(g) == 2 for d in deltas[:3] for g in d.new_attn_block_ids)


def test_preempted_then_recomputed_is_sent_in_full_again() -> None:
    loop = Loop(pool_blocks=24, seqs=4)  # too few blocks for all three to decode to the end
    for rid in ("x", "y", "z"):
        loop.add(rid, 8, SamplingParams(max_tokens=12))
    loop.run()
    assert loop.preempted, "the pool was meant to force a preemption"
    for rid in loop.preempted:
        kinds = _entries(loop, rid)
        assert kinds.count(ScheduledRequest) >= 2  # first time and again after preemption


def test_forked_samples_share_blocks_and_are_rebuilt_exactly() -> None:
    loop = Loop(pool_blocks=64)
    loop.add("n3", 9, SamplingParams(max_tokens=4, n=3, seed=1))
    loop.run()
    assert loop.forked == {"n3.0", "n3.1", "n3.2"}
    first = {}
    for m in loop.messages:
        for e in m.entries:
            if e.request_id in loop.forked and e.request_id not in first:
                first[e.request_id] = e
    assert all(isinstance(e, ScheduledRequest) for e in first.values())
    tables = [e.attn_block_ids[0] for e in first.values() if isinstance(e, ScheduledRequest)]
    assert len({t[0] for t in tables}) == 1  # the full prompt block is shared


def test_prompt_logprob_rows_reach_the_worker() -> None:
    loop = Loop(pool_blocks=64, budget=4)
    loop.add("s", 11, SamplingParams(max_tokens=2, prompt_logprobs=1))
    loop.run()
    entries = [e for m in loop.messages for e in m.entries]
    assert any(isinstance(e, RunningDelta) and e.score_targets for e in entries)
    targets = [t for e in entries for t in e.score_targets]
    assert targets == [3 + (i * 7) % 50 for i in range(1, 11)]  # every prompt token but one


def test_a_step_message_carries_the_transfer_command() -> None:
    cmd = TransferCommand(cancel=("r",))
    msg = StepEncoder().encode(SchedulerOutput(()), cmd)
    assert msg.transfer == cmd and msg.seq == 1


def _two_steps() -> tuple[StepMessage, StepMessage]:
    loop = Loop(pool_blocks=64)
    loop.add("a", 5, SamplingParams(max_tokens=4))
    loop.step()
    loop.step()
    return loop.messages[0], loop.messages[1]


def test_a_lost_step_message_is_detected() -> None:
    _, second = _two_steps()
    with pytest.raises(StepDesyncError, match="lost"):
        StepDecoder().decode(second)


def test_a_delta_for_an_unknown_request_is_an_error() -> None:
    first, second = _two_steps()
    dec = StepDecoder()
    dec.decode(first)
    dec.known.clear()
    with pytest.raises(StepDesyncError, match="unknown"):
        dec.decode(second)


def test_a_delta_that_does_not_continue_the_worker_state_is_an_error() -> None:
    first, second = _two_steps()
    dec = StepDecoder()
    dec.decode(first)
    rid = next(iter(dec.known))
    dec.known[rid] = replace(dec.known[rid], num_computed=dec.known[rid].num_computed + 1)
    with pytest.raises(StepDesyncError, match="tokens computed"):
        dec.decode(second)
    assert isinstance(second.entries[0], RunningDelta)


def test_a_block_table_mismatch_is_an_error() -> None:
    first, second = _two_steps()
    dec = StepDecoder()
    dec.decode(first)
    rid = next(iter(dec.known))
    old = dec.known[rid]
    dec.known[rid] = replace(old, attn_block_ids=(old.attn_block_ids[0] + (99,),
                                                  old.attn_block_ids[1]))
    with pytest.raises(StepDesyncError, match="block tables"):
        dec.decode(second)


def test_one_request_id_twice_in_a_step_is_refused() -> None:
    loop = Loop(pool_blocks=64)
    loop.add("a", 5, SamplingParams(max_tokens=4))
    out = loop.sched.schedule()
    with pytest.raises(ValueError, match="twice"):
        StepEncoder().encode(replace(out, scheduled=out.scheduled * 2))


def test_forked_samples_under_penalties_carry_their_context_once() -> None:
    loop = Loop(pool_blocks=64)
    loop.add("pen", 6, SamplingParams(max_tokens=3, n=2, seed=2, presence_penalty=0.5))
    loop.run()
    ctx = [e for m in loop.messages for e in m.entries if e.context_token_ids is not None]
    assert {e.request_id for e in ctx} == {"pen.0", "pen.1"}
    assert all(isinstance(e, ScheduledRequest) for e in ctx)


def test_a_delta_carries_this_step_only_fields() -> None:
    params = SamplingParams(max_tokens=4)
    s1 = ScheduledRequest("r", (1, 2, 3, 4, 5), 0, ((0, 1), (2, 3)), (4,), True, params, 0)
    s2 = replace(s1, token_ids=(9,), num_computed=5, attn_block_ids=((0, 1, 5), (2, 3, 6)),
                 output_index=1, context_token_ids=(1, 2, 3, 4, 5), score_targets=(7,))
    enc, dec = StepEncoder(), StepDecoder()
    dec.decode(enc.encode(SchedulerOutput((s1,))))
    msg = enc.encode(SchedulerOutput((s2,), copies=((1, 8),)))
    (delta,) = msg.entries
    assert isinstance(delta, RunningDelta) and delta.new_attn_block_ids == ((5,), (6,))
    assert dec.decode(msg) == SchedulerOutput((s2,), copies=((1, 8),))
    s3 = replace(s2, token_ids=(10,), num_computed=6, params=SamplingParams(max_tokens=5))
    (full,) = enc.encode(SchedulerOutput((s3,))).entries
    assert full == s3  # other parameters: sent in full


def test_every_scheduled_request_field_is_either_sent_per_step_or_kept() -> None:
    from dataclasses import fields

    from hybridpd.engine.step_messages import KEPT_FIELDS, PER_STEP_FIELDS

    names = {f.name for f in fields(ScheduledRequest)}
    assert names == PER_STEP_FIELDS | KEPT_FIELDS and not PER_STEP_FIELDS & KEPT_FIELDS
