"""From engine outputs to text deltas: detokenization, stop strings, errors.

Owns the per-request pipeline shared by streaming and non-streaming responses: engine outputs
-> incremental text -> stop-string matching (a fired stop string aborts the engine request and
ends with "stop") -> `Delta`s. Knows nothing of HTTP or of OpenAI response shapes.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from hybridpd.detokenizer import IncrementalDetokenizer, StopStringMatcher
from hybridpd.engine.protocol import GenerateOutput, GenerateRequest, TokenLogprob
from hybridpd.request import FinishReason
from hybridpd.server.engine_client import EngineClient


class GenerationError(Exception):
    """The engine failed the request; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.message, self.status = message, status


@dataclass(frozen=True)
class Delta:
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...]
    finish_reason: str | None  # set on the last delta only
    num_prompt_tokens: int
    kv_transfer_params: dict[str, Any] | None = None
    transfer_stats: dict[str, Any] | None = None
    at: float = 0.0  # time.monotonic() when the engine output arrived


async def text_deltas(
    client: EngineClient, req: GenerateRequest, tokenizer: Any
) -> AsyncIterator[Delta]:
    """Deltas of one request; raises GenerationError on an engine error output."""
    detok = _detokenizer(tokenizer, req)
    hands_off = bool((req.kv_transfer or {}).get("do_remote_decode"))
    matcher = StopStringMatcher(req.params.stop) if req.params.stop else None
    async with contextlib.aclosing(client.generate(req)) as outputs:
        async for out in outputs:
            if out.error is not None:
                raise GenerationError(out.error, out.error_code)
            text = detok.push(list(out.new_token_ids))
            if out.finished and not (hands_off and out.kv_transfer_params is not None):
                text += detok.flush()  # (a prefill instance handing off leaves it to D)
            stopped = False
            if matcher is not None:
                text, stopped = matcher.push(text)
                if out.finished and not stopped:
                    text += matcher.flush()
            yield _delta(out, req, text, stopped)
            if stopped:
                return  # leaving `outputs` early aborts the engine request


def _detokenizer(tokenizer: Any, req: GenerateRequest) -> IncrementalDetokenizer:
    """On a decode instance, P's first token is context: its text (or the incomplete UTF-8
    sequence it starts) was the prefill leg's to emit, so D's text continues from it."""
    detok = IncrementalDetokenizer(tokenizer, list(req.prompt_token_ids))
    kv = req.kv_transfer or {}
    first = kv.get("first_token") if kv.get("do_remote_prefill") else None
    if isinstance(first, int) and not isinstance(first, bool):
        detok.push([first])  # already emitted by P (or still pending there): drop the text
    return detok


def _delta(out: GenerateOutput, req: GenerateRequest, text: str, stopped: bool) -> Delta:
    if stopped:
        reason: str | None = FinishReason.STOP.value
    elif out.finished:
        reason = (out.finish_reason or FinishReason.STOP).value
    else:
        reason = None
    return Delta(
        text=text,
        token_ids=tuple(out.new_token_ids),
        logprobs=tuple(out.new_logprobs or ()),
        finish_reason=reason,
        num_prompt_tokens=out.num_prompt_tokens or len(req.prompt_token_ids),
        kv_transfer_params=out.kv_transfer_params if out.finished else None,
        transfer_stats=out.transfer_stats,
        at=time.monotonic(),
    )
