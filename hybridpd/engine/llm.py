"""Offline Python API: `LLM(model_dir).generate(prompts, SamplingParams(...))`.

Owns driving an in-process `Engine` to completion for a batch of prompts, tokenization,
detokenization and stop strings. Knows nothing of HTTP or P/D.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from hybridpd.engine.args import EngineArgs
from hybridpd.engine.core import Engine
from hybridpd.engine.fork_groups import sample_id
from hybridpd.engine.protocol import GenerateRequest, TokenLogprob
from hybridpd.request import FinishReason, SamplingParams


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


class _TextState:
    """Incremental text + stop-string matching for one request."""

    def __init__(self, tokenizer: Any, prompt_ids: list[int], stops: tuple[str, ...]) -> None:
        from hybridpd.detokenizer import IncrementalDetokenizer, StopStringMatcher

        self.detok = IncrementalDetokenizer(tokenizer, prompt_ids)
        self.matcher = StopStringMatcher(stops) if stops else None

    def push(self, ids: list[int]) -> tuple[str, bool]:
        delta = self.detok.push(ids)
        if self.matcher is None:
            return delta, False
        return self.matcher.push(delta)

    def flush(self) -> str:
        return self.matcher.flush() if self.matcher is not None else ""


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
    ) -> list[CompletionOutput]:
        """One output per prompt, in order; with `params.n` > 1, n outputs per prompt
        (prompt-major, `index` = the choice), the prompt prefilled once and its state forked."""
        params = params or SamplingParams()
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        outs: dict[tuple[str, int], CompletionOutput] = {}
        texts: dict[tuple[str, int], _TextState] = {}
        for prompt in prompts:
            ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
            rid = f"llm-{next(self._ids)}"
            self.engine.add_request(GenerateRequest(rid, tuple(ids), params))
            for i in range(params.n):
                lps: list[TokenLogprob] | None = [] if params.logprobs is not None else None
                outs[rid, i] = CompletionOutput(rid, ids, logprobs=lps, index=i)
                texts[rid, i] = _TextState(self.tokenizer, ids, params.stop)
        pending = set(outs)
        while pending:
            for o in self.engine.step():
                key = (o.request_id, o.index)
                if o.error:
                    raise RuntimeError(o.error)
                if key in pending:
                    self._absorb(o, outs[key], texts[key], pending)
                if o.finished:  # the request's last output: every choice ended
                    pending -= {k for k in pending if k[0] == o.request_id}
        return list(outs.values())

    def _absorb(self, o: Any, out: CompletionOutput, text: _TextState, pending: set) -> None:
        key = (o.request_id, o.index)
        out.token_ids.extend(o.new_token_ids)
        if out.logprobs is not None and o.new_logprobs:
            out.logprobs.extend(o.new_logprobs)
        if o.prompt_logprobs is not None:
            out.prompt_logprobs = list(o.prompt_logprobs)
        delta, stopped = text.push(list(o.new_token_ids))
        out.text += delta
        if stopped:  # with n > 1 this stops that choice only
            n = self.engine.forks.get(o.request_id)
            self.engine.abort_request(sample_id(o.request_id, o.index) if n else o.request_id)
            out.finish_reason = FinishReason.STOP.value
            pending.discard(key)
        elif o.choice_finished:
            out.text += text.flush()
            out.finish_reason = o.finish_reason.value if o.finish_reason else None
            pending.discard(key)

    def close(self) -> None:
        self.engine.shutdown()


def greedy(max_tokens: int, **kw: Any) -> SamplingParams:
    return replace(SamplingParams(max_tokens=max_tokens, temperature=0.0), **kw)
