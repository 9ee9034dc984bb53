"""Bounded JSON bodies: depth, value count, malformed input -> BodyError (a 400), never a
RecursionError; large bodies are judged in the helper process with the same verdicts."""

from __future__ import annotations

import asyncio
import json

import pytest

from hybridpd.httpkit.bodies import (
    OFF_LOOP_BYTES,
    BodyError,
    BodyLimits,
    decode_bounded,
    decode_json,
    inspect_json,
)

LIMITS = BodyLimits(max_depth=8, max_values=1000)


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


@pytest.mark.parametrize("depth", [9, 50, 100_000])
def test_too_deep_is_a_body_error_whatever_the_depth(depth):
    with pytest.raises(BodyError, match="nested deeper than 8") as err:
        decode_bounded(nested(depth), LIMITS)
    assert err.value.status == 400
    assert inspect_json(nested(depth), 8, 1000) == err.value.message


def test_depth_at_the_limit_and_ordinary_bodies_decode():
    assert decode_bounded(nested(8), LIMITS) is not None
    body = {"prompt": [1, 2, 3], "stop": ["a"], "kv_transfer_params": {"x": {"y": [1]}}}
    assert decode_bounded(json.dumps(body).encode(), LIMITS) == body
    assert inspect_json(json.dumps(body).encode(), 8, 1000) is None


def test_too_many_values_is_refused_but_commas_inside_strings_are_not_values():
    with pytest.raises(BodyError, match="more than 1000 values"):
        decode_bounded(json.dumps({"prompt": list(range(2000))}).encode(), LIMITS)
    text = {"prompt": "," * 5000}  # 5000 commas, 2 values
    assert decode_bounded(json.dumps(text).encode(), LIMITS) == text


@pytest.mark.parametrize("raw", [b"{", b'{"a": }', b"\xff\xfe\x00", b"[1, 2"])
def test_malformed_json_is_a_400(raw):
    with pytest.raises(BodyError, match="malformed JSON") as err:
        decode_bounded(raw, LIMITS)
    assert err.value.status == 400


def test_large_bodies_get_the_same_verdicts_from_the_helper_process():
    big_ok = json.dumps({"prompt": "x" * (2 * OFF_LOOP_BYTES)}).encode()
    big_many = json.dumps({"prompt": [7] * OFF_LOOP_BYTES}).encode()
    big_deep = b'{"p": "' + b"x" * OFF_LOOP_BYTES + b'", "q": ' + nested(40) + b"}"
    assert asyncio.run(decode_json(big_ok, LIMITS))["prompt"] == "x" * (2 * OFF_LOOP_BYTES)
    with pytest.raises(BodyError, match="more than 1000 values"):
        asyncio.run(decode_json(big_many, LIMITS))
    with pytest.raises(BodyError, match="nested deeper than 8"):
        asyncio.run(decode_json(big_deep, LIMITS))
