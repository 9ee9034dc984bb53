"""Validating a decoded JSON body into a request model, with OpenAI-shaped errors.

Owns: null meaning "not given", pydantic errors turned into one `ApiError` naming the field,
unknown fields accepted and logged (as vLLM does), the declared-but-unsupported check
(`support.py`) and the cross-field rules (stream_options needs stream, top_logprobs needs
logprobs, continue_final_message excludes add_generation_prompt). Used by the instances and
the proxy, so both refuse the same requests with the same messages. Knows nothing of HTTP.
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import ValidationError

from hybridpd.openai.errors import ApiError
from hybridpd.openai.requests import ChatCompletionRequest, CompletionRequest
from hybridpd.openai.support import check_supported

log = logging.getLogger(__name__)
IGNORED_FIELDS_MESSAGE = "The following fields were present in the request but ignored: %s"
Request = CompletionRequest | ChatCompletionRequest


def validate_request(body: Any, chat: bool) -> Request:
    """The request model of a decoded body; ApiError (400, naming the field) if invalid."""
    if not isinstance(body, dict):
        raise ApiError("request body must be a JSON object")
    body = {k: v for k, v in body.items() if v is not None}  # null means "not given"
    cls: type[Request] = ChatCompletionRequest if chat else CompletionRequest
    req = _validate(cls, body)
    if req.model_extra:
        log.warning(IGNORED_FIELDS_MESSAGE, set(req.model_extra))
    check_supported(req)
    if req.stream_options is not None and not req.stream:
        raise ApiError("stream_options is only allowed with stream=true", "stream_options")
    if isinstance(req, ChatCompletionRequest):
        if req.top_logprobs is not None and not req.logprobs:
            raise ApiError("top_logprobs requires logprobs=true", "top_logprobs")
        if req.continue_final_message and req.add_generation_prompt:
            raise ApiError("continue_final_message and add_generation_prompt cannot both be "
                           "true", "continue_final_message")
        for i, m in enumerate(req.messages):
            if m.content is None and m.role != "assistant":  # OpenAI: assistant may omit it
                raise ApiError(f"messages[{i}].content must be a string", "messages")
    return req


def _validate(cls: type[Any], body: dict[str, Any]) -> Any:
    try:
        return cls.model_validate(body)
    except ValidationError as exc:
        raise validation_error(exc) from None


def validation_error(exc: ValidationError) -> ApiError:
    """The first pydantic error as an ApiError naming the top-level field."""
    errors = exc.errors(include_url=False)
    # a union reports each member's failure: our own validators' messages say most
    err = next((e for e in errors if e["type"] == "value_error"), errors[0])
    loc = [str(p) for p in err["loc"]]
    param = loc[0] if loc else None
    msg = str(err["msg"]).removeprefix("Value error, ")
    if err["type"] == "missing":
        msg = "is required"
    elif err["type"] == "string_unicode":
        msg = "is not valid Unicode (a lone surrogate)"
    elif err["type"] == "extra_forbidden":
        msg = "unknown field"
    where = ".".join(p for p in loc if not _is_type_tag(p))
    if not where or (msg.startswith(where) and where == param):  # our message names it
        return ApiError(msg, param)
    return ApiError(f"{where}: {msg}", param)


def _is_type_tag(part: str) -> bool:
    """Union members appear in pydantic locations by type name ("str", "list[int]")."""
    return part in ("str", "int", "float", "bool") or "[" in part or part.startswith(
        ("function-", "literal[", "Named"))
