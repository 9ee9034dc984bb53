"""Fields declared in the request models that the engine does not support yet: ONE table.

`NOT_SUPPORTED_YET` maps a field name to a predicate that is true when the request's value is
a no-op (the field's default, or a value that asks for nothing): any other value is refused
with a 400 naming the field (`` `echo` is not supported yet``). Whoever adds a
feature to the engine removes its entry here and maps the field in `sampling.py`.
Knows nothing of HTTP or engines.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hybridpd.openai.errors import ApiError

NOT_SUPPORTED_YET: dict[str, Callable[[Any], bool]] = {
    "max_completion_tokens": lambda v: v != 0,
    "suffix": lambda v: not v,
    "store": lambda v: not v,
    "service_tier": lambda v: v in (None, "auto", "default"),
    "modalities": lambda v: v in (None, ["text"]),
}


# what exactly is unsupported, where the field itself is (e.g. one prompt is fine)
DETAILS = {"max_completion_tokens": "0 (prompt scoring: use /v1/completions)"}


def check_supported(request: Any) -> None:
    """ApiError (400, naming the field) for the first declared-but-unsupported field used."""
    for name, is_noop in NOT_SUPPORTED_YET.items():
        if name in type(request).model_fields and not is_noop(getattr(request, name)):
            detail = f" ({name}: {DETAILS[name]})" if name in DETAILS else ""
            raise ApiError(f"`{name}` is not supported yet{detail}", name,
                           code="unsupported_field")
