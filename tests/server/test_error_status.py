"""Engine error kinds map to HTTP statuses only in the API (server/error_status.py)."""

from __future__ import annotations

from hybridpd.engine.protocol import ErrorKind
from hybridpd.server.error_status import HTTP_STATUS, http_status


def test_every_error_kind_has_a_status() -> None:
    assert set(HTTP_STATUS) == set(ErrorKind)
    assert all(400 <= http_status(k) < 600 for k in ErrorKind)


def test_statuses_say_whose_fault_it_is() -> None:
    assert http_status(ErrorKind.INVALID_REQUEST) == 400
    assert http_status(ErrorKind.DUPLICATE_ID) == 409
    assert http_status(ErrorKind.TRANSFER_FAILED) == 502
    assert http_status(ErrorKind.QUEUE_TIMEOUT) == 503  # the proxy may try another instance
    assert http_status(ErrorKind.OUTPUT_TIMEOUT) == 504
