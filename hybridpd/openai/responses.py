"""Response models of both endpoints (whole bodies and SSE chunks), and their builders.

Owns the JSON layout: ids, objects, choices, usage, logprobs, errors, and the extensions
`token_ids` / `prompt_token_ids` / `kv_transfer_params` / `kv_transfer_stats` / `pd_timing`
(models are open to extra fields, so an extension never breaks validation). The builders
return plain dicts of exactly these shapes, for the instances and the P/D proxy alike; they do
not validate (a chunk per token: 1 µs of dict building rather than ~15 µs through pydantic);
tests validate their output, the instances' and the proxy's answers against the models.
Knows nothing of engines, HTTP or validation; token strings come from a `token_text`
callable supplied by the caller.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict


class LogprobLike(Protocol):
    """One token's logprob and its top alternatives (the engine's `TokenLogprob`)."""

    @property
    def token_id(self) -> int: ...
    @property
    def logprob(self) -> float: ...
    @property
    def top(self) -> Sequence[tuple[int, float]]: ...


class ScoredLike(LogprobLike, Protocol):
    @property
    def rank(self) -> int | None:
        """Prompt logprobs: 1 + how many tokens were more likely."""


TokenText = Callable[[int], str]
COMPLETION_OBJECT = "text_completion"
CHAT_OBJECT = "chat.completion"
CHAT_CHUNK_OBJECT = "chat.completion.chunk"


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class Usage(_Open):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(_Open):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(_Open):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: str | None


class CompletionResponse(_Open):
    """A completions body; also each of its stream chunks (same object, `usage` optional)."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(_Open):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(_Open):
    content: list[ChatTokenLogprob] | None


class ChatMessageOut(_Open):
    role: Literal["assistant"]
    content: str | None


class ChatChoice(_Open):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None
    finish_reason: str | None


class ChatCompletionResponse(_Open):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(_Open):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(_Open):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None
    finish_reason: str | None


class ChatCompletionChunk(_Open):
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ErrorInfo(_Open):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(_Open):
    error: ErrorInfo


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(payload: dict[str, Any] | str) -> bytes:
    """One server-sent event: `data: <json>\\n\\n` (or a literal like [DONE])."""
    data = payload if isinstance(payload, str) else json.dumps(payload)
    return f"data: {data}\n\n".encode()


# ---- completions -----------------------------------------------------------------------------
def completion_logprobs(
    lps: Sequence[LogprobLike], token_text: TokenText, offset: int = 0
) -> dict[str, Any]:
    tokens = [token_text(lp.token_id) for lp in lps]
    offsets, pos = [], offset
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    return {
        "tokens": tokens,
        "token_logprobs": [lp.logprob for lp in lps],
        "top_logprobs": [{token_text(t): v for t, v in lp.top} for lp in lps],
        "text_offset": offsets,
    }


def echo_logprobs(
    prompt_ids: Sequence[int], prompt_lps: Sequence[LogprobLike | None] | None,
    token_text: TokenText, added_bos: bool = False,
) -> dict[str, Any]:
    """The echoed prompt's part of a completions `logprobs` (text offsets from 0): one entry
    per prompt token, the first one's logprob and top logprobs null (nothing predicts it).
    `added_bos`: the first token was added by the tokenizer and is not in the echoed text
    (its offset length is 0)."""
    lps = list(prompt_lps) if prompt_lps is not None else [None] * len(prompt_ids)
    tokens = [token_text(t) for t in prompt_ids]
    offsets, pos = [], 0
    for i, t in enumerate(tokens):
        offsets.append(pos)
        pos += 0 if (i == 0 and added_bos) else len(t)
    return {
        "tokens": tokens,
        "token_logprobs": [None if lp is None else lp.logprob for lp in lps],
        "top_logprobs": [None if lp is None else _best_by_text(lp.top, token_text)
                         for lp in lps],
        "text_offset": offsets,
    }


def _best_by_text(top: Sequence[tuple[int, float]], token_text: TokenText) -> dict[str, float]:
    """Top logprobs keyed by token text; tokens sharing a text (partial UTF-8) keep the best."""
    out: dict[str, float] = {}
    for t, v in top:  # best first
        out.setdefault(token_text(t), v)
    return out


def join_completion_logprobs(first: dict[str, Any], rest: dict[str, Any]) -> dict[str, Any]:
    """Two completions `logprobs` one after the other (`rest`'s offsets already shifted)."""
    return {k: list(first[k]) + list(rest[k]) for k in
            ("tokens", "token_logprobs", "top_logprobs", "text_offset")}


def prompt_logprobs_json(
    prompt_lps: Sequence[ScoredLike | None], token_text: TokenText,
) -> list[dict[str, Any] | None]:
    """vLLM's `prompt_logprobs`: per prompt token null (the first) or {token id: {logprob,
    rank, decoded_token}} for the prompt's token and the top-k."""
    out: list[dict[str, Any] | None] = []
    for lp in prompt_lps:
        if lp is None:
            out.append(None)
            continue
        entry = {str(lp.token_id): {"logprob": lp.logprob, "rank": lp.rank,
                                    "decoded_token": token_text(lp.token_id)}}
        for rank, (t, v) in enumerate(lp.top, start=1):
            entry.setdefault(str(t), {"logprob": v, "rank": rank,
                                      "decoded_token": token_text(t)})
        out.append(entry)
    return out


def completion_body(
    rid: str, model: str, text: str, finish_reason: str | None,
    logprobs: dict[str, Any] | None, use: dict[str, int] | None, created: int | None = None,
) -> dict[str, Any]:
    """A completions body, or (without `use`) one of its stream chunks."""
    fields: dict[str, Any] = {
        "id": rid, "object": COMPLETION_OBJECT,
        "created": created if created is not None else int(time.time()), "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": logprobs,
                     "finish_reason": finish_reason}],
    }
    if use is not None:
        fields["usage"] = use
    return fields


# ---- chat ------------------------------------------------------------------------------------
def chat_logprobs(lps: Sequence[LogprobLike], token_text: TokenText) -> dict[str, Any]:
    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        text = token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {"content": [
        {**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
        for lp in lps
    ]}


def chat_body(
    rid: str, model: str, text: str, finish_reason: str | None,
    logprobs: dict[str, Any] | None, use: dict[str, int], created: int | None = None,
) -> dict[str, Any]:
    return {
        "id": rid, "object": CHAT_OBJECT,
        "created": created if created is not None else int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "logprobs": logprobs, "finish_reason": finish_reason}],
        "usage": use,
    }


def chat_chunk(
    rid: str, model: str, created: int, delta: dict[str, Any],
    finish_reason: str | None, logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "id": rid, "object": CHAT_CHUNK_OBJECT, "created": created, "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": logprobs,
                     "finish_reason": finish_reason}],
    }


def chunk_object(chat: bool) -> str:
    return CHAT_CHUNK_OBJECT if chat else COMPLETION_OBJECT


# ---- extensions (both endpoints, whole bodies and chunks) -------------------------------------
def add_token_ids(
    body: dict[str, Any], token_ids: Sequence[int], prompt_token_ids: Sequence[int] | None
) -> dict[str, Any]:
    """`return_token_ids`: the choice's generated ids; the prompt's ids at top level if given."""
    body["choices"][0]["token_ids"] = list(token_ids)
    if prompt_token_ids is not None:
        body["prompt_token_ids"] = list(prompt_token_ids)
    return body


def add_transfer_stats(body: dict[str, Any], stats: dict[str, Any] | None) -> dict[str, Any]:
    """A decode instance's KV transfer statistics, top level; absent without a transfer."""
    if stats is not None:
        body["kv_transfer_stats"] = dict(stats)
    return body


def usage_chunk(rid: str, model: str, created: int, obj: str, use: dict[str, int]) -> dict:
    """The final stream chunk with `stream_options.include_usage`: no choices, only usage."""
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [],
            "usage": use}
