"""Unit tests of request parsing, Prometheus rendering and the serve CLI (no processes)."""

from __future__ import annotations

import argparse

import pytest
import torch

from hybridpd.server.cli import add_arguments, engine_args_from, parse_bytes
from hybridpd.server.metrics import Registry
from hybridpd.server.protocol import ApiError, Endpoint, parse_request

torch.set_num_threads(1)


def test_prompt_forms_and_defaults():
    assert parse_request({"prompt": "hi"}, Endpoint.COMPLETIONS).prompt == "hi"
    assert parse_request({"prompt": [1, 2]}, Endpoint.COMPLETIONS).prompt == (1, 2)
    assert parse_request({"prompt": [[1, 2]]}, Endpoint.COMPLETIONS).prompt == (1, 2)
    assert parse_request({"prompt": ["hi"]}, Endpoint.COMPLETIONS).prompt == "hi"
    r = parse_request({"prompt": "hi", "temperature": None, "stop": "x"}, Endpoint.COMPLETIONS)
    assert r.max_tokens is None and r.sampling["stop"] == ("x",) and "temperature" not in r.sampling
    p = r.sampling_params(5)
    assert p.max_tokens == 5 and p.stop == ("x",)


def test_chat_token_limits_and_logprobs():
    msgs = [{"role": "user", "content": "x"}]
    r = parse_request({"messages": msgs, "max_tokens": 9, "max_completion_tokens": 4,
                       "logprobs": True, "top_logprobs": 3}, Endpoint.CHAT)
    assert r.max_tokens == 4 and r.logprobs == 3
    assert parse_request({"messages": msgs, "logprobs": True}, Endpoint.CHAT).logprobs == 0
    assert parse_request({"messages": msgs}, Endpoint.CHAT).logprobs is None


@pytest.mark.parametrize("body,param", [
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "max_tokens": True}, "max_tokens"),
    ({"prompt": "x", "stop": [""]}, "stop"),
    ({"prompt": "x", "stop_token_ids": [-1]}, "stop_token_ids"),
    ({"prompt": "x", "logprobs": 21}, "logprobs"),
    ({"prompt": "x", "kv_transfer_params": "yes"}, "kv_transfer_params"),
    ({"prompt": "x", "stream": "yes"}, "stream"),
    ({"prompt": "x", "stream": True, "stream_options": {"bogus": 1}}, "stream_options"),
    ({"prompt": [1, -2]}, "prompt"),
    ({"prompt": "x", "temperature": float("nan")}, "temperature"),
])
def test_invalid_fields_name_their_param(body, param):
    with pytest.raises(ApiError) as info:
        parse_request(body, Endpoint.COMPLETIONS)
    assert info.value.param == param and info.value.status == 400
    assert info.value.body()["error"]["type"] == "invalid_request_error"


def test_sampling_range_errors_become_api_errors():
    r = parse_request({"prompt": "x", "top_p": 1.5}, Endpoint.COMPLETIONS)
    with pytest.raises(ApiError, match="top_p"):
        r.sampling_params(4)


def test_histogram_buckets_are_cumulative_and_labels_escaped():
    reg = Registry()
    h = reg.histogram("lat_seconds", "Latency.", buckets=(0.1, 1.0))
    for v in (0.05, 0.5, 0.7, 3.0):
        h.observe(v, {"path": 'a"b'})
    c = reg.counter("reqs_total", "Requests.")
    c.inc(2)
    with pytest.raises(ValueError):
        c.inc(-1)
    text = reg.render()
    assert 'lat_seconds_bucket{path="a\\"b",le="0.1"} 1' in text
    assert 'lat_seconds_bucket{path="a\\"b",le="1"} 3' in text
    assert 'lat_seconds_bucket{path="a\\"b",le="+Inf"} 4' in text
    assert 'lat_seconds_sum{path="a\\"b"} 4.25' in text
    assert "reqs_total 2" in text and "# TYPE lat_seconds histogram" in text
    with pytest.raises(ValueError):
        reg.counter("reqs_total", "again")


def test_serve_cli_options_become_engine_args():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--model", "/m", "--role", "decode", "--handoff", "n-1",
                              "--cache-memory", "2GiB", "--tp", "2", "--side-channel-port",
                              "5600", "--on-transfer-failure", "fail"])
    ea = engine_args_from(args, "/m")
    assert ea.role.value == "decode" and ea.handoff.value == "n-1"
    assert ea.cache_memory == 2 * 1024**3 and ea.tp_size == 2 and ea.side_channel_port == 5600
    assert ea.on_transfer_failure.value == "fail"
    assert parse_bytes("512MiB") == 512 * 1024**2 and parse_bytes("1000") == 1000
    with pytest.raises(argparse.ArgumentTypeError):
        parse_bytes("lots")
