"""Several choices through the P/D proxy as `vllm serve` answers them, against the co-located
instance: a streamed list of prompts (one P/D flow per prompt, chunks merged onto one stream,
choice index = prompt x n + sample, one usage chunk, [DONE] once), chat tools with n > 1 (each
choice parses its own calls; ids unique across choices) and chat echo with n > 1. Real engines
(tiny demo model, NIXL over UCX loopback) in both hand-off modes; stub backends for a decode leg
that fails mid-stream and a prompt that P refuses (what gets released).
"""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
import torch
from aiohttp import web
from harness import LoopThread
from http_util import get, parse_sse, post, wait_until
from real_deployment import real_deployment
from schema_check import violations

from hybridpd.httpkit.site import start_site
from hybridpd.proxy.app import build_app
from hybridpd.server.serving import ServerConfig

torch.set_num_threads(1)
MAX_MODEL_LEN = 512
MODEL = "tiny"
HANDOFFS = ["first-token", "n-1"]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "minLength": 1, "maxLength": 8},
        "unit": {"enum": ["C", "F"]}}, "required": ["city", "unit"],
        "additionalProperties": False}}}
USER = [{"role": "user", "content": "Weather?"}]


@pytest.fixture(scope="module")
def urls(tmp_path_factory):
    """{"both": co-located URL, "first-token" / "n-1": proxy URL, "instances": every URL}."""
    from hybridpd.demo.writer import write_demo_model

    model_dir = str(write_demo_model(tmp_path_factory.mktemp("models") / "tiny",
                                     preset="tiny", seed=3).path)
    with real_deployment(model_dir, ServerConfig(MODEL, MAX_MODEL_LEN, vocab_size=384),
                         lease_s=120.0) as urls:  # P's blocks freed only by a release
        yield urls


def _stream(url: str, path: str, body: dict, rid: str) -> list:
    status, text, headers = post(f"{url}{path}", {**body, "stream": True},
                                 headers={"X-Request-Id": rid})
    assert status == 200, text
    assert headers["X-Request-Id"] == rid
    events = parse_sse(text)
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1, events
    assert not any("error" in e for e in events[:-1]), events
    return events[:-1]


def _per_choice(events: list) -> dict[int, dict]:
    """Per choice index: its text, its tokens (from logprobs), its finish reasons."""
    out: dict[int, dict] = {}
    for e in events:
        for c in e["choices"]:
            got = out.setdefault(c["index"], {"text": "", "tokens": [], "finish": []})
            got["text"] += c["text"]
            got["tokens"] += (c.get("logprobs") or {}).get("tokens") or []
            if c["finish_reason"] is not None:
                got["finish"].append(c["finish_reason"])
    return out


def _pools_free(urls: dict) -> None:
    for url in urls["instances"]:
        assert wait_until(lambda u=url: get(f"{u}/v1/pool")[1]["used_blocks"] == 0), url


@pytest.mark.parametrize("handoff", HANDOFFS)
def test_streamed_prompt_list_equals_colocated(urls, handoff):
    body = {"model": MODEL, "prompt": ["a cat", "two dogs", "x", "seven"], "max_tokens": 5,
            "temperature": 0, "ignore_eos": True, "n": 2, "logprobs": 0,
            "stream_options": {"include_usage": True}}
    want_events = _stream(urls["both"], "/v1/completions", body, "list-colo")
    got_events = _stream(urls[handoff], "/v1/completions", body, f"list-{handoff}")
    want, got = _per_choice(want_events), _per_choice(got_events)
    assert sorted(got) == list(range(8))  # prompt i, sample j -> index 2i + j
    for i in range(8):
        assert got[i]["text"] == want[i]["text"], i
        assert got[i]["tokens"] == want[i]["tokens"] and len(got[i]["tokens"]) == 5, i
        assert got[i]["finish"] == ["length"], i  # each choice ends once
    assert all(e["id"] == f"list-{handoff}" for e in got_events)
    usage = [e for e in got_events if not e["choices"]]
    assert len(usage) == 1 and usage[0] is got_events[-1]  # one usage chunk, the last
    assert usage[0]["usage"] == want_events[-1]["usage"]
    assert usage[0]["usage"]["completion_tokens"] == 8 * 5
    # without include_usage: no usage chunk at all
    plain = _stream(urls[handoff], "/v1/completions",
                    {k: v for k, v in body.items() if k != "stream_options"}, "list-plain")
    assert all(e["choices"] and "usage" not in e for e in plain)
    assert {i: c["text"] for i, c in _per_choice(plain).items()} == {
        i: c["text"] for i, c in want.items()}
    # one token: first-token mode ends every prompt on P (no decode leg)
    one = {**body, "max_tokens": 1}
    want_one = _stream(urls["both"], "/v1/completions", one, "one-colo")
    got_one = _stream(urls[handoff], "/v1/completions", one, "one-pd")
    assert _per_choice(got_one) == _per_choice(want_one)
    assert got_one[-1]["usage"] == want_one[-1]["usage"]
    _pools_free(urls)


@pytest.mark.parametrize("handoff", HANDOFFS)
def test_streamed_prompt_list_with_a_refused_prompt_is_a_400(urls, handoff):
    """A prompt P refuses (too long) fails the request before anything streams; the other
    prompts' prefilled state is released."""
    body = {"model": MODEL, "prompt": [[5] * 40, [5] * 600], "max_tokens": 4,
            "stream": True}
    status, out, _ = post(f"{urls[handoff]}/v1/completions", body)
    assert status == 400, out
    assert out["error"]["param"] == "prompt", out
    # P's own refusal (the proxy does not count tokens)
    assert out["error"]["code"] == "context_length_exceeded" and "600" in out["error"][
        "message"], out
    _pools_free(urls)  # well before P's 120 s lease: the proxy released the other prompt
    status, out, _ = post(f"{urls[handoff]}/v1/completions",
                          {"model": MODEL, "prompt": "after", "max_tokens": 2})
    assert status == 200, out  # nothing else was lost


def _tool_calls(choice: dict) -> list[dict]:
    return choice["message"].get("tool_calls") or []


@pytest.mark.parametrize("handoff", HANDOFFS)
def test_named_tool_with_n_through_the_proxy(urls, handoff):
    body = {"model": MODEL, "messages": USER, "max_tokens": 60, "temperature": 0, "n": 2,
            "tools": [WEATHER],
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
    status, colo, _ = post(f"{urls['both']}/v1/chat/completions", body)
    assert status == 200, colo
    status, got, _ = post(f"{urls[handoff]}/v1/chat/completions", body)
    assert status == 200, got
    assert [c["index"] for c in got["choices"]] == [0, 1]
    ids = []
    for mine, want in zip(got["choices"], colo["choices"], strict=True):
        assert mine["finish_reason"] == want["finish_reason"] == "tool_calls"
        (call,) = _tool_calls(mine)
        assert call["function"] == _tool_calls(want)[0]["function"]
        assert violations(json.loads(call["function"]["arguments"]),
                          WEATHER["function"]["parameters"]) == []
        ids.append(call["id"])
    assert len(set(ids)) == 2  # unique across choices
    events = _stream(urls[handoff], "/v1/chat/completions", body, f"tools-{handoff}")
    calls: dict[int, list] = {}
    for e in events:
        for c in e["choices"]:
            calls.setdefault(c["index"], []).extend(c["delta"].get("tool_calls") or [])
    assert [[tc["function"] for tc in calls[i]] for i in (0, 1)] == [
        [_tool_calls(c)[0]["function"]] for c in colo["choices"]]
    assert len({tc["id"] for i in (0, 1) for tc in calls[i]}) == 2
    _pools_free(urls)


@pytest.mark.parametrize("handoff", HANDOFFS)
def test_auto_tools_with_n_through_the_proxy(urls, handoff):
    """Auto mode: every choice's text (P's piece + D's) is held and parsed on its own; the
    grammar makes the random model write a Hermes call after some text."""
    forced = (r'[a-z]{2} <tool_call>\{"name": "get_weather", "arguments": '
              r'\{"city": "[a-z]{2}", "unit": "C"\}\}</tool_call>')
    body = {"model": MODEL, "messages": USER, "max_tokens": 100, "temperature": 0, "n": 2,
            "tools": [WEATHER], "guided_regex": forced}
    status, colo, _ = post(f"{urls['both']}/v1/chat/completions", body)
    assert status == 200, colo
    want = [(c["message"]["content"], _tool_calls(c)[0]["function"]) for c in colo["choices"]]
    status, got, _ = post(f"{urls[handoff]}/v1/chat/completions", body)
    assert status == 200, got
    assert [(c["message"]["content"], _tool_calls(c)[0]["function"])
            for c in got["choices"]] == want
    assert len({_tool_calls(c)[0]["id"] for c in got["choices"]}) == 2
    events = _stream(urls[handoff], "/v1/chat/completions", body, f"auto-{handoff}")
    content: dict[int, str] = {}
    calls: dict[int, list] = {}
    for e in events:
        for c in e["choices"]:
            i = c["index"]
            content[i] = content.get(i, "") + (c["delta"].get("content") or "")
            calls.setdefault(i, []).extend(c["delta"].get("tool_calls") or [])
    assert [(content[i].strip(), [tc["function"] for tc in calls[i]]) for i in (0, 1)] == [
        (text, [fn]) for text, fn in want]
    assert len({tc["id"] for i in (0, 1) for tc in calls[i]}) == 2
    _pools_free(urls)


@pytest.mark.parametrize("handoff", HANDOFFS)
@pytest.mark.parametrize("stream", [False, True])
def test_chat_echo_with_n_through_the_proxy(urls, handoff, stream):
    msgs = [{"role": "user", "content": "417+285="}, {"role": "assistant", "content": "7"}]
    body = {"model": MODEL, "messages": msgs, "max_tokens": 4, "temperature": 0, "n": 2,
            "ignore_eos": True, "echo": True}
    status, colo, _ = post(f"{urls['both']}/v1/chat/completions", body)
    assert status == 200, colo
    want = [c["message"]["content"] for c in colo["choices"]]
    assert all(w.startswith("7") and len(w) > 1 for w in want)
    if not stream:
        status, got, _ = post(f"{urls[handoff]}/v1/chat/completions", body)
        assert status == 200, got
        assert [c["message"]["content"] for c in got["choices"]] == want
        return
    events = _stream(urls[handoff], "/v1/chat/completions", body, f"echo-{handoff}")
    # as vLLM (and the co-located instance): every choice's role chunk, then its echo chunk
    heads = [(e["choices"][0]["index"], e["choices"][0]["delta"]) for e in events[:4]]
    assert heads == [(0, {"role": "assistant", "content": ""}),
                     (1, {"role": "assistant", "content": ""}),
                     (0, {"content": "7"}), (1, {"content": "7"})]
    colo_events = _stream(urls["both"], "/v1/chat/completions", body, "echo-colo")
    assert [(e["choices"][0]["index"], e["choices"][0]["delta"])
            for e in colo_events[:4]] == heads
    texts: dict[int, str] = {}
    for e in events:
        for c in e["choices"]:
            texts[c["index"]] = texts.get(c["index"], "") + (c["delta"].get("content") or "")
    assert [texts[i] for i in (0, 1)] == want


# ---- stub backends: what a failing leg of a streamed list releases ---------------------------
class Stubs:
    """A prefill and a decode stub over real HTTP. P answers every prompt with one token and
    a hand-off (prompts containing "REFUSE": a 400); D streams one chunk per prompt, then for
    "fail" (once another prompt's stream has started) an error event, for anything else waits
    until the proxy drops the connection."""

    def __init__(self) -> None:
        self.aborted: set[str] = set()  # request ids P was told to release
        self.dropped: set[str] = set()  # request ids whose D stream the proxy closed
        self.waiting = asyncio.Event()  # a stream that waits for its close has started

    def prefill_app(self) -> web.Application:
        async def complete(request: web.Request) -> web.Response:
            body = await request.json()
            rid = request.headers["X-Request-Id"]
            if "REFUSE" in body["prompt"]:
                return web.json_response({"error": {"message": "refused on purpose",
                                                    "type": "invalid_request_error",
                                                    "param": "prompt", "code": None}},
                                         status=400)
            return web.json_response({
                "id": rid, "object": "text_completion", "created": 1, "model": MODEL,
                "choices": [{"index": 0, "text": "A", "logprobs": None,
                             "finish_reason": "length"}],
                "usage": {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3},
                "kv_transfer_params": {"remote_engine_id": "stub", "request_id": rid}})

        async def abort(request: web.Request) -> web.Response:
            self.aborted.add((await request.json())["request_id"])
            return web.json_response({"aborted": True})

        return self._app(complete, abort)

    def decode_app(self) -> web.Application:
        async def complete(request: web.Request) -> web.StreamResponse:
            body = await request.json()
            rid = request.headers["X-Request-Id"]
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            chunk = {"id": rid, "object": "text_completion", "created": 1, "model": MODEL,
                     "choices": [{"index": 0, "text": "B", "logprobs": None,
                                  "finish_reason": None}]}
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
            if body["prompt"] == "fail":  # once the other prompt's stream has started here
                await asyncio.wait_for(self.waiting.wait(), timeout=30.0)
                err = {"error": {"message": "decode failed on purpose", "type": "server_error",
                                 "param": None, "code": None}}
                await resp.write(f"data: {json.dumps(err)}\n\ndata: [DONE]\n\n".encode())
                return resp
            self.waiting.set()
            try:  # until the proxy closes the connection (the handler is cancelled then)
                await asyncio.wait_for(asyncio.Event().wait(), timeout=60.0)
            except asyncio.CancelledError:
                self.dropped.add(rid)
                raise
            return resp

        return self._app(complete, None)

    @staticmethod
    def _app(complete, abort) -> web.Application:  # noqa: ANN001
        async def health(_: web.Request) -> web.Response:
            return web.json_response({"status": "ok"})

        async def models(_: web.Request) -> web.Response:
            return web.json_response({"object": "list", "data": [{"id": MODEL}]})

        app = web.Application()
        app.router.add_get("/health", health)
        app.router.add_get("/v1/models", models)
        app.router.add_post("/v1/completions", complete)
        if abort is not None:
            app.router.add_post("/v1/abort", abort)
        return app


@pytest.fixture
def stubs():
    lt = LoopThread()
    st = Stubs()
    runners = []
    try:
        p_runner, p_port = lt.call(start_site(st.prefill_app(), "127.0.0.1", 0))
        d_runner, d_port = lt.call(start_site(st.decode_app(), "127.0.0.1", 0))
        runners += [p_runner, d_runner]
        proxy, port = lt.call(start_site(build_app([f"http://127.0.0.1:{p_port}"],
                                                   [f"http://127.0.0.1:{d_port}"]),
                                         "127.0.0.1", 0))
        runners.append(proxy)
        st.url = f"http://127.0.0.1:{port}"
        yield st
    finally:
        for runner in reversed(runners):
            lt.call(runner.cleanup())
        lt.close()


def test_a_failed_decode_leg_ends_the_list_stream_and_releases_every_prompt(stubs):
    status, text, _ = post(f"{stubs.url}/v1/completions",
                           {"model": MODEL, "prompt": ["wait", "fail"], "max_tokens": 4,
                            "stream": True, "stream_options": {"include_usage": True}},
                           headers={"X-Request-Id": "lst"})
    assert status == 200
    events = parse_sse(text)
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
    errors = [e for e in events[:-1] if "error" in e]
    assert len(errors) == 1 and errors[0]["error"]["message"] == "decode failed on purpose"
    assert not any(e.get("usage") for e in events[:-1])  # a failed stream reports no usage
    # both prompts' P holds are released; the waiting prompt's D stream is closed
    assert wait_until(lambda: stubs.aborted == {"lst-0", "lst-1"}), stubs.aborted
    assert wait_until(lambda: stubs.dropped == {"lst-0"}), stubs.dropped


def test_a_prompt_p_refuses_is_the_streams_http_error(stubs):
    status, out, _ = post(f"{stubs.url}/v1/completions",
                          {"model": MODEL, "prompt": ["fine", "REFUSE me"], "max_tokens": 4,
                           "stream": True}, headers={"X-Request-Id": "ref"})
    assert status == 400 and out["error"]["message"] == "refused on purpose", out
    assert wait_until(lambda: "ref-0" in stubs.aborted), stubs.aborted  # its hold released
    assert "ref-1" not in stubs.aborted  # the refused prompt left nothing on P


async def _read_one_event_then_leave(url: str, body: dict) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{url}/v1/completions", json=body,
                          headers={"X-Request-Id": "gone"}) as r:
            assert r.status == 200
            await asyncio.wait_for(r.content.readuntil(b"\n\n"), timeout=30.0)


def test_a_client_leaving_a_list_stream_releases_every_prompt(stubs):
    body = {"model": MODEL, "prompt": ["wait", "wait too"], "max_tokens": 4, "stream": True}
    asyncio.run(_read_one_event_then_leave(stubs.url, body))
    assert wait_until(lambda: stubs.aborted == {"gone-0", "gone-1"}), stubs.aborted


@pytest.mark.parametrize("handoff", HANDOFFS)
def test_named_tool_with_chat_echo_and_n_through_the_proxy(urls, handoff):
    """The echo is put in front of every choice after its calls are parsed (never parsed)."""
    msgs = [*USER, {"role": "assistant", "content": "Calling"}]
    body = {"model": MODEL, "messages": msgs, "max_tokens": 60, "temperature": 0, "n": 2,
            "echo": True, "tools": [WEATHER],
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
    status, colo, _ = post(f"{urls['both']}/v1/chat/completions", body)
    assert status == 200, colo
    status, got, _ = post(f"{urls[handoff]}/v1/chat/completions", body)
    assert status == 200, got
    for mine, want in zip(got["choices"], colo["choices"], strict=True):
        assert mine["message"]["content"] == want["message"]["content"] == "Calling"
        assert _tool_calls(mine)[0]["function"] == _tool_calls(want)[0]["function"]
        assert mine["finish_reason"] == want["finish_reason"] == "tool_calls"
