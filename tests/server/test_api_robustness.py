"""The instance API under hostile or unlucky input: huge prompts, lone surrogates, duplicate ids,
unexpected engine-side errors (fake engine in a real engine process, or a stub client)."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch
from fakes import FakeTokenizer
from harness import MODEL, start_fake_instance
from http_util import engine_counter, get, post, wait_until

from hybridpd.httpkit.site import start_site
from hybridpd.server.api import build_app
from hybridpd.server.engine_client import DuplicateRequestError
from hybridpd.server.serving import ServerConfig

torch.set_num_threads(1)
HUGE_CHARS = 3_000_000
HANG_GUARD_S = 30.0  # only a hang reaches it: never a bound on how fast
HUGE_ENTERED = threading.Event()  # the tokenizer is busy with a huge text...
HUGE_RELEASE = threading.Event()  # ...until the test lets it finish


class SlowTokenizer(FakeTokenizer):
    """Stays busy on texts over a megabyte (as a real tokenizer does on huge ones) until the
    test sets HUGE_RELEASE."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if len(text) > 1_000_000:
            HUGE_ENTERED.set()
            HUGE_RELEASE.wait(HANG_GUARD_S)
        return super().encode(text, add_special_tokens)


@pytest.fixture(scope="module")
def base(loop_thread):
    inst = start_fake_instance(loop_thread, delay_s=0.002, tokenizer=SlowTokenizer())
    try:
        yield f"http://127.0.0.1:{inst.port}"
    finally:
        loop_thread.call(inst.stop())


def test_health_answers_while_a_huge_prompt_is_tokenized(base):
    result: dict = {}

    def huge() -> None:
        result["r"] = post(f"{base}/v1/completions", {"prompt": "x" * HUGE_CHARS})

    HUGE_ENTERED.clear()
    HUGE_RELEASE.clear()
    t = threading.Thread(target=huge)
    t.start()
    try:
        assert HUGE_ENTERED.wait(HANG_GUARD_S), "the huge prompt never reached the tokenizer"
        for _ in range(3):  # a blocked event loop would answer none until the release
            assert get(f"{base}/health")[0] == 200
        assert t.is_alive() and "r" not in result  # still tokenizing meanwhile
    finally:
        HUGE_RELEASE.set()
    t.join(HANG_GUARD_S)
    status, body, _ = result["r"]
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"
    assert body["error"]["param"] == "prompt"


@pytest.mark.parametrize("path,raw,param", [
    ("/v1/completions", rb'{"prompt": "\ud800", "max_tokens": 2}', "prompt"),
    ("/v1/completions", rb'{"prompt": "ok", "stop": "\udc00", "max_tokens": 2}', "stop"),
    ("/v1/chat/completions",
     rb'{"messages": [{"role": "user", "content": "a\ud83d"}], "max_tokens": 2}', "messages"),
])
def test_lone_surrogates_answer_400_naming_the_field(base, path, raw, param):
    status, body, _ = post(f"{base}{path}", raw=raw)
    assert status == 400, body
    assert body["error"]["param"] == param and body["error"]["type"] == "invalid_request_error"
    # a valid surrogate pair is ordinary text
    status, body, _ = post(f"{base}/v1/completions",
                           raw=rb'{"prompt": "\ud83d\ude00", "max_tokens": 2}')
    assert status == 200, body


def test_min_tokens_above_the_default_max_tokens_is_400(base):
    status, body, _ = post(f"{base}/v1/completions", {"prompt": "hi", "min_tokens": 17})
    assert status == 400 and body["error"]["param"] == "min_tokens", body


def test_id_still_held_by_the_engine_runs_under_a_unique_engine_id(base):
    """P holds a finished request's state for D: the same client id again is served under a
    unique engine id (the client still sees its own), and /v1/abort of the client's id
    releases the state of both."""
    kv = {"do_remote_decode": True}
    released = engine_counter(base, "held_released")
    status, body, headers = post(f"{base}/v1/completions",
                                 {"prompt": "hi", "max_tokens": 5, "kv_transfer_params": kv},
                                 headers={"X-Request-Id": "held-1"})
    assert status == 200 and body["kv_transfer_params"]["request_id"] == "held-1"
    status, again, headers = post(f"{base}/v1/completions",
                                  {"prompt": "hi", "max_tokens": 2, "kv_transfer_params": kv},
                                  headers={"X-Request-Id": "held-1"})
    assert status == 200 and again["id"] == "held-1" and headers["X-Request-Id"] == "held-1"
    engine_id = again["kv_transfer_params"]["request_id"]
    assert engine_id.startswith("held-1-") and engine_id != "held-1", again
    status, body, _ = post(f"{base}/v1/abort", {"request_id": "held-1"})
    assert status == 200 and body["aborted"] is True
    assert wait_until(lambda: engine_counter(base, "held_released") == released + 2)
    assert post(f"{base}/v1/completions", {"prompt": "hi", "max_tokens": 2},
                headers={"X-Request-Id": "held-1"})[0] == 200


class RaisingClient:
    """An EngineClient stand-in whose generate() fails at once with `exc`."""

    healthy, dead_reason, num_in_flight = True, None, 0

    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    async def generate(self, req: Any) -> Any:
        raise self.exc
        yield  # an async generator, like the real one

    async def abort(self, request_id: str) -> None:
        return None


@pytest.mark.parametrize("exc,status", [
    (DuplicateRequestError("request id 'x' is already in flight"), 409),
    (ValueError("some other invalid value"), 400),
])
def test_only_duplicate_ids_are_409(loop_thread, exc, status):
    config = ServerConfig(model_name=MODEL, max_model_len=256)
    app = build_app(RaisingClient(exc), FakeTokenizer(), config)  # type: ignore[arg-type]
    runner, port = loop_thread.call(start_site(app, "127.0.0.1", 0))
    try:
        got, body, _ = post(f"http://127.0.0.1:{port}/v1/completions", {"prompt": "hi"})
        assert got == status and body["error"]["message"] == str(exc), body
    finally:
        loop_thread.call(runner.cleanup())
