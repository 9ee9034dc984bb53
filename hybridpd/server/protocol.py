"""From a validated OpenAI request model to what the instance serves: `ApiRequest`.

Owns which endpoint a request is for, resolving the fields the instance acts on (prompt or
messages with their `name`, max_tokens vs max_completion_tokens, logprobs per endpoint, the
chat-template options, text-pipeline options) and the `SamplingParams` range check naming the
field. The request models, the unsupported-field table and the error shape live in
`hybridpd/openai/`. Knows nothing of tokenizers, engines or aiohttp.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from hybridpd.openai.errors import QUEUE_TIMEOUT_CODE, ApiError
from hybridpd.openai.parse import validate_request
from hybridpd.openai.requests import MAX_TOP_LOGPROBS, ChatCompletionRequest, CompletionRequest
from hybridpd.openai.sampling import sampling_kwargs
from hybridpd.openai.structured import ToolPlan, request_tool_plan
from hybridpd.request import SamplingParams

__all__ = ["QUEUE_TIMEOUT_CODE", "ApiError", "ApiRequest", "Endpoint", "MAX_TOP_LOGPROBS",
           "parse_request"]


class Endpoint(str, enum.Enum):
    COMPLETIONS = "completions"
    CHAT = "chat"


@dataclass(frozen=True)
class ApiRequest:
    """A validated request; `prompt` is text or token ids, `messages` is set for chat."""

    endpoint: Endpoint
    model: str | None
    prompt: str | tuple[int, ...] | None
    messages: tuple[dict[str, Any], ...] | None
    max_tokens: int | None  # None: the endpoint's default (resolved once the prompt is known)
    sampling: dict[str, Any]  # SamplingParams fields other than max_tokens
    stream: bool
    include_usage: bool
    logprobs: int | None  # None: none; n: sampled token plus top-n
    kv_transfer_params: dict[str, Any] | None
    return_token_ids: bool = False  # extension: generated and prompt token ids in the answer
    continuous_usage: bool = False  # stream_options.continuous_usage_stats: usage every chunk
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # chat template: add_generation_prompt, continue_final_message, chat_template_kwargs
    template_options: dict[str, Any] = field(default_factory=dict)
    tools: ToolPlan | None = None  # chat: tools and tool_choice (openai/structured.py)
    echo: bool = False  # completions: the prompt's text (and logprobs) before the answer's
    # chat `echo` (vLLM): the last message's content, put before the answer's content
    chat_echo: str = ""
    prompt_logprobs: int | None = None  # vLLM's field: per prompt token logprob + top-k
    bad_words: tuple[str, ...] = ()  # text: the serving layer tokenizes them
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

    @property
    def scored_prompt_logprobs(self) -> int | None:
        """What the engine scores: `prompt_logprobs`, and with echo + logprobs the top-n that
        the echoed prompt's logprobs show (the larger of the two)."""
        if self.echo and self.logprobs is not None:
            return max(self.logprobs, self.prompt_logprobs or 0)
        return self.prompt_logprobs

    def sampling_params(self, max_tokens: int,
                        bad_words_token_ids: tuple[tuple[int, ...], ...] = (),
                        vocab_size: int | None = None) -> SamplingParams:
        """The engine's params; ApiError (naming the field) when they are out of range or,
        given `vocab_size`, name a token outside the vocabulary."""
        min_tokens = self.sampling.get("min_tokens", 0)
        if min_tokens > max_tokens:
            raise ApiError(f"min_tokens ({min_tokens}) must not exceed max_tokens "
                           f"({max_tokens})", "min_tokens")
        try:
            params = SamplingParams(max_tokens=max_tokens, logprobs=self.logprobs,
                                    bad_words_token_ids=bad_words_token_ids,
                                    prompt_logprobs=self.scored_prompt_logprobs,
                                    **self.sampling)
            if vocab_size is not None:
                params.check_token_ids(vocab_size)
            return params
        except ValueError as exc:
            raise ApiError(str(exc), _field_named_by(str(exc))) from None


def _field_named_by(message: str) -> str | None:
    """SamplingParams messages start with the field's name ("top_p must be ...")."""
    name = message.split(" ", 1)[0].split("[", 1)[0]  # "logit_bias[5] must be ..."
    if name == "bad_words_token_ids":
        return "bad_words"  # the API's name for it
    return name if name.isidentifier() and name in SamplingParams.__dataclass_fields__ else None


def parse_request(body: Any, endpoint: Endpoint) -> ApiRequest:
    """Validate a decoded JSON body; raises ApiError naming the offending field."""
    req = validate_request(body, chat=endpoint is Endpoint.CHAT)
    opts = req.stream_options
    common: dict[str, Any] = {
        "endpoint": endpoint,
        "model": req.model,
        "sampling": sampling_kwargs(req),
        "stream": req.stream,
        "include_usage": bool(opts and opts.include_usage),
        # as vLLM: usage on every chunk only together with include_usage
        "continuous_usage": bool(opts and opts.include_usage and opts.continuous_usage_stats),
        "kv_transfer_params": req.kv_transfer_params,
        "return_token_ids": req.return_token_ids,
        "skip_special_tokens": req.skip_special_tokens,
        "include_stop_str_in_output": req.include_stop_str_in_output,
        "prompt_logprobs": req.prompt_logprobs,
        "bad_words": tuple(req.bad_words or ()),
    }
    if isinstance(req, CompletionRequest):
        if req.max_tokens == 0 and not req.echo and req.prompt_logprobs is None:
            raise ApiError("max_tokens=0 generates nothing: it needs echo=true or "
                           "prompt_logprobs (prompt scoring)", "max_tokens")
        prompts = _prompts(req.prompt)
        _check_choices(req, len(prompts) > 1)
        api = ApiRequest(prompt=prompts[0], messages=None, max_tokens=req.max_tokens,
                         logprobs=req.logprobs, echo=req.echo,
                         prompts=prompts if len(prompts) > 1 else (), **common)
    else:
        assert isinstance(req, ChatCompletionRequest)
        if req.max_tokens == 0:
            raise ApiError("`max_tokens` is not supported yet: 0 (prompt scoring) on chat "
                           "completions; use /v1/completions", "max_tokens",
                           code="unsupported_field")
        _check_choices(req, False)
        tools = request_tool_plan(req)  # with n > 1 each choice parses its own calls
        max_tokens = req.max_completion_tokens
        api = ApiRequest(
            prompt=None, messages=_messages(req),
            max_tokens=max_tokens if max_tokens is not None else req.max_tokens,
            logprobs=(req.top_logprobs or 0) if req.logprobs else None,
            template_options=_template_options(req), tools=tools,
            chat_echo=_chat_echo(req), **common)
    # range checks now, before any tokenization; an unset max_tokens is resolved later
    api.sampling_params(api.max_tokens if api.max_tokens is not None
                        else max(1, api.sampling.get("min_tokens", 0)))
    return api


MAX_PROMPTS = 256  # prompts in one completions request


def is_prompt_list(body: dict[str, Any]) -> bool:
    """Whether a completions body carries a list of prompts (two or more)."""
    p = body.get("prompt")
    return isinstance(p, list) and len(p) > 1 and all(isinstance(x, str | list) for x in p)


def _check_choices(req: Any, several_prompts: bool) -> None:
    """What n / best_of / several prompts cannot be combined with."""
    n, best_of = req.n, getattr(req, "best_of", None)
    if best_of is not None and best_of < n:
        raise ApiError(f"best_of ({best_of}) must be >= n ({n})", "best_of")
    if best_of is not None and best_of > n and req.stream:
        raise ApiError("best_of > n cannot be streamed (the best samples are known only at "
                       "the end)", "best_of")
    if several_prompts and req.kv_transfer_params is not None:
        raise ApiError("kv_transfer_params is for one prompt (the P/D proxy sends that)",
                       "kv_transfer_params")
    if (n > 1 or several_prompts) and req.return_token_ids:
        raise ApiError("return_token_ids is supported for one prompt with n = 1",
                       "return_token_ids")
    # completions echo (the prompt's text and scores) is per prompt; chat echo (the last
    # message's content) goes in front of every choice, as vLLM
    echo = isinstance(req, CompletionRequest) and req.echo
    if (n > 1 or several_prompts) and (echo or req.prompt_logprobs is not None):
        raise ApiError("echo / prompt_logprobs are supported for one prompt with n = 1",
                       "echo" if echo else "prompt_logprobs")


def _prompts(p: str | list[int] | list[str] | list[list[int]]
             ) -> tuple[str | tuple[int, ...], ...]:
    """The prompts: one (text or token ids), or a list of strings / of token-id lists."""
    if isinstance(p, list) and p and all(isinstance(x, str | list) for x in p):
        if len(p) > MAX_PROMPTS:
            raise ApiError(f"at most {MAX_PROMPTS} prompts per request, got {len(p)}", "prompt")
        for x in p:
            if not x:
                raise ApiError("prompt must not contain an empty prompt", "prompt")
        return tuple(_prompt(x) for x in p)  # type: ignore[arg-type]
    return (_prompt(p),)  # type: ignore[arg-type]  # a str or a list of ints here


def _prompt(p: str | list[int]) -> str | tuple[int, ...]:
    if isinstance(p, str):
        return p
    return tuple(t for t in p if isinstance(t, int))


def _messages(req: ChatCompletionRequest) -> tuple[dict[str, Any], ...]:
    """Messages for the chat template: role, content as text, and `name` when given."""
    out = []
    for m in req.messages:
        msg: dict[str, Any] = {"role": m.role, "content": m.text()}
        if m.name is not None:
            msg["name"] = m.name
        out.append(msg)
    return tuple(out)


def chat_echo_of(body: dict[str, Any]) -> str:
    """vLLM's chat `echo` text of a chat body already validated (the P/D proxy's: P's answer
    starts with it); "" without echo or for a body that does not validate."""
    if not body.get("echo"):
        return ""
    try:  # the model alone: the app validated (and logged ignored fields) already
        req = ChatCompletionRequest.model_validate(
            {k: v for k, v in body.items() if v is not None})
    except ValidationError:
        return ""
    return _chat_echo(req)


def _chat_echo(req: ChatCompletionRequest) -> str:
    """vLLM's chat `echo`: the last message's content when its role is the answer's role
    (the assistant, or with add_generation_prompt=false the last message's own role)."""
    if not req.echo:
        return ""
    last = req.messages[-1]
    role = "assistant" if req.add_generation_prompt else last.role
    return last.text() if last.role == role else ""


def _template_options(req: ChatCompletionRequest) -> dict[str, Any]:
    """Keyword arguments of `apply_chat_template` beyond the messages (empty: its defaults)."""
    opts: dict[str, Any] = dict(req.chat_template_kwargs or {})
    if not req.add_generation_prompt:
        opts["add_generation_prompt"] = False
    if req.continue_final_message:
        opts["continue_final_message"] = True
    return opts
