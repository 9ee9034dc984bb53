"""Offline Python API: `LLM(model_dir).generate(prompts, SamplingParams(...))`.

Owns driving an in-process `Engine` to completion for a batch of prompts, tokenization, and
carrying out the text pipeline's stop decisions on the engine. Text (incremental detokenizer,
stop strings, skip_special_tokens, include_stop_str_in_output, one pipeline per choice) comes
from `hybridpd.text_pipeline`, the same pipeline the API server uses, so both give the same text
for the same request. Knows nothing of HTTP or P/D.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from hybridpd.engine.args import EngineArgs
from hybridpd.engine.core import Engine
from hybridpd.engine.driving import step_when_due
from hybridpd.engine.fork_groups import sample_id
from hybridpd.engine.protocol import GenerateRequest, TokenLogprob
from hybridpd.request import FinishReason, SamplingParams
from hybridpd.text_pipeline import DEFAULT_TEXT, RequestText, StopAction, TextOptions


@dataclass
class CompletionOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None
    index: int = 0  # the choice of its prompt (n > 1)
    # with SamplingParams.prompt_logprobs: per prompt token, the first None
    prompt_logprobs: list[TokenLogprob | None] | None = None


class LLM:
    def __init__(self, model: str | Path | None = None, **engine_kwargs: Any) -> None:
        if model is None:
            from hybridpd.demo.embedded import embedded_model_dir

            model = embedded_model_dir()
        from hybridpd.tokenizer import Tokenizer

        self.model_dir = str(model)
        self.engine = Engine(EngineArgs(model_dir=self.model_dir, **engine_kwargs))
        self.tokenizer = Tokenizer.from_dir(self.model_dir)
        self._ids = itertools.count()

    def generate(
        self,
        prompts: str | list[str] | list[list[int]],
        params: SamplingParams | None = None,
        text: TextOptions = DEFAULT_TEXT,
    ) -> list[CompletionOutput]:
        """One output per prompt, in order; with `params.n` > 1, n outputs per prompt
        (prompt-major, `index` = the choice), the prompt prefilled once and its state forked.
        `text` says how ids become text (skip_special_tokens, include_stop_str_in_output)."""
        params = params or SamplingParams()
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        outs: dict[tuple[str, int], CompletionOutput] = {}
        texts: dict[str, RequestText] = {}
        for prompt in prompts:
            ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
            rid = f"llm-{next(self._ids)}"
            self.engine.add_request(GenerateRequest(rid, tuple(ids), params))
            texts[rid] = RequestText(self.tokenizer, ids, params.stop, params.n, text)
            for i in range(params.n):
                lps: list[TokenLogprob] | None = [] if params.logprobs is not None else None
                outs[rid, i] = CompletionOutput(rid, ids, logprobs=lps, index=i)
        pending = set(outs)
        while pending:
            for o in step_when_due(self.engine):
                key = (o.request_id, o.index)
                if o.error:
                    raise RuntimeError(o.error)
                if key in pending:
                    self._absorb(o, outs[key], texts[o.request_id], pending)
                if o.finished:  # the request's last output: every choice ended
                    pending -= {k for k in pending if k[0] == o.request_id}
        return list(outs.values())

    def _absorb(self, o: Any, out: CompletionOutput, texts: RequestText, pending: set) -> None:
        key = (o.request_id, o.index)
        out.token_ids.extend(o.new_token_ids)
        if out.logprobs is not None and o.new_logprobs:
            out.logprobs.extend(o.new_logprobs)
        if o.prompt_logprobs is not None:
            out.prompt_logprobs = list(o.prompt_logprobs)
        step = texts.feed(o.index, o.new_token_ids, o.choice_finished)
        if step is None:  # pending holds only choices no stop string ended
            return
        out.text += step.text
        if step.action is StopAction.ABORT_REQUEST:
            self.engine.abort_request(o.request_id)
        elif step.action is StopAction.ABORT_CHOICE:  # that choice only; the others go on
            self.engine.abort_request(sample_id(o.request_id, o.index))
        if step.stopped:
            out.finish_reason = FinishReason.STOP.value
            pending.discard(key)
        elif o.choice_finished:
            out.finish_reason = o.finish_reason.value if o.finish_reason else None
            pending.discard(key)

    def close(self) -> None:
        self.engine.shutdown()


def greedy(max_tokens: int, **kw: Any) -> SamplingParams:
    return replace(SamplingParams(max_tokens=max_tokens, temperature=0.0), **kw)
