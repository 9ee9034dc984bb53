"""From engine outputs to text deltas: detokenization, stop strings, errors.

Owns the per-request pipeline shared by streaming and non-streaming responses: engine outputs
-> incremental text -> stop-string matching (a fired stop string aborts the engine request and
ends with "stop"; `include_stop_str_in_output` keeps the stop string) -> `Delta`s; special
tokens are dropped from the text unless `skip_special_tokens` is off. With n > 1 each choice
(`GenerateOutput.index`) has its own pipeline, and a stop string ends that choice only. Knows
nothing of HTTP or of OpenAI response shapes.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

from hybridpd.detokenizer import IncrementalDetokenizer, StopStringMatcher
from hybridpd.disagg.params import TransferParams
from hybridpd.engine.fork_groups import sample_id
from hybridpd.engine.protocol import ErrorKind, GenerateOutput, GenerateRequest, TokenLogprob
from hybridpd.request import FinishReason
from hybridpd.server import handoff_edge
from hybridpd.server.engine_client import EngineClient
from hybridpd.server.error_status import http_status


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


@dataclass(frozen=True)
class TextOptions:
    """How token ids become text (vLLM's request fields of the same names)."""

    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False


class TextTracker:
    """Incremental text of one request: detokenizer, then the stop-string matcher.

    P/D continuity: a prefill instance that hands off does not flush either stage (a split
    UTF-8 character, or text that may begin a stop string, is left pending); the decode
    instance replays P's first token through both stages, dropping what P already emitted, so
    the pending part comes out of D exactly once.
    """

    def __init__(self, tokenizer: Any, req: GenerateRequest,
                 options: TextOptions = TextOptions()) -> None:
        self.options = options
        self._stop_shown = False
        self.detok = IncrementalDetokenizer(tokenizer, list(req.prompt_token_ids),
                                            skip_special_tokens=options.skip_special_tokens)
        self.matcher = StopStringMatcher(req.params.stop) if req.params.stop else None
        first = handoff_edge.first_token(req.handoff)
        if first is not None:
            self.feed((first,), finished=False, hands_off=False)  # P's text: dropped

    def feed(
        self, token_ids: tuple[int, ...], finished: bool, hands_off: bool
    ) -> tuple[str, bool]:
        """(text to emit, whether a stop string fired)."""
        flush = finished and not hands_off
        text = self.detok.push(list(token_ids))
        if flush:
            text += self.detok.flush()
        if self.matcher is None:
            return text, False
        text, stopped = self.matcher.push(text)
        if stopped and self.options.include_stop_str_in_output and not self._stop_shown:
            text += self.matcher.matched or ""
            self._stop_shown = True  # once: later pushes say ("", True)
        if flush and not stopped:
            text += self.matcher.flush()
        return text, stopped


async def text_deltas(
    client: EngineClient, req: GenerateRequest, tokenizer: Any,
    options: TextOptions = TextOptions(),
) -> AsyncGenerator[Delta, None]:
    """Deltas of one request (of each of its choices); raises GenerationError on an engine
    error output."""
    trackers: dict[int, TextTracker] = {}
    ended: set[int] = set()  # choices a stop string ended here (the engine may still send)
    many = req.params.n > 1
    async with contextlib.aclosing(client.generate(req)) as outputs:
        async for out in outputs:
            if out.error is not None:
                raise GenerationError(out.error, http_status(out.error_kind), out.error_kind)
            if out.index not in ended:
                if out.index not in trackers:
                    trackers[out.index] = TextTracker(tokenizer, req, options)
                hands_off = handoff_edge.hands_off(out.kv_transfer_params)
                text, stopped = trackers[out.index].feed(
                    tuple(out.new_token_ids), out.choice_finished, hands_off)
                yield _delta(out, req, text, stopped)
                if stopped and not many:
                    if hands_off:  # finished in the engine, but P still holds the state for D
                        await client.abort(req.request_id)
                    return  # leaving `outputs` early aborts an unfinished engine request
                if stopped and not out.choice_finished:  # this choice only; the others go on
                    ended.add(out.index)
                    await client.abort(sample_id(req.request_id, out.index))
            if out.finished:
                return


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
