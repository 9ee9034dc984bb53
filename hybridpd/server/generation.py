"""From engine outputs to text deltas: the engine client, the text pipeline, errors.

Owns driving one request through the `EngineClient` for streaming and non-streaming responses:
engine outputs -> `hybridpd.text_pipeline.RequestText` (incremental detokenizer, stop strings,
skip_special_tokens, include_stop_str_in_output, one pipeline per choice; the same pipeline
`LLM` uses) -> `Delta`s, and carrying out the pipeline's `StopAction` (a fired stop string
aborts the engine request, or with n > 1 that choice's sample, and ends with "stop"). On a
decode instance P's first token is replayed through the pipeline. Knows nothing of HTTP or of
OpenAI response shapes.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

from hybridpd.disagg.params import TransferParams
from hybridpd.engine.fork_groups import sample_id
from hybridpd.engine.protocol import ErrorKind, GenerateOutput, GenerateRequest, TokenLogprob
from hybridpd.request import FinishReason
from hybridpd.server import handoff_edge
from hybridpd.server.engine_client import EngineClient
from hybridpd.server.error_status import http_status
from hybridpd.text_pipeline import DEFAULT_TEXT, RequestText, StopAction, TextOptions

__all__ = ["Delta", "GenerationError", "TextOptions", "text_deltas"]


class GenerationError(Exception):
    """The engine failed the request; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int,
                 kind: ErrorKind = ErrorKind.INTERNAL) -> None:
        super().__init__(message)
        self.message, self.status, self.kind = message, status, kind


@dataclass(frozen=True)
class Delta:
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...]
    finish_reason: str | None  # set on the choice's last delta only
    num_prompt_tokens: int
    kv_transfer_params: TransferParams | None = None  # P's hand-off (the edge serialises it)
    transfer_stats: dict[str, Any] | None = None
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None  # on the first delta
    at: float = 0.0  # time.monotonic() when the engine output arrived
    queued_s: float | None = None  # on the first: the engine's arrival -> first scheduled
    index: int = 0  # the choice (n > 1)


async def text_deltas(
    client: EngineClient, req: GenerateRequest, tokenizer: Any,
    options: TextOptions = DEFAULT_TEXT,
) -> AsyncGenerator[Delta, None]:
    """Deltas of one request (of each of its choices); raises GenerationError on an engine
    error output."""
    texts = RequestText(tokenizer, req.prompt_token_ids, req.params.stop, req.params.n,
                        options, replay=_replay(req))
    async with contextlib.aclosing(client.generate(req)) as outputs:
        async for out in outputs:
            if out.error is not None:
                raise GenerationError(out.error, http_status(out.error_kind), out.error_kind)
            hands_off = handoff_edge.hands_off(out.kv_transfer_params)
            step = texts.feed(out.index, out.new_token_ids, out.choice_finished, hands_off)
            if step is not None:
                yield _delta(out, req, step.text, step.stopped)
                if step.action is StopAction.ABORT_REQUEST:
                    if hands_off:  # finished in the engine, but P still holds the state for D
                        await client.abort(req.request_id)
                    return  # leaving `outputs` early aborts an unfinished engine request
                if step.action is StopAction.ABORT_CHOICE:  # this choice only; the others go on
                    await client.abort(sample_id(req.request_id, out.index))
            if out.finished:
                return


def _replay(req: GenerateRequest) -> tuple[int, ...]:
    """On a decode instance: P's first token, whose text P already emitted."""
    first = handoff_edge.first_token(req.handoff)
    return () if first is None else (first,)


def _delta(out: GenerateOutput, req: GenerateRequest, text: str, stopped: bool) -> Delta:
    if stopped:
        reason: str | None = FinishReason.STOP.value
    elif out.choice_finished:
        reason = (out.finish_reason or FinishReason.STOP).value
    else:
        reason = None
    return Delta(
        text=text,
        token_ids=tuple(out.new_token_ids),
        logprobs=tuple(out.new_logprobs or ()),
        finish_reason=reason,
        num_prompt_tokens=out.num_prompt_tokens or len(req.prompt_token_ids),
        # a stop string on P ends the request there: nothing for D to pull
        kv_transfer_params=out.kv_transfer_params if out.finished and not stopped else None,
        transfer_stats=out.transfer_stats,
        prompt_logprobs=out.prompt_logprobs,
        at=time.monotonic(),
        queued_s=out.queued_s,
        index=out.index,
    )
