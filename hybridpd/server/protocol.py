"""Parsing and validation of OpenAI-style request bodies.

Owns: which fields `/v1/completions` and `/v1/chat/completions` accept, their types and ranges,
the fields accepted-and-ignored at their default values, and `ApiError` (a 4xx with the OpenAI
error shape). Produces a frozen `ApiRequest`. Knows nothing of tokenizers, engines or aiohttp.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hybridpd.request import SamplingParams

# error code of a 503 for a request that never started (its queue deadline passed): the one
# answer after which the P/D proxy may send the request to another instance
QUEUE_TIMEOUT_CODE = "queue_timeout"


class Endpoint(str, enum.Enum):
    COMPLETIONS = "completions"
    CHAT = "chat"


class ApiError(Exception):
    """A client-visible error in the OpenAI error shape."""

    def __init__(
        self,
        message: str,
        param: str | None = None,
        status: int = 400,
        code: str | None = None,
        err_type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.message, self.param, self.status = message, param, status
        self.code, self.err_type = code, err_type

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.err_type,
                "param": self.param,
                "code": self.code,
            }
        }


@dataclass(frozen=True)
class ApiRequest:
    """A validated request; `prompt` is text or token ids, `messages` is set for chat."""

    endpoint: Endpoint
    model: str | None
    prompt: str | tuple[int, ...] | None
    messages: tuple[dict[str, str], ...] | None
    max_tokens: int | None  # None: the endpoint's default (resolved once the prompt is known)
    sampling: dict[str, Any]  # SamplingParams fields other than max_tokens
    stream: bool
    include_usage: bool
    logprobs: int | None  # None: none; n: sampled token plus top-n
    kv_transfer_params: dict[str, Any] | None
    return_token_ids: bool = False  # extension: generated and prompt token ids in the answer
    # completions with a list of prompts (two or more): every prompt, in order; `prompt` is the
    # first. Their choices come out prompt-major: index = prompt_index * n + sample.
    prompts: tuple[str | tuple[int, ...], ...] = ()

    @property
    def n(self) -> int:
        return int(self.sampling.get("n", 1))

    @property
    def multi(self) -> bool:
        """More than one choice: n > 1 or several prompts."""
        return self.n > 1 or len(self.prompts) > 1

    def sampling_params(self, max_tokens: int) -> SamplingParams:
        """The engine's params; ApiError (naming the field) when they are out of range."""
        min_tokens = self.sampling.get("min_tokens", 0)
        if min_tokens > max_tokens:
            raise ApiError(f"min_tokens ({min_tokens}) must not exceed max_tokens "
                           f"({max_tokens})", "min_tokens")
        try:
            return SamplingParams(max_tokens=max_tokens, logprobs=self.logprobs, **self.sampling)
        except ValueError as exc:
            raise ApiError(str(exc), _field_named_by(str(exc))) from None


def _field_named_by(message: str) -> str | None:
    """SamplingParams messages start with the field's name ("top_p must be ...")."""
    name = message.split(" ", 1)[0]
    return name if name in SAMPLING_FIELDS else None


# Fields OpenAI clients send that we accept only at their no-op value: name -> predicate.
IGNORED_AT_DEFAULT: dict[str, Callable[[Any], bool]] = {
    "frequency_penalty": lambda v: v == 0,
    "presence_penalty": lambda v: v == 0,
    "repetition_penalty": lambda v: v == 1,
    "logit_bias": lambda v: v == {},
    "suffix": lambda v: v == "",
    "response_format": lambda v: v == {"type": "text"},
    "tools": lambda v: v == [],
    "tool_choice": lambda v: v == "none",
    "parallel_tool_calls": lambda v: isinstance(v, bool),
    "store": lambda v: v is False,
    "service_tier": lambda v: v in ("auto", "default"),
    "modalities": lambda v: v == ["text"],
}
ALWAYS_IGNORED = ("user", "metadata")
SAMPLING_FIELDS = frozenset((
    "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids",
    "ignore_eos", "logprobs", "min_tokens", "n", "best_of",
))
COMMON_FIELDS = (
    "model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids",
    "ignore_eos", "min_tokens", "stream", "stream_options", "n", "kv_transfer_params",
    "logprobs", "return_token_ids",
)
COMPLETION_FIELDS = frozenset((*COMMON_FIELDS, "prompt", "echo", "best_of"))
CHAT_FIELDS = frozenset((*COMMON_FIELDS, "messages", "max_completion_tokens", "top_logprobs"))
MAX_TOP_LOGPROBS = 20
MAX_PROMPTS = 256  # prompts in one completions request
MAX_CHOICES = 128  # n, best_of (SamplingParams allows as many)


def parse_request(body: Any, endpoint: Endpoint) -> ApiRequest:
    """Validate a decoded JSON body; raises ApiError naming the offending field."""
    if not isinstance(body, dict):
        raise ApiError("request body must be a JSON object")
    allowed = COMPLETION_FIELDS if endpoint is Endpoint.COMPLETIONS else CHAT_FIELDS
    body = {k: v for k, v in body.items() if v is not None}  # null means "not given"
    _check_field_names(body, allowed)
    prompts: tuple[str | tuple[int, ...], ...] = ()
    if endpoint is Endpoint.COMPLETIONS:
        prompts = _prompts(body)
        prompt, messages = prompts[0], None
        prompts = prompts if len(prompts) > 1 else ()
        if _bool(body, "echo", False):
            raise ApiError("echo is not supported", "echo")
        logprobs = _int(body, "logprobs", 0, MAX_TOP_LOGPROBS)
        max_tokens = _int(body, "max_tokens", 1)
    else:
        prompt, messages = None, _messages(body)
        logprobs = _chat_logprobs(body)
        legacy = _int(body, "max_tokens", 1)  # validated even when max_completion_tokens wins
        max_tokens = _int(body, "max_completion_tokens", 1)
        max_tokens = max_tokens if max_tokens is not None else legacy
    stream, include_usage = stream_flags(body)
    sampling = _sampling(body)
    _check_choices(body, sampling, stream, bool(prompts))
    api = ApiRequest(
        endpoint=endpoint,
        model=_str(body, "model"),
        prompt=prompt,
        messages=messages,
        max_tokens=max_tokens,
        sampling=sampling,
        stream=stream,
        include_usage=include_usage,
        logprobs=logprobs,
        kv_transfer_params=_dict(body, "kv_transfer_params"),
        return_token_ids=_bool(body, "return_token_ids", False),
        prompts=prompts,
    )
    # range checks now, before any tokenization; an unset max_tokens is resolved later
    api.sampling_params(max_tokens if max_tokens is not None
                        else max(1, api.sampling.get("min_tokens", 0)))
    return api


def stream_flags(body: dict[str, Any]) -> tuple[bool, bool]:
    """(stream, stream_options.include_usage) of a request body; ApiError when malformed.

    Shared with the P/D proxy, which must refuse a bad `stream` before spending a prefill.
    """
    stream = _bool(body, "stream", False) if body.get("stream") is not None else False
    return stream, _include_usage(body, stream)


def _check_field_names(body: dict[str, Any], allowed: frozenset[str]) -> None:
    for name, value in body.items():
        if name in allowed or name in ALWAYS_IGNORED:
            continue
        check = IGNORED_AT_DEFAULT.get(name)
        if check is None:
            raise ApiError(f"unknown field {name!r}", name, code="unknown_field")
        if not check(value):
            raise ApiError(f"{name}={value!r} is not supported (only its default)", name)


def _sampling(body: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, conv in (("temperature", _float), ("top_p", _float)):
        if name in body:
            out[name] = conv(body, name)
    if "top_k" in body:
        out["top_k"] = _int(body, "top_k", -1)
    if "seed" in body:
        out["seed"] = _int(body, "seed")
    if "min_tokens" in body:
        out["min_tokens"] = _int(body, "min_tokens", 0)
    out["stop"] = _stop(body)
    out["stop_token_ids"] = tuple(_int_list(body, "stop_token_ids", 0))
    out["ignore_eos"] = _bool(body, "ignore_eos", False)
    return out


def _check_choices(body: dict[str, Any], sampling: dict[str, Any], stream: bool,
                   several_prompts: bool) -> None:
    """n / best_of into `sampling`; what they cannot be combined with."""
    n = _int(body, "n", 1, MAX_CHOICES)
    best_of = _int(body, "best_of", 1, MAX_CHOICES)
    if n is not None:
        sampling["n"] = n
    if best_of is not None and best_of != (n or 1):
        sampling["best_of"] = best_of
        if stream:
            raise ApiError("best_of > n cannot be streamed (the best samples are known only at "
                           "the end)", "best_of")
    if several_prompts and body.get("kv_transfer_params") is not None:
        raise ApiError("kv_transfer_params is for one prompt (the P/D proxy sends that)",
                       "kv_transfer_params")
    if (n or 1) > 1 or several_prompts:
        if _bool(body, "return_token_ids", False):
            raise ApiError("return_token_ids is supported for one prompt with n = 1",
                           "return_token_ids")


def choice_count(body: dict[str, Any]) -> int:
    """`n` of a request body (1 when absent); ApiError when malformed. Shared with the P/D
    proxy, which sends the prefill leg n = 1 and must refuse a bad n before spending it."""
    n = _int({k: v for k, v in body.items() if v is not None}, "n", 1, MAX_CHOICES)
    return 1 if n is None else int(n)


def is_prompt_list(body: dict[str, Any]) -> bool:
    """Whether a completions body carries a list of prompts (two or more)."""
    p = body.get("prompt")
    return isinstance(p, list) and len(p) > 1 and all(isinstance(x, str | list) for x in p)


def _prompts(body: dict[str, Any]) -> tuple[str | tuple[int, ...], ...]:
    """A completions request's prompts: one, or a list of strings / of token-id lists."""
    if "prompt" not in body:
        raise ApiError("prompt is required", "prompt")
    p = body["prompt"]
    if isinstance(p, list) and p and all(isinstance(x, str | list) for x in p):
        if len(p) > MAX_PROMPTS:
            raise ApiError(f"at most {MAX_PROMPTS} prompts per request, got {len(p)}", "prompt")
        return tuple(_prompt(x) for x in p)
    return (_prompt(p),)


def _prompt(p: Any) -> str | tuple[int, ...]:
    if isinstance(p, str):
        if not p:
            raise ApiError("prompt must not be empty", "prompt")
        return _unicode(p, "prompt", "prompt")
    if isinstance(p, list) and p and all(_is_int(t) for t in p):
        if any(t < 0 for t in p):
            raise ApiError("prompt token ids must be >= 0", "prompt")
        return tuple(p)
    raise ApiError(
        "prompt must be a non-empty string, a list of token ids, or a list of one of those",
        "prompt",
    )


def _messages(body: dict[str, Any]) -> tuple[dict[str, str], ...]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError("messages must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError(f"messages[{i}] must be an object with a string 'role'", "messages")
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            content = _text_parts(content, i)
        if not isinstance(content, str):
            raise ApiError(f"messages[{i}].content must be a string", "messages")
        out.append({"role": _unicode(m["role"], "messages", f"messages[{i}].role"),
                    "content": _unicode(content, "messages", f"messages[{i}].content")})
    return tuple(out)


def _text_parts(parts: list[Any], i: int) -> str:
    texts = []
    for part in parts:
        if not isinstance(part, dict) or part.get("type") != "text":
            raise ApiError(f"messages[{i}].content: only text parts are supported", "messages")
        texts.append(str(part.get("text", "")))
    return "".join(texts)


def _chat_logprobs(body: dict[str, Any]) -> int | None:
    wanted = _bool(body, "logprobs", False)
    top = _int(body, "top_logprobs", 0, MAX_TOP_LOGPROBS)
    if top is not None and not wanted:
        raise ApiError("top_logprobs requires logprobs=true", "top_logprobs")
    return (top or 0) if wanted else None


def _include_usage(body: dict[str, Any], stream: bool) -> bool:
    opts = _dict(body, "stream_options")
    if opts is None:
        return False
    if not stream:
        raise ApiError("stream_options is only allowed with stream=true", "stream_options")
    unknown = set(opts) - {"include_usage", "continuous_usage_stats"}
    if unknown:
        raise ApiError(f"unknown stream_options field {sorted(unknown)[0]!r}", "stream_options")
    if opts.get("continuous_usage_stats") not in (None, False):
        raise ApiError("stream_options.continuous_usage_stats is not supported",
                       "stream_options")
    if not isinstance(opts.get("include_usage", False), bool):
        raise ApiError("stream_options.include_usage must be a boolean", "stream_options")
    return bool(opts.get("include_usage", False))


def _stop(body: dict[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise ApiError("stop must be a non-empty string or a list of them", "stop")
    return tuple(_unicode(s, "stop", "stop") for s in stop)


# ---- typed field readers ---------------------------------------------------------------------
def _unicode(text: str, param: str, what: str) -> str:
    """`text` if it is encodable text; JSON escapes can smuggle in lone surrogates ("\\ud800")."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ApiError(f"{what} is not valid Unicode: lone surrogate at character {exc.start}",
                       param) from None
    return text


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int(body: dict[str, Any], name: str, lo: int | None = None, hi: int | None = None) -> Any:
    if name not in body:
        return None
    v = body[name]
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if not _is_int(v):
        raise ApiError(f"{name} must be an integer, got {v!r}", name)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise ApiError(f"{name} must be in [{lo}, {hi if hi is not None else 'inf'}]", name)
    return v


def _float(body: dict[str, Any], name: str) -> float:
    v = body[name]
    if not (_is_int(v) or isinstance(v, float)) or not math.isfinite(v):
        raise ApiError(f"{name} must be a number, got {v!r}", name)
    return float(v)


def _bool(body: dict[str, Any], name: str, default: bool) -> bool:
    v = body.get(name, default)
    if not isinstance(v, bool):
        raise ApiError(f"{name} must be a boolean, got {v!r}", name)
    return v


def _str(body: dict[str, Any], name: str) -> str | None:
    v = body.get(name)
    if v is not None and not isinstance(v, str):
        raise ApiError(f"{name} must be a string", name)
    return v


def _dict(body: dict[str, Any], name: str) -> dict[str, Any] | None:
    v = body.get(name)
    if v is not None and not isinstance(v, dict):
        raise ApiError(f"{name} must be an object", name)
    return v


def _int_list(body: dict[str, Any], name: str, lo: int) -> list[int]:
    v = body.get(name, [])
    if not isinstance(v, list) or not all(_is_int(t) and t >= lo for t in v):
        raise ApiError(f"{name} must be a list of integers >= {lo}", name)
    return v
