"""n / best_of requests: one client request, several sampled sequences forked from one prompt.

Owns the bookkeeping between a client request id and its samples: the internal ids of the
forked sequences, which of them are done, the translation of their outputs into the client
request's outputs (each carrying its choice `index`; `finished` only on the request's very last
output), and best_of's ranking (samples buffered, the n of highest cumulative logprob returned,
best first). Knows nothing of blocks, tensors or scheduling; the engine core forks the state.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from hybridpd.engine.protocol import GenerateOutput, TokenLogprob
from hybridpd.request import FinishReason, SamplingParams

SAMPLE_SEPARATOR = "#"


def sample_id(request_id: str, index: int) -> str:
    """Internal request id of sample `index` of `request_id`."""
    return f"{request_id}{SAMPLE_SEPARATOR}{index}"


@dataclass
class _Sample:
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    finish_reason: FinishReason | None = None
    done: bool = False


@dataclass
class ForkGroup:
    request_id: str
    params: SamplingParams
    num_prompt_tokens: int
    samples: list[_Sample]
    forked: bool = False  # the prompt was computed and the samples exist

    @property
    def ranks(self) -> bool:
        """best_of > n: the samples are buffered and ranked, not streamed."""
        return self.params.num_samples > self.params.n

    @property
    def sample_ids(self) -> list[str]:
        return [sample_id(self.request_id, i) for i in range(len(self.samples))]

    @property
    def all_done(self) -> bool:
        return all(s.done for s in self.samples)


class ForkGroups:
    """The live n / best_of requests of one engine."""

    def __init__(self) -> None:
        self._groups: dict[str, ForkGroup] = {}
        self._member: dict[str, tuple[str, int]] = {}  # sample id -> (request id, index)

    def add(self, request_id: str, params: SamplingParams, num_prompt_tokens: int) -> None:
        self._groups[request_id] = ForkGroup(
            request_id, params, num_prompt_tokens, [_Sample() for _ in range(params.num_samples)])

    def get(self, request_id: str) -> ForkGroup | None:
        return self._groups.get(request_id)

    def knows(self, request_id: str) -> bool:
        return request_id in self._groups or request_id in self._member

    def owner(self, sample: str) -> tuple[ForkGroup, int] | None:
        """The group and index of a sample id (None for other ids)."""
        m = self._member.get(sample)
        return None if m is None else (self._groups[m[0]], m[1])

    def forked(self, group: ForkGroup) -> list[str]:
        group.forked = True
        for i, sid in enumerate(group.sample_ids):
            self._member[sid] = (group.request_id, i)
        return group.sample_ids

    def drop(self, group: ForkGroup) -> None:
        self._groups.pop(group.request_id, None)
        for sid in group.sample_ids:
            self._member.pop(sid, None)

    def live_ids(self, group: ForkGroup) -> list[str]:
        """Engine request ids of the group still running: the samples, or the prompt."""
        if not group.forked:
            return [group.request_id]
        return [sid for sid, s in zip(group.sample_ids, group.samples) if not s.done]

    def __len__(self) -> int:
        return len(self._groups)

    # ---- outputs ---------------------------------------------------------------------------
    def mark_aborted(self, group: ForkGroup, index: int) -> list[GenerateOutput]:
        """Sample `index` was stopped by the caller (e.g. its stop string matched)."""
        s = group.samples[index]
        if s.done:
            return []
        s.done, s.finish_reason = True, FinishReason.STOP
        return self._closing(group, [])

    def translate(self, outs: list[GenerateOutput]) -> list[GenerateOutput]:
        """Engine outputs -> client outputs. Samples' outputs get their group's id and index;
        a group's error ends the whole request; other outputs pass through unchanged."""
        result: list[GenerateOutput] = []
        for o in outs:
            m = self._member.get(o.request_id)
            group = self._groups[m[0]] if m else self._groups.get(o.request_id)
            if group is None:
                result.append(o)
                continue
            index = m[1] if m else 0
            if o.error is not None or (o.finished and not m):  # the prompt itself failed
                self.drop(group)
                result.append(replace(o, request_id=group.request_id, index=0,
                                      choice_finished=True))
                continue
            result.extend(self._sample_output(group, index, o))
        return result

    def _sample_output(self, group: ForkGroup, index: int,
                       o: GenerateOutput) -> list[GenerateOutput]:
        s = group.samples[index]
        if s.done:
            return []
        s.tokens.extend(o.new_token_ids)
        for lp in o.new_logprobs or ():
            s.logprobs.append(lp)
            s.cumulative_logprob += lp.logprob
        if o.finished:
            s.done, s.finish_reason = True, o.finish_reason
        if group.ranks:
            return self._closing(group, [])
        wants_lp = group.params.logprobs is not None
        out = replace(o, request_id=group.request_id, index=index, finished=False,
                      choice_finished=o.finished,
                      new_logprobs=o.new_logprobs if wants_lp else None)
        return self._closing(group, [out])

    def _closing(self, group: ForkGroup, outs: list[GenerateOutput]) -> list[GenerateOutput]:
        """Append the request's last output(s) once every sample is done."""
        if not group.all_done:
            return outs
        self.drop(group)
        if group.ranks:
            outs = self._ranked(group)
        if outs:
            outs[-1] = replace(outs[-1], finished=True)
        else:  # the last sample ended without an output of its own (it was stopped)
            last = max(i for i, s in enumerate(group.samples) if s.done)
            outs = [GenerateOutput(group.request_id, (), finished=True, choice_finished=True,
                                   finish_reason=group.samples[last].finish_reason,
                                   num_prompt_tokens=group.num_prompt_tokens, index=last)]
        if outs[-1].finish_reason is None:
            outs[-1] = replace(outs[-1], finish_reason=FinishReason.STOP)
        return outs

    def _ranked(self, group: ForkGroup) -> list[GenerateOutput]:
        """best_of: the n samples of highest cumulative logprob, best first, as choices
        0..n-1, each in one output."""
        order = sorted(range(len(group.samples)),
                       key=lambda i: (-group.samples[i].cumulative_logprob, i))
        wants_lp = group.params.logprobs is not None
        outs = []
        for j, i in enumerate(order[: group.params.n]):
            s = group.samples[i]
            outs.append(GenerateOutput(
                group.request_id, tuple(s.tokens), finished=False, choice_finished=True,
                finish_reason=s.finish_reason,
                new_logprobs=tuple(s.logprobs) if wants_lp else None,
                num_prompt_tokens=group.num_prompt_tokens, index=j))
        return outs
