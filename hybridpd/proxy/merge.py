"""Combining the prefill leg's answer with the decode leg's (pure functions on OpenAI JSON).

Owns: reading the first token's text/logprobs/usage/token ids (and, with echo or
prompt_logprobs, the prompt's text and scores: P computes them) from P's answer, the decode
leg's body (without those prompt-only fields), merging P + D
into one non-streaming answer (token ids: P's then D's; D's `kv_transfer_stats` kept), the
first SSE chunk, rewriting D's chunks (role, usage, offsets, prompt ids), and turning an
answer that finished on P into stream events (with `stream_options.continuous_usage_stats`
every chunk's usage counts P's tokens too). Bodies, chunks and usage are built by the shared
OpenAI package (`hybridpd/openai/responses.py`), as on the instances. With n > 1 (P ran
n = 1, D forked the state into n choices) P's first piece starts every choice. Knows nothing
of HTTP.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, replace
from typing import Any

from hybridpd.openai import responses as R


@dataclass(frozen=True)
class FirstPiece:
    """What the prefill leg produced (the first token in first-token mode; nothing in n-1)."""

    text: str
    logprobs: Any
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None
    token_ids: tuple[int, ...] | None = None  # with return_token_ids: P's generated ids
    prompt_token_ids: tuple[int, ...] | None = None  # with return_token_ids
    # with prompt_logprobs: P's (P is the one that saw the prompt; D is not asked for them)
    prompt_logprobs: Any = None


# fields only the prefill leg acts on: P echoes and scores the prompt, D must not do it again
PREFILL_ONLY_FIELDS = ("echo", "prompt_logprobs")


def decode_leg_body(body: dict[str, Any]) -> dict[str, Any]:
    """The client's body for the decode leg: without the prompt's echo and scores (P's answer
    carries them, and D never computes the prompt)."""
    return {k: v for k, v in body.items() if k not in PREFILL_ONLY_FIELDS}


def first_piece(p_body: dict[str, Any], chat: bool) -> FirstPiece:
    choice = p_body["choices"][0]
    text = (choice["message"].get("content") or "") if chat else (choice.get("text") or "")
    use = p_body.get("usage") or {}
    prompt_lps = p_body.get("prompt_logprobs") if chat else choice.get("prompt_logprobs")
    return FirstPiece(text, choice.get("logprobs"), int(use.get("prompt_tokens", 0)),
                      int(use.get("completion_tokens", 0)), choice.get("finish_reason"),
                      _ids(choice.get("token_ids")), _ids(p_body.get("prompt_token_ids")),
                      prompt_lps)


def _add_prompt_logprobs(out: dict[str, Any], first: FirstPiece, chat: bool) -> None:
    if first.prompt_logprobs is None:
        return
    if chat:
        out["prompt_logprobs"] = first.prompt_logprobs
    else:
        out["choices"][0]["prompt_logprobs"] = first.prompt_logprobs


def _ids(value: Any) -> tuple[int, ...] | None:
    return None if value is None else tuple(value)


def _merge_token_ids(out: dict[str, Any], first: FirstPiece) -> None:
    """P's generated ids then D's; the prompt's ids from P (D saw the same prompt)."""
    if not out.get("choices"):
        return
    choice = out["choices"][0]
    if first.token_ids is None and choice.get("token_ids") is None:
        return
    choice["token_ids"] = list(first.token_ids or ()) + list(choice.get("token_ids") or ())
    if first.prompt_token_ids is not None:
        out["prompt_token_ids"] = list(first.prompt_token_ids)


def _first_extensions(chunk: dict[str, Any], first: FirstPiece) -> dict[str, Any]:
    if first.token_ids is not None:
        chunk["choices"][0]["token_ids"] = list(first.token_ids)
    if first.prompt_token_ids is not None:
        chunk["prompt_token_ids"] = list(first.prompt_token_ids)
    return chunk


def _concat_logprobs(first: Any, rest: Any, chat: bool, shift: int) -> Any:
    if first is None or rest is None:
        return rest if first is None else first
    if chat:
        return {"content": list(first.get("content") or []) + list(rest.get("content") or [])}
    return {
        "tokens": first["tokens"] + rest["tokens"],
        "token_logprobs": first["token_logprobs"] + rest["token_logprobs"],
        "top_logprobs": first["top_logprobs"] + rest["top_logprobs"],
        "text_offset": first["text_offset"] + [o + shift for o in rest["text_offset"]],
    }


def _shift_offsets(logprobs: Any, shift: int) -> Any:
    if not logprobs or "text_offset" not in logprobs or not shift:
        return logprobs
    return {**logprobs, "text_offset": [o + shift for o in logprobs["text_offset"]]}


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return R.usage(prompt, completion)


def strip_transfer(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k != "kv_transfer_params"}


def merge_final(first: FirstPiece, d_body: dict[str, Any], chat: bool) -> dict[str, Any]:
    """One non-streaming answer: P's text then D's, usage prompt from P, completions P + D."""
    out = strip_transfer(copy.deepcopy(d_body))
    shift = len(first.text)
    for choice in out["choices"]:
        if chat:
            choice["message"]["content"] = first.text + (choice["message"].get("content") or "")
        else:
            choice["text"] = first.text + (choice.get("text") or "")
        choice["logprobs"] = _concat_logprobs(first.logprobs, choice.get("logprobs"), chat,
                                              shift)
    d_use = d_body.get("usage") or {}
    n = max(1, len(out["choices"]))
    out["usage"] = _usage(first.prompt_tokens,
                          n * first.completion_tokens + int(d_use.get("completion_tokens", 0)))
    _merge_token_ids(out, first)
    _add_prompt_logprobs(out, first, chat)
    return out  # D's kv_transfer_stats, if any, stays as it is


def echo_chunks(rid: str, model: str, created: int, first: FirstPiece, echo: str,
                continuous_usage: bool = False, n: int = 1
                ) -> tuple[list[dict[str, Any]], FirstPiece]:
    """vLLM's start of a chat stream with `echo`: the role chunk of every choice, then the
    echo chunk of every choice; and P's piece without the echo (P echoed: its answer starts
    with it). No chunks (and the piece as it is) without an echo."""
    if not echo or not first.text.startswith(echo):
        return [], first
    chunks = []
    for delta in ({"role": "assistant", "content": ""}, {"content": echo}):
        for i in range(n):
            chunk = R.chat_chunk(rid, model, created, delta, None)
            chunk["choices"][0]["index"] = i
            if continuous_usage:
                chunk["usage"] = _usage(first.prompt_tokens, 0)
            chunks.append(chunk)
    return chunks, replace(first, text=first.text[len(echo):])


def without_chat_echo(body: dict[str, Any], echo: str) -> dict[str, Any]:
    """A whole chat answer with every choice's leading `echo` taken off its content (P echoed
    it; tool calls are parsed from the generated text only)."""
    if not echo:
        return body
    for choice in body.get("choices") or ():
        text = choice["message"].get("content") or ""
        if text.startswith(echo):
            choice["message"] = {**choice["message"], "content": text[len(echo):]}
    return body


def with_chat_echo(body: dict[str, Any], echo: str) -> dict[str, Any]:
    """A whole chat answer with `echo` put back in front of every choice's content."""
    if not echo:
        return body
    for choice in body.get("choices") or ():
        choice["message"] = {**choice["message"],
                             "content": echo + (choice["message"].get("content") or "")}
    return body


def first_chunk(rid: str, model: str, created: int, first: FirstPiece, chat: bool,
                continuous_usage: bool = False, n: int = 1, role: bool = True) -> dict:
    """The client's first chunk: P's piece, once per choice (n); chat: with the role unless
    it was sent already (`echo_chunks`)."""
    if chat:
        delta = {"role": "assistant", "content": first.text} if role else \
            {"content": first.text}
        chunk = R.chat_chunk(rid, model, created, delta, None, first.logprobs)
    else:
        chunk = R.completion_body(rid, model, first.text, None, first.logprobs, None, created)
    if n > 1:
        chunk["choices"] = [{**chunk["choices"][0], "index": i} for i in range(n)]
    if continuous_usage:
        chunk["usage"] = _usage(first.prompt_tokens, n * first.completion_tokens)
    _add_prompt_logprobs(chunk, first, chat)
    return _first_extensions(chunk, first)


def rewrite_d_chunk(event: dict[str, Any], first: FirstPiece, chat: bool,
                    n: int = 1) -> dict | None:
    """D's chunk as the client should see it; None to drop it (D's own role chunk).

    Token ids stay per chunk (P's came in the first chunk); the prompt's ids were sent there
    too, so D's copy is dropped; D's `kv_transfer_stats` (final chunk) passes unchanged.
    """
    event = strip_transfer(event)
    event.pop("prompt_token_ids", None)
    if event.get("usage"):  # the final usage chunk, or every chunk's (continuous_usage_stats)
        use = event["usage"]
        event["usage"] = _usage(first.prompt_tokens,
                                n * first.completion_tokens + int(use.get("completion_tokens", 0)))
        if not event.get("choices"):
            return event
    choices = event.get("choices") or []
    if chat and choices and any("role" in c.get("delta", {}) for c in choices):
        kept = []
        for c in choices:
            delta = {k: v for k, v in c.get("delta", {}).items() if k != "role"}
            if delta.get("content") or c.get("finish_reason") is not None:
                kept.append({**c, "delta": delta})
        if not kept:
            return None
        event["choices"] = kept
    elif not chat and choices:
        event["choices"] = [{**c, "logprobs": _shift_offsets(c.get("logprobs"), len(first.text))}
                            for c in choices]
    return event


def finished_on_p(p_body: dict[str, Any], n: int) -> dict[str, Any]:
    """A non-streaming answer that ended on P, its one choice repeated for n (P's one first
    token is every choice's whole answer)."""
    out = strip_transfer(p_body)
    if n > 1 and out.get("choices"):
        out = copy.deepcopy(out)
        out["choices"] = [{**out["choices"][0], "index": i} for i in range(n)]
        use = out.get("usage") or {}
        out["usage"] = _usage(int(use.get("prompt_tokens", 0)),
                              n * int(use.get("completion_tokens", 0)))
    return out


def finished_on_p_events(
    p_body: dict[str, Any], chat: bool, include_usage: bool, continuous_usage: bool = False,
    n: int = 1,
) -> list[dict[str, Any] | str]:
    """A whole answer that ended on P (EOS, max_tokens...), as stream events."""
    first = first_piece(p_body, chat)
    rid, model = p_body.get("id", ""), p_body.get("model", "")
    created = int(p_body.get("created", time.time()))
    chunk = first_chunk(rid, model, created, first, chat, continuous_usage, n)
    for choice in chunk["choices"]:
        choice["finish_reason"] = first.finish_reason
    events: list[dict[str, Any] | str] = [chunk]
    if include_usage:
        events.append(R.usage_chunk(rid, model, created, R.chunk_object(chat),
                                    _usage(first.prompt_tokens, n * first.completion_tokens)))
    events.append("[DONE]")
    return events
