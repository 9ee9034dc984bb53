"""Per-request token history on the device, for the sampler's penalties and bad words.

Owns, for every running request whose sampling needs its past tokens
(`SamplingParams.needs_history`: presence / frequency / repetition penalties, bad words of more
than one token), one row of two (slots, V) tensors: how often each token occurs in the request's
output, and whether it occurs in its prompt; plus, on the host, the last few output tokens that
multi-token bad words are matched against. Kept incrementally from the tokens each step feeds
the model (one batched scatter per step, never rebuilt from the request's lists), so it is
exact at every sampling step: the token sampled last step is fed, hence counted, this step.
A chunk that starts at 0 (a new or recomputing request) resets its row; a decode instance's
first step after its state arrived carries the context it did not compute
(`ScheduledRequest.context_token_ids`). Rows of finished and preempted requests are freed.
Knows nothing of scheduling policy or the model; only rank 0 (the sampling rank) keeps one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from hybridpd.engine.sampler import HistoryRows
from hybridpd.engine.scheduler import ScheduledRequest, SchedulerOutput

_MIN_SLOTS = 8


@dataclass
class _Entry:
    slot: int
    length: int = 0  # tokens counted (prompt + output)
    tail: list[int] = field(default_factory=list)  # last output tokens (bad-word prefixes)
    tail_len: int = 0  # how many output tokens `tail` keeps


class TokenHistory:
    def __init__(self, vocab_size: int, device: torch.device) -> None:
        self.vocab_size = vocab_size
        self.device = device
        self._entries: dict[str, _Entry] = {}
        self._free: list[int] = []
        self._out = torch.zeros((0, vocab_size), dtype=torch.int32, device=device)
        self._seen = torch.zeros((0, vocab_size), dtype=torch.bool, device=device)

    def __len__(self) -> int:
        return len(self._entries)

    def update(self, out: SchedulerOutput) -> None:
        """Drop finished and preempted requests, then count the tokens this step feeds."""
        for rid in (*out.finished, *out.preempted):
            self._drop(rid)
        out_slots: list[int] = []  # (slot, token) pairs of output tokens, then prompt tokens
        out_toks: list[int] = []
        seen_slots: list[int] = []
        seen_toks: list[int] = []
        resets: list[int] = []
        for s in out.scheduled:
            if not s.params.needs_history:
                continue
            entry = self._entry_for(s, resets)
            start, new = s.num_computed, s.token_ids
            if s.context_token_ids is not None:
                start, new = 0, (*s.context_token_ids, *s.token_ids)
            k = min(max(s.num_prompt_tokens - start, 0), len(new))  # new[:k] is prompt
            seen_slots += [entry.slot] * k
            seen_toks += new[:k]
            out_slots += [entry.slot] * (len(new) - k)
            out_toks += new[k:]
            if entry.tail_len and len(new) > k:
                entry.tail = [*entry.tail, *new[k:]][-entry.tail_len:]
            entry.length = start + len(new)
        if resets:
            idx = _index(resets, self.device)
            self._out[idx] = 0
            self._seen[idx] = False
        if out_slots:
            self._out.index_put_(
                (_index(out_slots, self.device), _index(out_toks, self.device)),
                torch.ones((), dtype=torch.int32, device=self.device), accumulate=True)
        if seen_slots:
            self._seen.index_put_(
                (_index(seen_slots, self.device), _index(seen_toks, self.device)),
                torch.ones((), dtype=torch.bool, device=self.device))

    def rows(self, reqs: list[ScheduledRequest]) -> HistoryRows | None:
        """The history of the rows of `reqs` (the sampled batch) that need it, or None."""
        rows = tuple(i for i, s in enumerate(reqs) if s.params.needs_history)
        if not rows:
            return None
        entries = [self._entries[reqs[i].request_id] for i in rows]
        idx = _index([e.slot for e in entries], self.device)
        return HistoryRows(rows, self._out[idx], self._seen[idx],
                           tuple(tuple(e.tail) for e in entries))

    # ---- internals -------------------------------------------------------------------------
    def _entry_for(self, s: ScheduledRequest, resets: list[int]) -> _Entry:
        entry = self._entries.get(s.request_id)
        if s.num_computed == 0 or s.context_token_ids is not None:
            if entry is None:
                entry = self._entries[s.request_id] = _Entry(self._take_slot())
            entry.length = 0
            entry.tail = []
            entry.tail_len = max((len(w) - 1 for w in s.params.bad_words_token_ids), default=0)
            resets.append(entry.slot)
            return entry
        if entry is None or entry.length != s.num_computed:
            have = None if entry is None else entry.length
            raise RuntimeError(
                f"token history of {s.request_id!r} has {have} tokens, the step continues at "
                f"{s.num_computed} without its context (a scheduler bug)")
        return entry

    def _take_slot(self) -> int:
        if not self._free:
            old = self._out.shape[0]
            new = max(_MIN_SLOTS, 2 * old)
            self._out = torch.cat([self._out, self._out.new_zeros((new - old, self.vocab_size))])
            self._seen = torch.cat([self._seen,
                                    self._seen.new_zeros((new - old, self.vocab_size))])
            self._free = list(range(new - 1, old - 1, -1))
        return self._free.pop()

    def _drop(self, request_id: str) -> None:
        entry = self._entries.pop(request_id, None)
        if entry is not None:
            self._free.append(entry.slot)


def _index(vals: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(vals, dtype=torch.int64).to(device, non_blocking=True)
