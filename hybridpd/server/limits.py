"""Request bounds of one instance, sized from the model's context (not a flat cap).

Owns the arithmetic, done once at start-up:
* prompt text: at most `max_model_len × max bytes per token` UTF-8 bytes (the tokenizer's
  `max_token_bytes()`: its longest token, ×4 when a normalizer may shrink text) — a longer
  text cannot fit the context whatever it tokenizes to, so it is refused before tokenising;
* body: room for that text at the worst JSON escaping (`\\u00XX`, 6 bytes per byte) or for
  `max_model_len` token ids, plus `OTHER_FIELDS_BYTES` for everything else in the request;
* JSON values in a body: `VALUES_PER_TOKEN × max_model_len + EXTRA_VALUES` (a token id is one
  value, a chat message three; plus stop ids, sampling fields...).
A tokenizer without `max_token_bytes` (test doubles) leaves the text unbounded here and the
body at `httpkit.bodies.DEFAULT_MAX_BYTES`. Knows nothing of HTTP or requests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hybridpd.httpkit.bodies import DEFAULT_MAX_BYTES, DEFAULT_TIMEOUT_S, BodyLimits

JSON_ESCAPE_FACTOR = 6
OTHER_FIELDS_BYTES = 1024 * 1024
VALUES_PER_TOKEN = 4
EXTRA_VALUES = 65536


@dataclass(frozen=True)
class RequestLimits:
    max_prompt_bytes: int | None  # UTF-8 bytes of a text prompt or of a rendered chat
    body: BodyLimits


def max_token_bytes_of(tokenizer: Any) -> int | None:
    """The tokenizer's bound on bytes per token, or None when it cannot tell."""
    fn = getattr(tokenizer, "max_token_bytes", None)
    return int(fn()) if callable(fn) else None


def max_values_for(max_model_len: int) -> int:
    """JSON values a request body may hold for this context."""
    return VALUES_PER_TOKEN * max_model_len + EXTRA_VALUES


def request_limits(
    max_model_len: int, vocab_size: int | None, max_token_bytes: int | None,
    body_timeout_s: float = DEFAULT_TIMEOUT_S, max_body_bytes: int | None = None,
) -> RequestLimits:
    """Bounds for a model with this context; `max_body_bytes` overrides the computed size."""
    max_prompt = None if max_token_bytes is None else max_model_len * max_token_bytes
    if max_body_bytes is None:
        if max_prompt is None:
            max_body_bytes = DEFAULT_MAX_BYTES
        else:
            id_bytes = len(str(max(vocab_size or 0, 1))) + 2  # "123456, "
            payload = max(max_prompt * JSON_ESCAPE_FACTOR, max_model_len * id_bytes)
            max_body_bytes = payload + OTHER_FIELDS_BYTES
    body = BodyLimits(max_bytes=max_body_bytes, timeout_s=body_timeout_s,
                      max_values=max_values_for(max_model_len))
    return RequestLimits(max_prompt_bytes=max_prompt, body=body)
