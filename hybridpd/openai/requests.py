"""Request models of `/v1/completions` and `/v1/chat/completions` (pydantic v2).

Owns every field a client may send, with OpenAI's (and vLLM's) names, types and ranges, in
strict mode (no "10" for 10, no true for 1; an integral number such as 10.0 is an integer, as
JSON does not tell them apart); unknown fields are kept in `model_extra` so the
caller can log and ignore them. Whether the engine supports a declared field is not decided
here (`support.py`), nor how a field reaches the engine (`sampling.py`). Knows nothing of
tokenizers, engines or HTTP.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

MAX_TOP_LOGPROBS = 20
MAX_N = 128


def _integral(v: Any) -> Any:
    """10.0 -> 10 (JSON has one number type); anything else is left to the strict check."""
    return int(v) if isinstance(v, float) and v.is_integer() else v


Int = Annotated[int, BeforeValidator(_integral)]
NonNegInt = Annotated[Int, Field(ge=0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]


def check_unicode(text: str, what: str) -> str:
    """`text` if it is encodable text; JSON escapes can smuggle in lone surrogates ("\\ud800")."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{what} is not valid Unicode: lone surrogate at character "
                         f"{exc.start}") from None
    return text


class _Model(BaseModel):
    """Strict, and open to unknown fields (kept in `model_extra`, logged by the caller)."""

    model_config = ConfigDict(strict=True, extra="allow")


class _Closed(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(_Closed):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM: with include_usage, usage on every chunk


class JsonSchemaFormat(_Model):
    name: str = "schema"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Model):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class FunctionDefinition(_Model):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Model):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(_Model):
    name: str


class NamedToolChoice(_Model):
    type: Literal["function"] = "function"
    function: NamedFunction


class SamplingFields(_Model):
    """Fields both endpoints share: sampling, streaming, vLLM extensions, P/D hand-off."""

    model: str | None = None
    max_tokens: NonNegInt | None = None  # 0 (prompt scoring) is declared; support.py decides
    temperature: float | None = None  # ranges: SamplingParams (one source)
    top_p: float | None = None
    top_k: Int | None = None
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    seed: Int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[NonNegInt] | None = None
    ignore_eos: bool = False
    min_tokens: NonNegInt | None = None
    n: Annotated[Int, Field(ge=1, le=MAX_N)] = 1
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    repetition_penalty: Annotated[float, Field(gt=0.0, le=2.0)] | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None
    bad_words: list[str] | None = None
    allowed_token_ids: list[NonNegInt] | None = None
    prompt_logprobs: NonNegInt | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: dict[str, Any] | None = None  # vLLM's structured-output options
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    user: str | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None
    kv_transfer_params: dict[str, Any] | None = None  # P/D hand-off (instances and the proxy)
    return_token_ids: bool = False  # extension: generated and prompt token ids in the answer

    @field_validator("temperature", "top_p")
    @classmethod
    def _finite(cls, v: float | None) -> float | None:
        if v is not None and not math.isfinite(v):
            raise ValueError(f"must be a finite number, got {v!r}")
        return v

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        for s in [v] if isinstance(v, str) else v or []:
            if not s:
                raise ValueError("stop must be a non-empty string or a list of them")
            check_unicode(s, "stop")
        return v


class CompletionRequest(SamplingFields):
    """`POST /v1/completions`."""

    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False
    logprobs: Annotated[Int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    best_of: Annotated[Int, Field(ge=1, le=MAX_N)] | None = None
    suffix: str | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, p: Any) -> Any:
        if isinstance(p, str):
            if not p:
                raise ValueError("prompt must not be empty")
            return check_unicode(p, "prompt")
        if isinstance(p, list) and p and all(_is_int(t) for t in p):
            if any(t < 0 for t in p):
                raise ValueError("prompt token ids must be >= 0")
            return p
        if isinstance(p, list) and p and all(isinstance(x, str) for x in p):
            for x in p:
                if not x:
                    raise ValueError("prompt must not be empty")
                check_unicode(x, "prompt")
            return p
        if isinstance(p, list) and p and all(isinstance(x, list) and x for x in p):
            if not all(_is_int(t) and t >= 0 for x in p for t in x):
                raise ValueError("prompt token ids must be integers >= 0")
            return p
        raise ValueError("prompt must be a non-empty string, a list of token ids, or a list "
                         "of one of those")


class TextPart(_Model):
    type: Literal["text"]
    text: str

    @field_validator("text")
    @classmethod
    def _text(cls, v: str) -> str:
        return check_unicode(v, "text")


class ChatMessage(_Model):
    """One message; fields beyond role/content/name (e.g. tool_calls) pass to the template."""

    role: Annotated[str, Field(min_length=1)]
    content: str | list[TextPart] | None = None
    name: str | None = None

    @field_validator("role", "name")
    @classmethod
    def _text(cls, v: str | None) -> str | None:
        return None if v is None else check_unicode(v, "text")

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, v: Any) -> Any:
        if isinstance(v, list) and not all(isinstance(p, dict) and p.get("type") == "text"
                                           for p in v):
            raise ValueError("only text parts are supported")
        if isinstance(v, str):
            check_unicode(v, "content")
        return v

    def text(self) -> str:
        """The content as one string (text parts joined)."""
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(SamplingFields):
    """`POST /v1/chat/completions`."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: NonNegInt | None = None
    logprobs: bool = False
    top_logprobs: Annotated[Int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    modalities: list[str] | None = None
    echo: bool = False  # vLLM: the last message's content prepended to the answer
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)
