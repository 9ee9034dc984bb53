"""OpenAI response shapes for completions and chat completions (whole bodies and SSE chunks).

Owns the JSON layout only: ids, objects, choices, usage, logprobs, and the extensions
`token_ids` / `prompt_token_ids` / `kv_transfer_stats`. Knows nothing of engines,
HTTP or validation; token strings come from a `token_text` callable supplied by the caller.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from hybridpd.engine.protocol import TokenLogprob

TokenText = Callable[[int], str]


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def sse(payload: dict[str, Any] | str) -> bytes:
    """One server-sent event: `data: <json>\\n\\n` (or a literal like [DONE])."""
    data = payload if isinstance(payload, str) else json.dumps(payload)
    return f"data: {data}\n\n".encode()


# ---- completions -----------------------------------------------------------------------------
def completion_logprobs(
    lps: Sequence[TokenLogprob], token_text: TokenText, offset: int = 0
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


def completion_body(
    rid: str, model: str, text: str, finish_reason: str | None,
    logprobs: dict[str, Any] | None, use: dict[str, int] | None, created: int | None = None,
) -> dict[str, Any]:
    choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
    body: dict[str, Any] = {
        "id": rid,
        "object": "text_completion",
        "created": created if created is not None else int(time.time()),
        "model": model,
        "choices": [choice],
    }
    if use is not None:
        body["usage"] = use
    return body


# ---- chat ------------------------------------------------------------------------------------
def chat_logprobs(lps: Sequence[TokenLogprob], token_text: TokenText) -> dict[str, Any]:
    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        text = token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {
        "content": [
            {**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
            for lp in lps
        ]
    }


def chat_body(
    rid: str, model: str, text: str | None, finish_reason: str | None,
    logprobs: dict[str, Any] | None, use: dict[str, int], created: int | None = None,
    tool_calls: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {
        "id": rid,
        "object": "chat.completion",
        "created": created if created is not None else int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": logprobs,
                "finish_reason": finish_reason,
            }
        ],
        "usage": use,
    }


def chat_chunk(
    rid: str, model: str, created: int, delta: dict[str, Any],
    finish_reason: str | None, logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
    return {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [choice],
    }


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
