"""From a request model to `SamplingParams` keyword arguments: ONE function.

`sampling_kwargs` maps every supported sampling field (other than `max_tokens` and
`logprobs`, resolved once the prompt is known) to the engine's name and type; fields left
out of the request keep `SamplingParams`' defaults. A helper adding engine support for a field
removes it from `support.NOT_SUPPORTED_YET` and maps it here. Knows nothing of HTTP.
"""

from __future__ import annotations

from typing import Any

from hybridpd.openai.requests import SamplingFields
from hybridpd.openai.structured import request_structured


def sampling_kwargs(req: SamplingFields) -> dict[str, Any]:
    """SamplingParams fields of `req` other than max_tokens and logprobs."""
    out: dict[str, Any] = {}
    for name in ("temperature", "top_p", "top_k", "seed", "min_tokens", "presence_penalty",
                 "frequency_penalty", "repetition_penalty", "min_p"):
        value = getattr(req, name)
        if value is not None:
            out[name] = value
    stop = req.stop
    out["stop"] = (stop,) if isinstance(stop, str) else tuple(stop or ())
    out["stop_token_ids"] = tuple(req.stop_token_ids or ())
    out["ignore_eos"] = req.ignore_eos
    if req.logit_bias:  # JSON keys are strings: SamplingParams reads them as token ids
        out["logit_bias"] = tuple(req.logit_bias.items())
    if req.allowed_token_ids is not None:
        out["allowed_token_ids"] = tuple(req.allowed_token_ids)
    # bad_words are text: the instance tokenizes them (ApiRequest.bad_words)
    structured = request_structured(req)  # response_format, guided_*, tool_choice
    if structured is not None:
        out["structured"] = structured
    if req.n != 1:
        out["n"] = req.n
    best_of = getattr(req, "best_of", None)  # completions only
    if best_of is not None and best_of != req.n:
        out["best_of"] = best_of
    return out
