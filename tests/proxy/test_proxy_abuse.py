"""The proxy under hostile input and saturated backends: deep JSON and oversized bodies refused
before any backend is called (the size limit learned from the instances' model cards), the
API key enforced and forwarded, a 503 `queue_timeout` (never started) tried on another
instance while other errors are not, and P's held state released only with the deployment's
internal token (a real instance in the P role checks it)."""

from __future__ import annotations

import functools
import json
from typing import Any

import aiohttp
import pytest
from fakes import FakeTokenizer, make_fake_engine
from harness import MODEL, LoopThread
from http_util import get, post, wait_until

from hybridpd.httpkit.auth import INTERNAL_AUTH_HEADER, internal_token_ok
from hybridpd.httpkit.site import start_site
from hybridpd.proxy.app import build_app
from hybridpd.server.runtime import start_instance
from hybridpd.server.serving import ServerConfig

SECRET = "the-deployment-secret"
CARD_LIMIT = 100_000
QUEUE_TIMEOUT = {"error": {"message": "queue timeout: could not start", "type": "server_error",
                           "param": None, "code": "queue_timeout"}}
OTHER_503 = {"error": {"message": "engine unavailable", "type": "server_error", "param": None,
                       "code": None}}


class Backend:
    """A scripted instance: `mode` "ok", "queue_timeout", "other_503" or "fail" (500)."""

    def __init__(self, role: str, mode: str = "ok") -> None:
        self.role, self.mode = role, mode
        self.calls: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.aborts: list[tuple[str, dict[str, str]]] = []
        self.app = aiohttp.web.Application()
        self.app.router.add_get("/health", self._health)
        self.app.router.add_get("/v1/models", self._models)
        self.app.router.add_post("/v1/completions", self._complete)
        self.app.router.add_post("/v1/abort", self._abort)

    async def _health(self, request: aiohttp.web.Request) -> aiohttp.web.Response:
        return aiohttp.web.json_response({"status": "ok"})

    async def _models(self, request: aiohttp.web.Request) -> aiohttp.web.Response:
        return aiohttp.web.json_response({"object": "list", "data": [
            {"id": "m", "max_model_len": 64, "max_request_bytes": CARD_LIMIT}]})

    async def _abort(self, request: aiohttp.web.Request) -> aiohttp.web.Response:
        self.aborts.append(((await request.json())["request_id"], dict(request.headers)))
        return aiohttp.web.json_response({"aborted": True})

    async def _complete(self, request: aiohttp.web.Request) -> aiohttp.web.StreamResponse:
        body = await request.json()
        self.calls.append(body)
        self.headers.append(dict(request.headers))
        rid = request.headers["X-Request-Id"]
        if self.mode == "queue_timeout":
            return aiohttp.web.json_response(QUEUE_TIMEOUT, status=503)
        if self.mode == "other_503":
            return aiohttp.web.json_response(OTHER_503, status=503)
        if self.mode == "fail":
            return aiohttp.web.json_response({"error": {"message": "boom"}}, status=500)
        text = "H" if self.role == "prefill" else "ello"
        answer = {"id": rid, "object": "text_completion", "created": 1, "model": "m",
                  "choices": [{"index": 0, "text": text, "logprobs": None,
                               "finish_reason": "length"}],
                  "usage": {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3}}
        if self.role == "prefill":
            answer["kv_transfer_params"] = {"remote_engine_id": "p", "request_id": rid}
        if body.get("stream"):
            del answer["usage"]
            resp = aiohttp.web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            await resp.write(f"data: {json.dumps(answer)}\n\ndata: [DONE]\n\n".encode())
            await resp.write_eof()
            return resp
        return aiohttp.web.json_response(answer)


class Deployment:
    def __init__(self, prefill: list[Any], decode: list[Any], **proxy_kw: Any) -> None:
        self.lt = LoopThread()
        self.runners: list[Any] = []
        self.instances: list[Any] = []
        p_urls = [self.url_of(b) for b in prefill]
        d_urls = [self.url_of(b) for b in decode]
        self.proxy = self._serve(build_app(p_urls, d_urls, health_interval_s=0.2, **proxy_kw))

    def url_of(self, backend: Any) -> str:
        return backend if isinstance(backend, str) else self._serve(backend.app)

    def _serve(self, app: aiohttp.web.Application) -> str:
        runner, port = self.lt.call(start_site(app, "127.0.0.1", 0))
        self.runners.append(runner)
        return f"http://127.0.0.1:{port}"

    def real_prefill(self, secret: str | None) -> str:
        config = ServerConfig(model_name=MODEL, max_model_len=256, role="prefill",
                              deployment_secret=secret)
        inst = self.lt.call(start_instance(functools.partial(make_fake_engine, 0.0, "p"),
                                           FakeTokenizer(), config, startup_timeout_s=60.0))
        self.instances.append(inst)
        return f"http://127.0.0.1:{inst.port}"

    def close(self) -> None:
        for runner in reversed(self.runners):
            self.lt.call(runner.cleanup())
        for inst in self.instances:
            self.lt.call(inst.stop())
        self.lt.close()


@pytest.fixture()
def make():
    made: list[Deployment] = []

    def build(prefill: list[Any], decode: list[Any], **kw: Any) -> Deployment:
        made.append(Deployment(prefill, decode, **kw))
        return made[-1]

    try:
        yield build
    finally:
        for d in made:
            d.close()


@pytest.mark.parametrize("depth", [33, 40_000])  # 40,000: still under the card's body limit
def test_deep_json_is_a_400_before_any_backend(make, depth):
    p, d = Backend("prefill"), Backend("decode")
    dep = make([p], [d])
    raw = b'{"prompt": ' + b"[" * depth + b"]" * depth + b"}"
    status, body, _ = post(f"{dep.proxy}/v1/completions", raw=raw)
    assert status == 400 and "nested deeper than 32" in body["error"]["message"], body
    assert p.calls == [] and d.calls == []


def test_the_body_limit_is_learned_from_the_instances_cards(make):
    p, d = Backend("prefill"), Backend("decode")
    dep = make([p], [d])
    big = {"prompt": "x" * (2 * CARD_LIMIT), "max_tokens": 1}
    assert post(f"{dep.proxy}/v1/completions", big)[0] == 413  # learned at start-up
    assert p.calls == [] and d.calls == []
    assert post(f"{dep.proxy}/v1/completions", {"prompt": "hi"})[0] == 200


def test_an_explicit_body_limit_wins(make):
    dep = make([Backend("prefill")], [Backend("decode")], max_body_bytes=1000)
    assert post(f"{dep.proxy}/v1/completions", {"prompt": "x" * 2000})[0] == 413


def test_the_api_key_is_required_and_forwarded(make):
    p, d = Backend("prefill"), Backend("decode")
    dep = make([p], [d], api_key="k")
    assert post(f"{dep.proxy}/v1/completions", {"prompt": "hi"})[0] == 401
    assert get(f"{dep.proxy}/health")[0] == 200
    status, body, _ = post(f"{dep.proxy}/v1/completions", {"prompt": "hi"},
                           headers={"Authorization": "Bearer k"})
    assert status == 200, body
    assert p.headers[-1]["Authorization"] == "Bearer k" == d.headers[-1]["Authorization"]


@pytest.mark.parametrize("stream", [False, True])
def test_a_queue_timeout_is_tried_on_another_instance_of_each_role(make, stream):
    p1, p2 = Backend("prefill", "queue_timeout"), Backend("prefill")
    d1, d2 = Backend("decode", "queue_timeout"), Backend("decode")
    dep = make([p1, p2], [d1, d2])
    for i in range(2):  # round robin: both orders
        status, body, _ = post(f"{dep.proxy}/v1/completions",
                               {"prompt": "hi", "stream": stream},
                               headers={"X-Request-Id": f"q-{stream}-{i}"})
        assert status == 200, body
        text = body if stream else body["choices"][0]["text"]
        assert "ello" in (text if isinstance(text, str) else json.dumps(text))
    assert len(p2.calls) == 2 and len(d2.calls) == 2  # every request landed on the free ones
    assert p1.aborts == [] and p2.aborts == []  # nothing failed after P answered


def test_other_errors_are_not_retried(make):
    p1, p2 = Backend("prefill", "other_503"), Backend("prefill", "other_503")
    dep = make([p1, p2], [Backend("decode")])
    status, body, _ = post(f"{dep.proxy}/v1/completions", {"prompt": "hi"})
    assert status == 503 and body == OTHER_503
    assert len(p1.calls) + len(p2.calls) == 1  # the backend may have seen it: no retry


def test_the_last_instance_answering_queue_timeout_passes_it_through(make):
    p = Backend("prefill", "queue_timeout")
    dep = make([p], [Backend("decode")])
    status, body, _ = post(f"{dep.proxy}/v1/completions", {"prompt": "hi"})
    assert status == 503 and body["error"]["code"] == "queue_timeout"


def test_the_proxy_releases_p_with_an_internal_token(make):
    p, d = Backend("prefill"), Backend("decode", "fail")
    dep = make([p], [d], secret=SECRET)
    assert post(f"{dep.proxy}/v1/completions", {"prompt": "hi"},
                headers={"X-Request-Id": "rel-1"})[0] == 500
    assert wait_until(lambda: len(p.aborts) == 1)
    rid, headers = p.aborts[0]
    assert rid == "rel-1"
    assert internal_token_ok(headers[INTERNAL_AUTH_HEADER], SECRET, "abort", "rel-1")


@pytest.mark.parametrize("proxy_secret", [SECRET, None])
def test_a_real_prefill_instance_serves_and_frees_held_state_only_for_the_secret(
        make, proxy_secret):
    holder = Deployment([Backend("prefill")], [Backend("decode")])  # just a loop + cleanup
    try:
        p_url = holder.real_prefill(SECRET)
        dep = make([p_url], [Backend("decode", "fail")], secret=proxy_secret)
        status = post(f"{dep.proxy}/v1/completions", {"prompt": "hi", "max_tokens": 5},
                      headers={"X-Request-Id": f"real-{proxy_secret is not None}"})[0]
        if proxy_secret:  # D fails; the proxy releases P's state with its internal token
            assert status == 500
            assert wait_until(lambda: get(f"{p_url}/v1/pool")[1]["used_blocks"] == 0)
        else:  # without the secret P issues no hand-off at all, so nothing is ever held
            assert status == 403
            assert get(f"{p_url}/v1/pool")[1]["used_blocks"] == 0
    finally:
        holder.close()
