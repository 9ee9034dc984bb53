"""The OpenAI error shape: `ApiError` (a client-visible 4xx/5xx) and its JSON body.

Owns the error body layout and the error codes other parts act on (`QUEUE_TIMEOUT_CODE`).
Knows nothing of HTTP frameworks.
"""

from __future__ import annotations

from typing import Any

# error code of a 503 for a request that never started (its queue deadline passed): the one
# answer after which the P/D proxy may send the request to another instance
QUEUE_TIMEOUT_CODE = "queue_timeout"


def error_body(message: str, err_type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """`{"error": {message, type, param, code}}`, as OpenAI answers."""
    return {"error": {"message": message, "type": err_type, "param": param, "code": code}}


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
        return error_body(self.message, self.err_type, self.param, self.code)
