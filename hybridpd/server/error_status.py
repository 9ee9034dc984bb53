"""The HTTP status of each way a request can fail in the engine.

Owns the one table from `ErrorKind` (engine/protocol.py: what failed) to the HTTP status the
API answers with; the engine never chooses statuses. Knows nothing of response bodies.
"""

from __future__ import annotations

from hybridpd.engine.protocol import ErrorKind

HTTP_STATUS: dict[ErrorKind, int] = {
    ErrorKind.INVALID_REQUEST: 400,
    ErrorKind.DUPLICATE_ID: 409,
    ErrorKind.ABORTED: 499,  # client closed the request (nginx's convention)
    ErrorKind.INTERNAL: 500,
    ErrorKind.TRANSFER_FAILED: 502,  # the upstream (prefill instance) failed us
    ErrorKind.QUEUE_TIMEOUT: 503,  # saturated, never started: another instance may serve it
    ErrorKind.OUTPUT_TIMEOUT: 504,
}


def http_status(kind: ErrorKind) -> int:
    """The status for `kind` (every kind has one: a test checks the table is total)."""
    return HTTP_STATUS[kind]
