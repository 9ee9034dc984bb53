"""Unit tests of request parsing, Prometheus rendering and the serve CLI (no processes)."""

from __future__ import annotations

import argparse
import logging
import re

import pytest
import torch

from hybridpd.engine.args import EngineArgs
from hybridpd.httpkit.logs import configure_logging
from hybridpd.httpkit.metrics import Registry
from hybridpd.proxy import cli as proxy_cli
from hybridpd.server.cli import add_arguments, engine_args_from, parse_bytes
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


@pytest.mark.parametrize("body,param", [
    ({"prompt": "x", "top_p": 1.5}, "top_p"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "x", "min_tokens": 5, "max_tokens": 4}, "min_tokens"),
    ({"prompt": "x", "stream": True, "stream_options": {"include_usage": "yes"}},
     "stream_options"),
    ({"prompt": "x", "stream": True, "stream_options": {"continuous_usage_stats": "yes"}},
     "stream_options"),
])
def test_sampling_range_errors_name_their_param_at_parse_time(body, param):
    with pytest.raises(ApiError) as info:
        parse_request(body, Endpoint.COMPLETIONS)
    assert info.value.param == param and param in info.value.message


def test_min_tokens_is_checked_against_the_resolved_max_tokens():
    r = parse_request({"prompt": "x", "min_tokens": 20}, Endpoint.COMPLETIONS)
    assert r.sampling_params(20).min_tokens == 20
    with pytest.raises(ApiError) as info:
        r.sampling_params(16)  # e.g. the completions default
    assert info.value.param == "min_tokens"


def test_chat_validates_max_tokens_also_when_max_completion_tokens_is_given():
    msgs = [{"role": "user", "content": "x"}]
    for bad in ("x", 0, -3):
        with pytest.raises(ApiError) as info:
            parse_request({"messages": msgs, "max_completion_tokens": 2, "max_tokens": bad},
                          Endpoint.CHAT)
        assert info.value.param == "max_tokens"


@pytest.mark.parametrize("endpoint,body,param", [
    (Endpoint.COMPLETIONS, {"prompt": "a\ud800b"}, "prompt"),
    (Endpoint.COMPLETIONS, {"prompt": ["\udfff"]}, "prompt"),
    (Endpoint.COMPLETIONS, {"prompt": "ok", "stop": ["x", "\ud800"]}, "stop"),
    (Endpoint.CHAT, {"messages": [{"role": "user", "content": "\ud83d"}]}, "messages"),
    (Endpoint.CHAT, {"messages": [{"role": "user\ud800", "content": "x"}]}, "messages"),
    (Endpoint.CHAT, {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "\ud800"}]}]}, "messages"),
])
def test_lone_surrogates_are_invalid_requests(endpoint, body, param):
    with pytest.raises(ApiError) as info:  # "\ud800" in Python source: a lone surrogate
        parse_request(body, endpoint)
    assert info.value.param == param and info.value.status == 400
    assert "surrogate" in info.value.message


def test_valid_non_ascii_text_is_accepted():
    r = parse_request({"prompt": "é日本 \U0001f600", "stop": ["日"]}, Endpoint.COMPLETIONS)
    assert r.prompt == "é日本 \U0001f600" and r.sampling["stop"] == ("日",)


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


@pytest.mark.parametrize("endpoint,base", [
    (Endpoint.COMPLETIONS, {"prompt": "x"}),
    (Endpoint.CHAT, {"messages": [{"role": "user", "content": "x"}]}),
])
def test_return_token_ids_and_ignore_eos_are_accepted(endpoint, base):
    r = parse_request({**base, "return_token_ids": True, "ignore_eos": True}, endpoint)
    assert r.return_token_ids is True and r.sampling_params(3).ignore_eos is True
    r = parse_request(base, endpoint)
    assert r.return_token_ids is False and r.sampling_params(3).ignore_eos is False
    with pytest.raises(ApiError) as info:
        parse_request({**base, "return_token_ids": "yes"}, endpoint)
    assert info.value.param == "return_token_ids"


def _serve_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(["--model", "/m", *argv])


def test_serve_transfer_options_and_side_channel_host():
    ea = engine_args_from(_serve_args("--lease-s", "3", "--transfer-timeout-s", "2.5",
                                      "--kv-handshake-timeout-s", "1.5", "--host", "10.1.2.3"),
                          "/m")
    assert (ea.lease_s, ea.transfer_timeout_s, ea.handshake_timeout_s) == (3.0, 2.5, 1.5)
    assert ea.side_channel_host == "10.1.2.3"
    for wildcard in ("0.0.0.0", "::"):
        assert engine_args_from(_serve_args("--host", wildcard), "/m").side_channel_host == \
            "127.0.0.1"
    explicit = _serve_args("--host", "0.0.0.0", "--side-channel-host", "192.168.0.7")
    assert engine_args_from(explicit, "/m").side_channel_host == "192.168.0.7"
    defaults = engine_args_from(_serve_args(), "/m")
    plain = EngineArgs(model_dir="/m")
    assert (defaults.lease_s, defaults.transfer_timeout_s, defaults.handshake_timeout_s) == (
        plain.lease_s, plain.transfer_timeout_s, plain.handshake_timeout_s)
    assert _serve_args().log_level == "info"
    assert _serve_args("--log-level", "debug").log_level == "debug"


def test_proxy_cli_log_level():
    parser = argparse.ArgumentParser()
    proxy_cli.add_arguments(parser)
    args = parser.parse_args(["--prefill", "http://p", "--decode", "http://d"])
    assert args.log_level == "info"
    with pytest.raises(SystemExit):
        parser.parse_args(["--prefill", "p", "--decode", "d", "--log-level", "loud"])


def test_configure_logging_is_idempotent_and_compact(capsys):
    logger = logging.getLogger("hybridpd")
    saved = (logger.level, list(logger.handlers), logger.propagate)
    try:
        configure_logging("warning")
        configure_logging("info")
        ours = [h for h in logger.handlers if h not in saved[1]]
        assert len(ours) == 1 and logger.level == logging.INFO
        logging.getLogger("hybridpd.transfer").info("kv transfer r1: ok")
        logging.getLogger("hybridpd.transfer").debug("not shown")
        err = capsys.readouterr().err
        assert re.search(r"^\d{4}-\d\d-\d\d [\d:,]+ INFO hybridpd.transfer: kv transfer r1: ok$",
                         err, re.M), err
        assert "not shown" not in err
    finally:
        for h in logger.handlers[:]:
            if h not in saved[1]:
                logger.removeHandler(h)
        logger.setLevel(saved[0])
        logger.propagate = saved[2]
