"""The sampler's token history: counts kept incrementally from the fed tokens equal the
request's own prompt and output, across chunks, a decode instance's first step (context sent),
preemption and finish."""

from __future__ import annotations

import pytest
import torch

from hybridpd.engine.scheduler import ScheduledRequest, SchedulerOutput
from hybridpd.engine.token_history import TokenHistory
from hybridpd.request import SamplingParams

V = 20
PEN = SamplingParams(frequency_penalty=1.0, bad_words_token_ids=((3, 4, 5),))


def _chunk(rid: str, tokens: list[int], start: int, n_prompt: int,
           params: SamplingParams = PEN, context: tuple[int, ...] | None = None,
           n_out: int = 0) -> ScheduledRequest:
    return ScheduledRequest(rid, tuple(tokens), start, ((),), (0,), True, params, n_out,
                            num_prompt_tokens=n_prompt, context_token_ids=context)


def _bincount(ids: list[int]) -> list[int]:
    return torch.bincount(torch.tensor(ids, dtype=torch.int64), minlength=V).tolist()


def test_chunks_and_decodes_count_prompt_and_output_apart(device) -> None:
    h = TokenHistory(V, device)
    prompt = [1, 2, 2, 3, 7]
    h.update(SchedulerOutput((_chunk("a", prompt[:3], 0, 5),)))
    h.update(SchedulerOutput((_chunk("a", prompt[3:], 3, 5),)))
    outputs = [3, 4, 3, 4]
    for i, t in enumerate(outputs):  # each sampled token is fed by the next step
        h.update(SchedulerOutput((_chunk("a", [t], 5 + i, 5, n_out=i + 1),)))
    rows = h.rows([_chunk("a", [4], 8, 5)])
    assert rows is not None and rows.rows == (0,)
    assert rows.output_counts[0].cpu().tolist() == _bincount(outputs)
    assert rows.prompt_seen[0].nonzero().flatten().cpu().tolist() == sorted(set(prompt))
    assert rows.tails == ((3, 4),)  # the longest bad word's prefix length


def test_a_decode_instances_first_step_takes_its_context(device) -> None:
    h = TokenHistory(V, device)
    prompt = [5, 6, 6]
    first = 9  # P's first token: in D's sequence, counted as output
    h.update(SchedulerOutput((_chunk("d", [first], 3, 3, context=tuple(prompt), n_out=1),)))
    rows = h.rows([_chunk("d", [first], 3, 3)])
    assert rows is not None
    assert rows.output_counts[0].cpu().tolist() == _bincount([first])
    assert rows.prompt_seen[0].nonzero().flatten().cpu().tolist() == [5, 6]
    with pytest.raises(RuntimeError, match="without its context"):
        h.update(SchedulerOutput((_chunk("e", [1], 4, 3),)))  # unknown request mid-sequence


def test_preempted_and_finished_rows_are_freed_and_reset(device) -> None:
    h = TokenHistory(V, device)
    h.update(SchedulerOutput((_chunk("a", [1, 2], 0, 1), _chunk("b", [3, 3], 0, 1))))
    assert len(h) == 2
    h.update(SchedulerOutput((), preempted=("a",), finished=("b",)))
    assert len(h) == 0
    h.update(SchedulerOutput((_chunk("c", [4, 4], 0, 1),)))  # reuses a freed row
    rows = h.rows([_chunk("c", [4], 2, 1)])
    assert rows is not None and rows.output_counts[0].cpu().tolist() == _bincount([4])
    plain = _chunk("p", [1], 0, 1, params=SamplingParams())
    h.update(SchedulerOutput((plain,)))
    assert len(h) == 1 and h.rows([plain]) is None  # a request without penalties: no row
