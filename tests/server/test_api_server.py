"""The instance API server over real HTTP, with a fake engine in a real engine process."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import threading
import time
from collections.abc import Iterator

import aiohttp
import pytest
import torch
from fakes import REPLY, fake_handoff
from harness import MODEL, start_fake_instance
from http_util import engine_counter, get, parse_sse, post, wait_until

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def base(loop_thread):
    inst = start_fake_instance(loop_thread, delay_s=0.002)
    try:
        yield f"http://127.0.0.1:{inst.port}"
    finally:
        loop_thread.call(inst.stop())


def reply(n: int, start: int = 0) -> str:
    return bytes(REPLY[(start + i) % len(REPLY)] for i in range(n)).decode()


def test_completion_non_stream_honours_request_id(base):
    status, body, headers = post(f"{base}/v1/completions",
                                 {"model": MODEL, "prompt": "hi", "max_tokens": 12},
                                 headers={"X-Request-Id": "my-id-1"})
    assert status == 200, body
    assert body["id"] == "my-id-1" and body["object"] == "text_completion"
    choice = body["choices"][0]
    assert choice["text"] == reply(12) and choice["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 12, "total_tokens": 15}


def test_completion_token_id_prompt(base):
    status, body, _ = post(f"{base}/v1/completions", {"prompt": [[104, 105]], "max_tokens": 3})
    assert status == 200, body
    assert body["usage"]["prompt_tokens"] == 2 and body["choices"][0]["text"] == reply(3)


def test_completion_stream_with_usage(base):
    status, text, headers = post(f"{base}/v1/completions", {
        "prompt": "hi", "max_tokens": 10, "stream": True,
        "stream_options": {"include_usage": True}})
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    events = parse_sse(text)
    assert events[-1] == "[DONE]"
    usage = events[-2]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 10
    chunks = events[:-2]
    assert "".join(c["choices"][0]["text"] for c in chunks) == reply(10)
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


def test_chat_non_stream_and_stream(base):
    msgs = [{"role": "user", "content": "hello"}]
    status, body, _ = post(f"{base}/v1/chat/completions",
                           {"model": MODEL, "messages": msgs, "max_completion_tokens": 7})
    assert status == 200, body
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": reply(7)}
    prompt_len = len(b"<user>hello\n<assistant>")
    assert body["usage"]["prompt_tokens"] == prompt_len
    status, text, _ = post(f"{base}/v1/chat/completions",
                           {"messages": msgs, "max_tokens": 5, "stream": True})
    events = parse_sse(text)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    content = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1])
    assert content == reply(5) and events[-2]["choices"][0]["finish_reason"] == "length"


def test_stop_string_ends_with_stop_and_aborts_engine(base):
    before = engine_counter(base, "aborts")
    status, body, _ = post(f"{base}/v1/completions",
                           {"prompt": "hi", "max_tokens": 200, "stop": ["fox"]})
    assert status == 200, body
    assert body["choices"][0]["text"] == REPLY.decode().split("fox")[0]
    assert body["choices"][0]["finish_reason"] == "stop"
    assert wait_until(lambda: engine_counter(base, "aborts") > before)
    status, text, _ = post(f"{base}/v1/completions",
                           {"prompt": "hi", "max_tokens": 200, "stop": "brown", "stream": True})
    events = parse_sse(text)
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == "Hello world! The quick "
    assert events[-2]["choices"][0]["finish_reason"] == "stop"


def test_stop_token_ids(base):
    status, body, _ = post(f"{base}/v1/completions",
                           {"prompt": "x", "max_tokens": 50, "stop_token_ids": [ord("!")]})
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["choices"][0]["text"] == "Hello world!"


def test_logprobs_shapes(base):
    status, body, _ = post(f"{base}/v1/completions",
                           {"prompt": "hi", "max_tokens": 4, "logprobs": 2})
    lp = body["choices"][0]["logprobs"]
    assert lp["tokens"] == list(reply(4)) and len(lp["token_logprobs"]) == 4
    assert all(isinstance(v, float) for v in lp["token_logprobs"])
    assert all(len(t) == 2 for t in lp["top_logprobs"]) and lp["text_offset"] == [0, 1, 2, 3]
    status, body, _ = post(f"{base}/v1/chat/completions", {
        "messages": [{"role": "user", "content": "x"}], "max_tokens": 3,
        "logprobs": True, "top_logprobs": 3})
    content = body["choices"][0]["logprobs"]["content"]
    assert [c["token"] for c in content] == list(reply(3))
    assert all(len(c["top_logprobs"]) == 3 and "bytes" in c for c in content)
    status, body, _ = post(f"{base}/v1/completions", {"prompt": "hi", "max_tokens": 2})
    assert body["choices"][0]["logprobs"] is None


BAD_REQUESTS = [
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", b'["a list"]', 400, None),
    ("/v1/completions", {"prompt": "x", "max_tokens": "ten"}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "presence_penalty": 3}, 400, "presence_penalty"),
    ("/v1/completions", {"prompt": "x" * 300}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 400}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"prompt": ["a", ""]}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "n": 0}, 400, "n"),
    ("/v1/completions", {"prompt": "x", "echo": "yes"}, 400, "echo"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "echo": 1},
     400, "echo"),
    ("/v1/completions", {"prompt": "x", "frequency_penalty": 2.5}, 400, "frequency_penalty"),
    ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}, 400,
     "stream_options"),
    ("/v1/completions", {"prompt": "x", "model": "other"}, 404, "model"),
    ("/v1/completions", {"prompt": "please REJECT me"}, 400, None),
    ("/v1/completions", {"prompt": [999999]}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, None),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "top_logprobs": 2}, 400, "top_logprobs"),
]


def test_bad_requests_get_openai_errors_while_others_complete(base):
    result: dict = {}

    def long_request():
        result["r"] = post(f"{base}/v1/completions", {"prompt": "hi", "max_tokens": 60})

    t = threading.Thread(target=long_request)
    t.start()
    for path, body, want_status, want_param in BAD_REQUESTS:
        raw = body if isinstance(body, bytes) else None
        status, resp, _ = post(f"{base}{path}", None if raw else body, raw=raw)
        assert status == want_status, (body, resp)
        err = resp["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], resp
        assert err["type"] == "invalid_request_error"
        if want_param is not None:
            assert err["param"] == want_param and want_param in err["message"], resp
    t.join(30)
    status, body, _ = result["r"]
    assert status == 200 and body["choices"][0]["text"] == reply(60)


def test_ignored_fields_at_default_are_accepted(base):
    status, body, _ = post(f"{base}/v1/chat/completions", {
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        "max_tokens": 2, "user": "u1", "frequency_penalty": 0, "presence_penalty": 0.0,
        "logit_bias": {}, "response_format": {"type": "text"}, "temperature": None})
    assert status == 200, body


PROM_LINE = re.compile(
    r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_][a-zA-Z0-9_]*="([^"\\]|\\.)*",?)*\})? '
    r"(-?[0-9.eE+-]+|\+Inf|-Inf|NaN)$"
)


MODEL_LABEL = f'model_name="{MODEL}"'


def parse_prometheus(text: str) -> dict[str, float]:
    """Samples by name and labels, less the `model_name` label (which each must carry)."""
    samples = {}
    for line in text.strip().splitlines():
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            continue
        assert PROM_LINE.match(line), line
        name, value = line.rsplit(" ", 1)
        assert MODEL_LABEL in name, line  # every sample names the served model
        name = re.sub(",?" + re.escape(MODEL_LABEL) + ",?", lambda m: "," * (
            m.group().count(",") == 2), name).replace("{}", "")
        samples[name] = float(value)
    return samples


def test_metrics_is_prometheus_text(base):
    post(f"{base}/v1/completions", {"prompt": "hi", "max_tokens": 3})
    status, text, headers = get(f"{base}/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    s = parse_prometheus(text)
    assert s['hybridpd_requests_total{finish_reason="length"}'] >= 1
    count = s["hybridpd_e2e_request_latency_seconds_count"]
    assert s['hybridpd_e2e_request_latency_seconds_bucket{le="+Inf"}'] == count >= 1
    buckets = [v for k, v in s.items() if k.startswith("hybridpd_time_to_first_token_seconds_b")]
    assert buckets == sorted(buckets) and buckets[-1] >= 1
    assert s["hybridpd_pool_free_blocks"] + s["hybridpd_pool_used_blocks"] == 100
    assert s["hybridpd_engine_added_total"] >= 1 and s["hybridpd_engine_healthy"] == 1
    assert s['hybridpd_request_errors_total{status="400"}'] >= 0
    assert "# TYPE hybridpd_inter_token_latency_seconds histogram" in text


def test_health_models_pool(base):
    status, body, _ = get(f"{base}/health")
    assert status == 200 and body["status"] == "ok"
    status, body, _ = get(f"{base}/v1/models")
    assert body["object"] == "list" and body["data"][0]["id"] == MODEL
    status, body, _ = get(f"{base}/v1/pool")
    assert body["total_blocks"] == body["free_blocks"] + body["used_blocks"] == 100


def test_prefill_role_returns_kv_transfer_params_and_abort_releases(base):
    status, body, _ = post(f"{base}/v1/completions", {
        "prompt": "hi", "max_tokens": 20, "kv_transfer_params": {"do_remote_decode": True}},
        headers={"X-Request-Id": "pd-1"})
    assert status == 200, body
    assert body["choices"][0]["text"] == reply(1)
    assert body["kv_transfer_params"]["request_id"] == "pd-1"
    assert get(f"{base}/v1/pool")[1]["used_blocks"] == 1
    status, body, _ = post(f"{base}/v1/abort", {"request_id": "pd-1"})
    assert status == 200 and body["aborted"] is True
    assert wait_until(lambda: get(f"{base}/v1/pool")[1]["used_blocks"] == 0)
    status, body, _ = post(f"{base}/v1/completions", {
        "prompt": "hi", "max_tokens": 1, "kv_transfer_params": {"do_remote_decode": True}})
    assert body["kv_transfer_params"] is None  # finished on P: nothing to pull


def test_decode_role_reports_transfer_metrics(base):
    status, body, _ = post(f"{base}/v1/completions", {
        "prompt": "hi", "max_tokens": 5,
        "kv_transfer_params": fake_handoff("pd-2", 3)},
        headers={"X-Request-Id": "pd-2"})
    assert status == 200, body
    assert body["choices"][0]["text"] == reply(4, start=1)
    s = parse_prometheus(get(f"{base}/metrics")[1])
    assert s['hybridpd_kv_transfer_outcomes_total{outcome="ok"}'] >= 1
    assert s["hybridpd_kv_transfer_bytes_count"] >= 1
    assert s["hybridpd_kv_transfer_gbps_sum"] > 0


async def _read_two_chunks_then_close(url: str) -> None:
    async with aiohttp.ClientSession() as s:
        body = {"prompt": "hi", "max_tokens": 200, "stream": True}
        async with s.post(url, json=body) as r:
            assert r.status == 200
            await r.content.readuntil(b"\n\n")
            await r.content.readuntil(b"\n\n")
        # leaving the block closes the connection mid-stream


async def _cancel_non_stream(base: str) -> None:
    """Leave a non-streaming request once the engine runs it (not on a timer: a loaded machine
    may not have reached the engine yet)."""
    async with aiohttp.ClientSession() as s:
        async def call() -> None:
            async with s.post(f"{base}/v1/completions",
                              json={"prompt": "hi", "max_tokens": 200}) as r:
                await r.read()

        task = asyncio.ensure_future(call())
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline and not task.done():
            async with s.get(f"{base}/v1/pool") as r:
                if (await r.json())["num_running"] == 1:
                    break
            await asyncio.sleep(0.01)
        assert not task.done(), "the request ended before it could be left"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


@pytest.fixture()
def slow_base(loop_thread):
    inst = start_fake_instance(loop_thread, delay_s=0.02)
    try:
        yield f"http://127.0.0.1:{inst.port}"
    finally:
        loop_thread.call(inst.stop())


def test_client_disconnect_aborts_in_engine(slow_base):
    asyncio.run(_read_two_chunks_then_close(f"{slow_base}/v1/completions"))
    assert wait_until(lambda: engine_counter(slow_base, "aborts") == 1)
    asyncio.run(_cancel_non_stream(slow_base))
    assert wait_until(lambda: engine_counter(slow_base, "aborts") == 2)
    assert get(f"{slow_base}/v1/pool")[1]["num_running"] == 0
    s = parse_prometheus(get(f"{slow_base}/metrics")[1])
    assert s['hybridpd_requests_total{finish_reason="abort"}'] == 2


def test_reused_request_id_in_flight_is_served_under_its_id(slow_base):
    first: dict = {}
    t = threading.Thread(target=lambda: first.setdefault("r", post(
        f"{slow_base}/v1/completions", {"prompt": "hi", "max_tokens": 20},
        headers={"X-Request-Id": "dup"})))
    t.start()
    assert wait_until(lambda: get(f"{slow_base}/v1/pool")[1]["num_running"] == 1)
    status, body, headers = post(f"{slow_base}/v1/completions",
                                 {"prompt": "hi", "max_tokens": 2},
                                 headers={"X-Request-Id": "dup"})
    t.join(30)
    assert status == 200 and body["id"] == "dup" and headers["X-Request-Id"] == "dup", body
    assert body["choices"][0]["text"] == reply(2)
    assert first["r"][0] == 200 and first["r"][1]["choices"][0]["text"] == reply(20)


@contextlib.contextmanager
def captured(logger_name: str) -> Iterator[list[logging.LogRecord]]:
    """Records of one logger (directly: "hybridpd" may not propagate to pytest's handler)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger(logger_name)
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


def test_engine_crash_fails_requests_and_health(loop_thread):
    inst = start_fake_instance(loop_thread, delay_s=0.01)
    url = f"http://127.0.0.1:{inst.port}"
    reason = "engine process died: RuntimeError: fake engine crashed on purpose"
    try:
        with captured("hybridpd.server.engine_client") as records:
            result: dict = {}
            t = threading.Thread(target=lambda: result.setdefault(
                "ok", post(f"{url}/v1/completions", {"prompt": "fine", "max_tokens": 200})))
            t.start()
            status, body, _ = post(f"{url}/v1/completions", {"prompt": "CRASH", "max_tokens": 5})
            t.join(30)
            # in flight when the engine died: 500 with the one-line reason, no traceback
            assert status == 500 and body["error"]["type"] == "server_error"
            assert body["error"]["message"] == reason
            assert result["ok"][0] == 500 and result["ok"][1]["error"]["message"] == reason
            status, body, _ = get(f"{url}/health")
            assert status == 503 and body == {"status": "unhealthy", "reason": reason}
            # arriving while the engine is dead: 503 (try later), same short reason
            for stream in (False, True):
                status, body, _ = post(f"{url}/v1/completions",
                                       {"prompt": "again", "stream": stream})
                assert status == 503 and body["error"]["type"] == "server_error"
                assert body["error"]["message"] == f"engine unavailable: {reason}"
        logged = [r.getMessage() for r in records]
        assert sum("Traceback (most recent call last)" in m for m in logged) == 1, logged
        assert any('fakes.py", line' in m for m in logged)  # the full traceback, in the log
    finally:
        loop_thread.call(inst.stop())


def test_engine_killed_hard_is_noticed(loop_thread):
    inst = start_fake_instance(loop_thread, delay_s=0.01)
    url = f"http://127.0.0.1:{inst.port}"
    try:
        result: dict = {}
        t = threading.Thread(target=lambda: result.setdefault(
            "r", post(f"{url}/v1/completions", {"prompt": "hi", "max_tokens": 200})))
        t.start()
        assert wait_until(lambda: get(f"{url}/v1/pool")[1].get("num_running") == 1)
        os.kill(inst.proc.pid, signal.SIGKILL)  # our own child: no goodbye message
        t.join(30)
        status, body, _ = result["r"]
        assert status == 500 and body["error"]["message"] == (
            "engine process died: exited with code -9")
        assert get(f"{url}/health")[0] == 503
    finally:
        loop_thread.call(inst.stop())
