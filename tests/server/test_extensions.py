"""The `return_token_ids` and `kv_transfer_stats` extensions of one instance, over real HTTP.

Token ids must be exact: in a stream, the chunks' `token_ids` concatenate to every generated
id, including ids whose text the detokenizer (split UTF-8) or the stop matcher holds back.
"""

from __future__ import annotations

import pytest
import torch
from fakes import BOS, REPLY, REPLY_UTF8, TRANSFER_STATS, fake_handoff
from harness import start_fake_instance
from http_util import parse_sse, post

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def base(loop_thread):
    inst = start_fake_instance(loop_thread, delay_s=0.001)
    try:
        yield f"http://127.0.0.1:{inst.port}"
    finally:
        loop_thread.call(inst.stop())


def ids_of(events: list) -> list[int]:
    chunks = [e for e in events if e != "[DONE]" and e["choices"]]
    return [t for c in chunks for t in c["choices"][0]["token_ids"]]


def text_of(events: list) -> str:
    return "".join(e["choices"][0]["text"] for e in events if e != "[DONE]" and e["choices"])


def test_non_stream_token_ids_are_exact_including_held_back_bytes(base):
    status, body, _ = post(f"{base}/v1/completions",
                           {"prompt": "UTF8", "max_tokens": 8, "return_token_ids": True})
    assert status == 200, body
    assert body["choices"][0]["token_ids"] == list(REPLY_UTF8[:8])
    assert body["prompt_token_ids"] == [BOS, *b"UTF8"]
    assert body["choices"][0]["text"] == REPLY_UTF8[:8].decode()
    assert "kv_transfer_stats" not in body  # no transfer on a co-located request
    status, body, _ = post(f"{base}/v1/completions", {"prompt": "UTF8", "max_tokens": 8})
    assert "token_ids" not in body["choices"][0] and "prompt_token_ids" not in body


def test_stream_token_ids_concatenate_exactly(base):
    n = 10  # "é日本 ok " is 2 + 3 + 3 + 4 bytes: several tokens produce no text
    status, text, _ = post(f"{base}/v1/completions", {
        "prompt": "UTF8", "max_tokens": n, "stream": True, "return_token_ids": True,
        "stream_options": {"include_usage": True}})
    assert status == 200
    events = parse_sse(text)
    assert ids_of(events) == list(REPLY_UTF8[:n])
    assert text_of(events) == REPLY_UTF8[:n].decode()
    chunks = [e for e in events[:-1] if e["choices"]]
    assert any(c["choices"][0]["text"] == "" and c["choices"][0]["token_ids"] for c in chunks)
    assert chunks[0]["prompt_token_ids"] == [BOS, *b"UTF8"]
    assert all("prompt_token_ids" not in c for c in chunks[1:])
    assert events[-2]["usage"]["completion_tokens"] == n


def test_stream_without_the_extension_has_no_ids_and_no_empty_chunks(base):
    status, text, _ = post(f"{base}/v1/completions",
                           {"prompt": "UTF8", "max_tokens": 10, "stream": True})
    chunks = parse_sse(text)[:-1]
    assert all("token_ids" not in c["choices"][0] for c in chunks)
    assert all(c["choices"][0]["text"] or c["choices"][0]["finish_reason"] for c in chunks)


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_keeps_every_generated_id(base, stream):
    status, resp, _ = post(f"{base}/v1/completions", {
        "prompt": "hi", "max_tokens": 30, "stop": ["wor"], "stream": stream,
        "return_token_ids": True})
    assert status == 200
    events = parse_sse(resp) if stream else [resp]
    assert text_of(events) == "Hello "
    assert ids_of(events) == list(b"Hello wor")  # "wor" was generated, then cut from the text


def test_chat_token_ids_stream_and_not(base):
    msgs = [{"role": "user", "content": "UTF8"}]
    status, body, _ = post(f"{base}/v1/chat/completions",
                           {"messages": msgs, "max_tokens": 8, "return_token_ids": True})
    assert status == 200 and body["choices"][0]["token_ids"] == list(REPLY_UTF8[:8])
    assert body["prompt_token_ids"] == list(b"<user>UTF8\n<assistant>")
    status, text, _ = post(f"{base}/v1/chat/completions", {
        "messages": msgs, "max_tokens": 8, "return_token_ids": True, "stream": True})
    events = parse_sse(text)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert events[0]["prompt_token_ids"] == list(b"<user>UTF8\n<assistant>")
    assert ids_of(events) == list(REPLY_UTF8[:8])
    content = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1])
    assert content == REPLY_UTF8[:8].decode()


def _decode_leg(rid: str, **kw) -> dict:
    kv = fake_handoff(rid, 3)
    return {"prompt": "hi", "max_tokens": 6, "kv_transfer_params": kv, **kw}


def test_decode_request_reports_kv_transfer_stats(base):
    status, body, _ = post(f"{base}/v1/completions", _decode_leg("xs-1", return_token_ids=True),
                           headers={"X-Request-Id": "xs-1"})
    assert status == 200, body
    assert body["kv_transfer_stats"] == TRANSFER_STATS
    assert body["choices"][0]["token_ids"] == list(REPLY[1:6])  # D's own tokens only
    status, text, _ = post(f"{base}/v1/completions", _decode_leg("xs-2", stream=True),
                           headers={"X-Request-Id": "xs-2"})
    chunks = parse_sse(text)[:-1]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["kv_transfer_stats"] == TRANSFER_STATS
    assert all("kv_transfer_stats" not in c for c in chunks[:-1])
    status, text, _ = post(f"{base}/v1/chat/completions", {
        "messages": [{"role": "user", "content": "x"}], "max_tokens": 3, "stream": True})
    assert all("kv_transfer_stats" not in c for c in parse_sse(text)[:-1])
