"""The proxy against scripted fake backends: bad input refused before any leg, unexpected
failures answered in the OpenAI shape, a malformed decode stream ended cleanly, and P's held
state released whenever the client leaves."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest
import torch
from harness import LoopThread
from http_util import parse_sse, post, wait_until

from hybridpd.httpkit.site import start_site
from hybridpd.proxy.app import build_app

torch.set_num_threads(1)
SLOW_PREFILL_S = 1.5


class FakeBackend:
    """A scripted instance: records what it was asked; `mode` picks how it answers."""

    def __init__(self, role: str) -> None:
        self.role, self.mode = role, "ok"
        self.calls: list[dict[str, Any]] = []
        self.aborted: list[str] = []
        self.app = aiohttp.web.Application()
        self.app.router.add_get("/health", self._health)
        self.app.router.add_post("/v1/completions", self._complete)
        self.app.router.add_post("/v1/abort", self._abort)

    async def _health(self, request: aiohttp.web.Request) -> aiohttp.web.Response:
        return aiohttp.web.json_response({"status": "ok"})

    async def _abort(self, request: aiohttp.web.Request) -> aiohttp.web.Response:
        self.aborted.append((await request.json())["request_id"])
        return aiohttp.web.json_response({"aborted": True})

    async def _complete(self, request: aiohttp.web.Request) -> aiohttp.web.StreamResponse:
        body = await request.json()
        self.calls.append(body)
        rid = request.headers["X-Request-Id"]
        if self.role == "decode":
            return await self._bad_stream(request, rid)
        if self.mode == "slow":
            await asyncio.sleep(SLOW_PREFILL_S)
        answer = _p_answer(rid)
        if self.mode == "no_choices":
            del answer["choices"]
        return aiohttp.web.json_response(answer)

    @staticmethod
    async def _bad_stream(request: aiohttp.web.Request, rid: str) -> aiohttp.web.StreamResponse:
        resp = aiohttp.web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        chunk = {"id": rid, "object": "text_completion", "created": 1, "model": "m",
                 "choices": [{"index": 0, "text": "ello", "logprobs": None,
                              "finish_reason": None}]}
        await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await resp.write(b"data: {this is not json\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


def _p_answer(rid: str) -> dict[str, Any]:
    return {"id": rid, "object": "text_completion", "created": 1, "model": "m",
            "choices": [{"index": 0, "text": "H", "logprobs": None, "finish_reason": "length"}],
            "usage": {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3},
            "kv_transfer_params": {"remote_engine_id": "p", "request_id": rid}}


class Setup:
    def __init__(self) -> None:
        self.lt = LoopThread()
        self.p, self.d = FakeBackend("prefill"), FakeBackend("decode")
        self.runners = []
        urls = [self._serve(b.app) for b in (self.p, self.d)]
        self.proxy = self._serve(build_app([urls[0]], [urls[1]], health_interval_s=0.2))

    def _serve(self, app: aiohttp.web.Application) -> str:
        runner, port = self.lt.call(start_site(app, "127.0.0.1", 0))
        self.runners.append(runner)
        return f"http://127.0.0.1:{port}"

    def close(self) -> None:
        for runner in reversed(self.runners):
            self.lt.call(runner.cleanup())
        self.lt.close()


@pytest.fixture()
def setup():
    s = Setup()
    try:
        yield s
    finally:
        s.close()


def _assert_openai_error(body: Any, status: int, got: int, param: str | None = None) -> None:
    assert got == status, body
    assert isinstance(body, dict) and set(body["error"]) == {"message", "type", "param", "code"}
    if param is not None:
        assert body["error"]["param"] == param, body


@pytest.mark.parametrize("extra", [
    {"stream": "yes"},
    {"stream": 1},
    {"stream": True, "stream_options": "usage"},
    {"stream": True, "stream_options": {"include_usage": "yes"}},
    {"stream": True, "stream_options": {"bogus": True}},
    {"stream": False, "stream_options": {"include_usage": True}},
])
def test_bad_stream_flags_are_refused_before_any_backend(setup, extra):
    status, body, _ = post(f"{setup.proxy}/v1/completions", {"prompt": "hi", **extra})
    param = "stream" if set(extra) == {"stream"} else "stream_options"
    _assert_openai_error(body, 400, status, param)
    assert setup.p.calls == [] and setup.d.calls == []


def test_unexpected_failure_is_an_openai_shaped_500_and_releases_p(setup):
    setup.p.mode = "no_choices"  # P answers 200 without choices: the merge code trips
    status, body, headers = post(f"{setup.proxy}/v1/completions", {"prompt": "hi"},
                                 headers={"X-Request-Id": "odd-1"})
    _assert_openai_error(body, 500, status)
    assert body["error"]["type"] == "server_error" and "Traceback" not in json.dumps(body)
    assert headers["Content-Type"].startswith("application/json")
    assert wait_until(lambda: setup.p.aborted == ["odd-1"])


def test_malformed_event_from_decode_ends_the_stream_with_error_and_done(setup):
    status, text, _ = post(f"{setup.proxy}/v1/completions", {"prompt": "hi", "stream": True},
                           headers={"X-Request-Id": "bad-sse"})
    assert status == 200
    events = parse_sse(text)
    assert [e["choices"][0]["text"] for e in events[:2]] == ["H", "ello"]
    assert "not json" in events[2]["error"]["message"] and events[3:] == ["[DONE]"]
    assert wait_until(lambda: setup.p.aborted == ["bad-sse"])  # D failed: P lets go


async def _leave_during_prefill(url: str, stream: bool) -> None:
    timeout = aiohttp.ClientTimeout(total=0.3)
    async with aiohttp.ClientSession(timeout=timeout) as s:
        with pytest.raises(asyncio.TimeoutError):
            async with s.post(url, json={"prompt": "hi", "stream": stream},
                              headers={"X-Request-Id": f"gone-{stream}"}) as r:
                await r.read()


@pytest.mark.parametrize("stream", [False, True])
def test_client_leaving_during_the_prefill_leg_releases_p(setup, stream):
    setup.p.mode = "slow"
    asyncio.run(_leave_during_prefill(f"{setup.proxy}/v1/completions", stream))
    assert wait_until(lambda: setup.p.aborted == [f"gone-{stream}"], timeout_s=5.0)
    assert setup.d.calls == []
