"""The P/D proxy over real HTTP: two fake prefill and two fake decode instances."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading

import aiohttp
import pytest
import torch
from fakes import BOS, REPLY, REPLY_UTF8, TRANSFER_STATS
from harness import MODEL, LoopThread, start_fake_instance
from http_util import engine_counter, get, parse_sse, post, wait_until

from hybridpd.httpkit.site import start_site
from hybridpd.openai.parse import IGNORED_FIELDS_MESSAGE
from hybridpd.openai.responses import (
    ChatCompletionChunk,
    ChatCompletionResponse,
    CompletionResponse,
    ErrorResponse,
)
from hybridpd.proxy.app import build_app

torch.set_num_threads(1)
HEALTH_INTERVAL_S = 0.2


def reply(n: int) -> str:
    return bytes(REPLY[i % len(REPLY)] for i in range(n)).decode()


def dead_url() -> str:
    """A loopback URL nobody listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


class Deployment:
    def __init__(self, lt: LoopThread) -> None:
        self.lt, self.instances, self.runners = lt, [], []
        self.p_urls: list[str] = []
        self.d_urls: list[str] = []

    def add(self, role: str, delay_s: float) -> str:
        engine_id = f"{role}{len(self.instances)}"
        inst = start_fake_instance(self.lt, delay_s=delay_s, engine_id=engine_id, role=role)
        self.instances.append(inst)
        url = f"http://127.0.0.1:{inst.port}"
        (self.p_urls if role == "prefill" else self.d_urls).append(url)
        return url

    def proxy(self, p_urls: list[str], d_urls: list[str], routing: str = "round-robin") -> str:
        app = build_app(p_urls, d_urls, routing, HEALTH_INTERVAL_S)
        runner, port = self.lt.call(start_site(app, "127.0.0.1", 0))
        self.runners.append(runner)
        return f"http://127.0.0.1:{port}"

    def close(self) -> None:
        for runner in self.runners:
            self.lt.call(runner.cleanup())
        for inst in self.instances:
            self.lt.call(inst.stop())


@pytest.fixture(scope="module")
def dep():
    lt = LoopThread()
    d = Deployment(lt)
    try:
        for role in ("prefill", "prefill", "decode", "decode"):
            d.add(role, delay_s=0.003)
        d.main = d.proxy(d.p_urls, d.d_urls)
        yield d
    finally:
        d.close()
        lt.close()


def total(urls: list[str], counter: str) -> float:
    return sum(engine_counter(u, counter) for u in urls)


def test_non_stream_completion_same_request_id_on_both_legs(dep):
    before_p, before_d = total(dep.p_urls, "added"), total(dep.d_urls, "remote_prefills")
    status, body, headers = post(f"{dep.main}/v1/completions",
                                 {"model": MODEL, "prompt": "hi", "max_tokens": 9},
                                 headers={"X-Request-Id": "rid-same"})
    assert status == 200, body
    # the fake D refuses kv params whose request id differs from its own request id
    assert body["id"] == "rid-same" and headers.get("X-Request-Id") == "rid-same", headers
    assert body["choices"][0]["text"] == reply(9)
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 9, "total_tokens": 12}
    assert "kv_transfer_params" not in body
    assert total(dep.p_urls, "added") == before_p + 1
    assert total(dep.d_urls, "remote_prefills") == before_d + 1


def test_stream_completion_first_token_then_decode(dep):
    status, text, _ = post(f"{dep.main}/v1/completions", {
        "prompt": "hi", "max_tokens": 12, "stream": True, "logprobs": 1,
        "stream_options": {"include_usage": True}})
    assert status == 200
    events = parse_sse(text)
    assert events[-1] == "[DONE]"
    assert events[0]["choices"][0]["text"] == reply(1)  # P's first token, sent on its own
    assert events[-2]["usage"]["completion_tokens"] == 12 and events[-2]["choices"] == []
    chunks = events[:-2]
    assert "".join(c["choices"][0]["text"] for c in chunks) == reply(12)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    offsets = [o for c in chunks for o in c["choices"][0]["logprobs"]["text_offset"]]
    assert offsets == list(range(12))


def test_chat_stream_and_non_stream(dep):
    msgs = [{"role": "user", "content": "hello"}]
    status, body, _ = post(f"{dep.main}/v1/chat/completions",
                           {"messages": msgs, "max_tokens": 6, "logprobs": True,
                            "top_logprobs": 1})
    assert status == 200, body
    assert body["choices"][0]["message"]["content"] == reply(6)
    assert len(body["choices"][0]["logprobs"]["content"]) == 6
    assert body["usage"]["completion_tokens"] == 6
    status, text, _ = post(f"{dep.main}/v1/chat/completions",
                           {"messages": msgs, "max_tokens": 6, "stream": True})
    events = parse_sse(text)
    roles = [e["choices"][0]["delta"].get("role") for e in events[:-1]]
    assert roles[0] == "assistant" and roles.count("assistant") == 1
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]) == reply(6)


def test_request_finished_on_prefill_skips_decode(dep):
    before_d = total(dep.d_urls, "remote_prefills")
    status, body, _ = post(f"{dep.main}/v1/completions", {"prompt": "hi", "max_tokens": 1})
    assert status == 200 and body["choices"][0]["text"] == reply(1)
    assert body["usage"]["completion_tokens"] == 1 and "kv_transfer_params" not in body
    status, text, _ = post(f"{dep.main}/v1/chat/completions", {
        "messages": [{"role": "user", "content": "x"}], "max_tokens": 1, "stream": True})
    events = parse_sse(text)
    assert events[0]["choices"][0]["delta"]["content"] == reply(1)
    assert events[0]["choices"][0]["finish_reason"] == "length" and events[-1] == "[DONE]"
    assert total(dep.d_urls, "remote_prefills") == before_d


def test_prefill_errors_pass_through(dep):
    status, body, _ = post(f"{dep.main}/v1/completions", {"prompt": "x", "max_tokens": 400})
    assert status == 400 and body["error"]["param"] == "max_tokens"
    status, body, _ = post(f"{dep.main}/v1/completions", raw=b"{broken")
    assert status == 400 and "malformed JSON" in body["error"]["message"]


def test_round_robin_uses_every_instance(dep):
    before = [engine_counter(u, "added") for u in dep.p_urls + dep.d_urls]
    for _ in range(4):
        assert post(f"{dep.main}/v1/completions", {"prompt": "hi", "max_tokens": 3})[0] == 200
    after = [engine_counter(u, "added") for u in dep.p_urls + dep.d_urls]
    assert [a - b for a, b in zip(after, before)] == [2, 2, 2, 2]


async def _read_then_disconnect(url: str) -> None:
    async with aiohttp.ClientSession() as s:
        body = {"prompt": "hi", "max_tokens": 250, "stream": True}
        async with s.post(url, json=body) as r:
            assert r.status == 200
            await r.content.readuntil(b"\n\n")  # P's first token
            await r.content.readuntil(b"\n\n")  # D's first token: the decode leg is running


def test_client_disconnect_cancels_both_legs(dep):
    aborts, released = total(dep.d_urls, "aborts"), total(dep.p_urls, "held_released")
    asyncio.run(_read_then_disconnect(f"{dep.main}/v1/completions"))
    assert wait_until(lambda: total(dep.d_urls, "aborts") == aborts + 1)
    assert wait_until(lambda: total(dep.p_urls, "held_released") == released + 1)


def test_openai_client_against_proxy(dep):
    openai = pytest.importorskip("openai")  # not on every GPU image
    client = openai.OpenAI(base_url=f"{dep.main}/v1", api_key="none", max_retries=0)
    comp = client.completions.create(model=MODEL, prompt="hi", max_tokens=8)
    assert comp.choices[0].text == reply(8) and comp.usage.completion_tokens == 8
    stream = client.completions.create(model=MODEL, prompt="hi", max_tokens=8, stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == reply(8)
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hey"}], max_tokens=5)
    assert chat.choices[0].message.content == reply(5)
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hey"}], max_tokens=5, stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reply(5)
    assert chunks[-1].usage.completion_tokens == 5
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_proxy_health_models_metrics(dep):
    status, body, _ = get(f"{dep.main}/health")
    assert status == 200 and all(b["healthy"] for b in body["backends"])
    status, text, _ = get(f"{dep.main}/metrics")
    assert 'hybridpd_proxy_requests_total{outcome="ok"}' in text
    assert "hybridpd_proxy_time_to_first_token_seconds_count" in text
    assert "hybridpd_proxy_e2e_request_latency_seconds_count" in text


def test_down_backend_is_routed_around(dep):
    proxy = dep.proxy([dead_url(), *dep.p_urls], [dead_url(), dep.d_urls[0]])
    status, body, _ = get(f"{proxy}/health")
    assert status == 200 and sum(not b["healthy"] for b in body["backends"]) == 2
    results = []

    def one() -> None:
        results.append(post(f"{proxy}/v1/completions", {"prompt": "hi", "max_tokens": 4}))

    threads = [threading.Thread(target=one) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert [r[0] for r in results] == [200] * 6
    assert all(r[1]["choices"][0]["text"] == reply(4) for r in results)


def test_all_decode_down_gives_503(dep):
    proxy = dep.proxy(dep.p_urls, [dead_url()], routing="least-loaded")
    status, body, _ = post(f"{proxy}/v1/completions", {"prompt": "hi", "max_tokens": 4})
    assert status == 503 and "decode" in body["error"]["message"]
    assert get(f"{proxy}/health")[0] == 503


def test_backend_dying_between_health_checks_is_retried_elsewhere(dep):
    doomed = start_fake_instance(dep.lt, engine_id="doomed", role="prefill")
    doomed_url = f"http://127.0.0.1:{doomed.port}"
    app = build_app([doomed_url, dep.p_urls[0]], dep.d_urls, "round-robin", 60.0)
    runner, port = dep.lt.call(start_site(app, "127.0.0.1", 0))
    dep.runners.append(runner)
    proxy = f"http://127.0.0.1:{port}"
    assert get(f"{proxy}/health")[1]["backends"][0]["healthy"] is True
    dep.lt.call(doomed.stop())  # the monitor will not look again for a minute
    for _ in range(3):
        status, body, _ = post(f"{proxy}/v1/completions", {"prompt": "hi", "max_tokens": 3})
        assert status == 200 and body["choices"][0]["text"] == reply(3)
    assert get(f"{proxy}/health")[1]["backends"][0]["healthy"] is False


def test_multibyte_character_split_between_prefill_and_decode(dep):
    want = REPLY_UTF8[:9].decode()  # P's token is the first byte of "é"; D completes it
    status, body, _ = post(f"{dep.main}/v1/completions", {"prompt": "UTF8", "max_tokens": 9})
    assert status == 200 and body["choices"][0]["text"] == want
    status, text, _ = post(f"{dep.main}/v1/completions",
                           {"prompt": "UTF8", "max_tokens": 9, "stream": True})
    events = parse_sse(text)
    assert events[0]["choices"][0]["text"] == ""
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == want


def test_many_concurrent_mixed_requests(dep):
    async def one(s: aiohttp.ClientSession, i: int) -> str:
        body = {"prompt": f"hi {i}", "max_tokens": 5 + i % 7, "stream": i % 2 == 0}
        async with s.post(f"{dep.main}/v1/completions", json=body) as r:
            assert r.status == 200
            if not body["stream"]:
                return (await r.json())["choices"][0]["text"]
            events = parse_sse(await r.text())
            return "".join(e["choices"][0]["text"] for e in events[:-1])

    async def run() -> list[str]:
        async with aiohttp.ClientSession() as s:
            return await asyncio.gather(*(one(s, i) for i in range(24)))

    assert asyncio.run(run()) == [reply(5 + i % 7) for i in range(24)]


def test_stop_strings_across_the_prefill_decode_boundary(dep):
    before_d = total(dep.d_urls, "remote_prefills")
    released = total(dep.p_urls, "held_released")
    # fires inside P's first token: the request ends on P, which drops the held state
    status, body, _ = post(f"{dep.main}/v1/completions",
                           {"prompt": "hi", "max_tokens": 20, "stop": ["H"]})
    assert status == 200 and body["choices"][0] == {
        "index": 0, "text": "", "logprobs": None, "finish_reason": "stop"}
    assert total(dep.d_urls, "remote_prefills") == before_d
    assert wait_until(lambda: total(dep.p_urls, "held_released") == released + 1)
    # starts in P's first token, completes in D's text: P holds "H" back, D stops
    for stream in (False, True):
        status, resp, _ = post(f"{dep.main}/v1/completions", {
            "prompt": "hi", "max_tokens": 20, "stop": ["Hel", "wor"], "stream": stream})
        assert status == 200
        events = parse_sse(resp)[:-1] if stream else [resp]
        assert "".join(e["choices"][0]["text"] for e in events) == ""
        assert events[-1]["choices"][0]["finish_reason"] == "stop"
    status, body, _ = post(f"{dep.main}/v1/completions",
                           {"prompt": "hi", "max_tokens": 20, "stop": ["wor"]})
    assert body["choices"][0]["text"] == "Hello " and body["choices"][0]["finish_reason"] == "stop"


def _ids(events: list) -> list[int]:
    chunks = [e for e in events if e != "[DONE]" and e["choices"]]
    return [t for c in chunks for t in c["choices"][0]["token_ids"]]


def test_token_ids_merge_prefill_then_decode_and_stats_pass_through(dep):
    n = 10  # P's token is the first byte of "é": its text is held back, its id is not
    body = {"prompt": "UTF8", "max_tokens": n, "return_token_ids": True, "ignore_eos": True}
    status, got, _ = post(f"{dep.main}/v1/completions", body)
    assert status == 200, got
    assert got["choices"][0]["token_ids"] == list(REPLY_UTF8[:n])
    assert got["prompt_token_ids"] == [BOS, *b"UTF8"]
    assert got["kv_transfer_stats"] == TRANSFER_STATS
    assert got["choices"][0]["text"] == REPLY_UTF8[:n].decode()
    status, text, _ = post(f"{dep.main}/v1/completions", {**body, "stream": True})
    events = parse_sse(text)
    assert events[0]["choices"][0]["text"] == ""
    assert events[0]["choices"][0]["token_ids"] == [REPLY_UTF8[0]]
    assert events[0]["prompt_token_ids"] == [BOS, *b"UTF8"]
    assert all("prompt_token_ids" not in e for e in events[1:-1])
    assert _ids(events) == list(REPLY_UTF8[:n])
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == REPLY_UTF8[:n].decode()
    final = events[-2]
    assert final["choices"][0]["finish_reason"] == "length"
    assert final["kv_transfer_stats"] == TRANSFER_STATS
    assert all("kv_transfer_stats" not in e for e in events[:-2])


def test_chat_token_ids_merge_across_legs(dep):
    body = {"messages": [{"role": "user", "content": "UTF8"}], "max_tokens": 8,
            "return_token_ids": True, "stream_options": {"include_usage": True}}
    prompt_ids = list(b"<user>UTF8\n<assistant>")
    status, got, _ = post(f"{dep.main}/v1/chat/completions",
                          {k: v for k, v in body.items() if k != "stream_options"})
    assert status == 200 and got["choices"][0]["token_ids"] == list(REPLY_UTF8[:8])
    assert got["prompt_token_ids"] == prompt_ids and got["kv_transfer_stats"] == TRANSFER_STATS
    status, text, _ = post(f"{dep.main}/v1/chat/completions", {**body, "stream": True})
    events = parse_sse(text)
    assert events[0]["prompt_token_ids"] == prompt_ids
    assert _ids(events) == list(REPLY_UTF8[:8])
    assert events[-2]["choices"] == [] and events[-2]["usage"]["completion_tokens"] == 8
    assert events[-3]["kv_transfer_stats"] == TRANSFER_STATS


def test_token_ids_of_a_request_finished_on_prefill(dep):
    body = {"prompt": "hi", "max_tokens": 1, "return_token_ids": True}
    status, got, _ = post(f"{dep.main}/v1/completions", body)
    assert status == 200 and got["choices"][0]["token_ids"] == [REPLY[0]]
    assert "kv_transfer_stats" not in got
    status, text, _ = post(f"{dep.main}/v1/completions", {**body, "stream": True})
    events = parse_sse(text)
    assert _ids(events) == [REPLY[0]] and events[0]["prompt_token_ids"] == [BOS, *b"hi"]


def test_without_the_extension_no_token_ids_but_stats(dep):
    status, got, _ = post(f"{dep.main}/v1/completions", {"prompt": "hi", "max_tokens": 5})
    assert "token_ids" not in got["choices"][0] and "prompt_token_ids" not in got
    assert got["kv_transfer_stats"] == TRANSFER_STATS


# ---- the shared OpenAI protocol package (hybridpd/openai/) --------------------------------
def test_proxy_answers_validate_against_the_shared_response_models(dep):
    status, body, _ = post(f"{dep.main}/v1/completions", {"prompt": "hi", "max_tokens": 5,
                                                          "logprobs": 1})
    assert status == 200, body
    assert CompletionResponse.model_validate(body).choices[0].text == reply(5)
    msgs = [{"role": "user", "content": "hi"}]
    status, body, _ = post(f"{dep.main}/v1/chat/completions", {"messages": msgs,
                                                               "max_tokens": 5})
    out = ChatCompletionResponse.model_validate(body)
    assert out.choices[0].message.content == reply(5) and out.usage.completion_tokens == 5
    status, text, _ = post(f"{dep.main}/v1/chat/completions", {
        "messages": msgs, "max_tokens": 5, "stream": True,
        "stream_options": {"include_usage": True}})
    events = parse_sse(text)
    chunks = [ChatCompletionChunk.model_validate(e) for e in events[:-1]]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reply(5)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5


def test_proxy_refuses_unsupported_fields_before_any_backend(dep):
    before = total(dep.p_urls + dep.d_urls, "added")
    status, body, headers = post(f"{dep.main}/v1/completions",
                                 {"prompt": "hi", "presence_penalty": 1.0},
                                 headers={"X-Request-Id": "unsup-1"})
    assert status == 400 and body["error"]["param"] == "presence_penalty", body
    assert headers["X-Request-Id"] == "unsup-1"
    ErrorResponse.model_validate(body)
    assert total(dep.p_urls + dep.d_urls, "added") == before


def test_proxy_passes_unknown_fields_with_a_warning(dep, caplog):
    with caplog.at_level(logging.WARNING, logger="hybridpd.openai.parse"):
        status, body, _ = post(f"{dep.main}/v1/completions",
                               {"prompt": "hi", "max_tokens": 3, "reasoning_effort": "low"})
    assert status == 200 and body["choices"][0]["text"] == reply(3), body
    assert any(r.msg == IGNORED_FIELDS_MESSAGE and "reasoning_effort" in r.getMessage()
               for r in caplog.records)


def test_proxy_continuous_usage_counts_both_legs(dep):
    for path, body in (("/v1/completions", {"prompt": "hi"}),
                       ("/v1/chat/completions",
                        {"messages": [{"role": "user", "content": "hi"}]})):
        status, text, _ = post(f"{dep.main}{path}", {
            **body, "max_tokens": 4, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}})
        assert status == 200, text
        events = parse_sse(text)
        chunks = [e for e in events[:-1] if e["choices"]]
        counts = [c["usage"]["completion_tokens"] for c in chunks]
        assert counts[0] == 1 and counts[-1] == 4 and counts == sorted(counts), counts
        assert events[-2]["choices"] == [] and events[-2]["usage"]["completion_tokens"] == 4


def test_proxy_serves_the_instances_openapi_document(dep):
    status, doc, _ = get(f"{dep.main}/openapi.json")
    assert status == 200 and set(doc["paths"]) == {"/v1/completions", "/v1/chat/completions"}
    assert doc == get(f"{dep.p_urls[0]}/openapi.json")[1]


def test_proxy_echoes_its_request_id_on_errors_passed_through(dep):
    status, body, headers = post(f"{dep.main}/v1/completions", {"prompt": "x",
                                                                "max_tokens": 400})
    assert status == 400 and body["error"]["param"] == "max_tokens", body  # P's answer
    assert headers["X-Request-Id"].startswith("cmpl-")
    status, body, headers = post(f"{dep.main}/v1/completions", {"prompt": "hi", "max_tokens": 2})
    assert status == 200 and headers["X-Request-Id"] == body["id"]


def test_a_reused_request_id_is_served_through_the_proxy(dep):
    """The same X-Request-Id while the first request is still streaming on D (and P may still
    hold its state): the second is served too, under the client's id."""
    headers = {"X-Request-Id": "reused-1"}

    async def run() -> tuple[str, dict, str]:
        async with aiohttp.ClientSession() as s:
            body = {"prompt": "hi", "max_tokens": 40, "stream": True}
            async with s.post(f"{dep.main}/v1/completions", json=body, headers=headers) as r:
                assert r.status == 200
                first = await r.content.readuntil(b"\n\n")  # P handed off; D is streaming
                second_body = {"prompt": "hi", "max_tokens": 3}
                async with s.post(f"{dep.main}/v1/completions", json=second_body,
                                  headers=headers) as r2:
                    second = await r2.json()
                    assert r2.status == 200, second
                    echoed = r2.headers["X-Request-Id"]
                rest = (await r.read()).decode()
        return first.decode() + rest, second, echoed

    stream, second, echoed = asyncio.run(run())
    events = parse_sse(stream)
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == reply(40)
    assert all(e["id"] == "reused-1" for e in events[:-1])
    assert second["id"] == "reused-1" == echoed and second["choices"][0]["text"] == reply(3)
