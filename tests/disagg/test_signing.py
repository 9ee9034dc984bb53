"""Hand-off signatures: valid ones pass, any change to any field or another secret fails."""

from __future__ import annotations

import pytest

from hybridpd.disagg.signing import sign, verify

PARAMS = {"request_id": "r", "engine_id": "p", "side_channel": "127.0.0.1:5600",
          "tp_size": 1, "block_ids": [[3, 4], [9]], "num_tokens": 30, "handoff": "first-token",
          "protocol_version": 1, "first_token": 7, "transfer_id": "t"}


def test_signed_params_verify():
    verify(sign(PARAMS, "s3cret"), "s3cret")


@pytest.mark.parametrize(("field", "value"), [
    ("block_ids", [[1, 2], [9]]), ("side_channel", "10.0.0.9:22"), ("first_token", 8),
    ("num_tokens", 31), ("transfer_id", "u"),
])
def test_any_altered_field_fails(field, value):
    forged = {**sign(PARAMS, "s3cret"), field: value}
    with pytest.raises(ValueError, match="signature is invalid"):
        verify(forged, "s3cret")


def test_unsigned_or_other_secret_fails():
    with pytest.raises(ValueError, match="not signed"):
        verify(dict(PARAMS), "s3cret")
    with pytest.raises(ValueError, match="invalid"):
        verify(sign(PARAMS, "other"), "s3cret")
