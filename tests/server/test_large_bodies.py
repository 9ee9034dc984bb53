"""A 60 MB token-id list (under an operator's 64 MiB body limit) must not stall other streams:
it is judged in the helper process, refused with a 400, and meanwhile a concurrent stream
keeps receiving tokens and a small request sent after it completes before it is answered.
Also the proxy-facing card field and the instance's abort authentication (internal token)."""

from __future__ import annotations

import asyncio
import functools
import json

import aiohttp
import pytest
from fakes import FakeTokenizer, make_fake_engine
from harness import MODEL
from http_util import get, post

from hybridpd.disagg.auth import HANDOFF_AUTH_HEADER, sign_handoff_request
from hybridpd.httpkit.auth import INTERNAL_AUTH_HEADER, internal_token
from hybridpd.server.runtime import start_instance
from hybridpd.server.serving import ServerConfig

BIG_BODY_BYTES = 60 * 1024 * 1024
MAX_MODEL_LEN = 8192
SECRET = "deployment-secret"
DEADLINE_S = 120.0


@pytest.fixture(scope="module")
def base(loop_thread):
    config = ServerConfig(model_name=MODEL, max_model_len=MAX_MODEL_LEN, role="prefill",
                          max_body_bytes=64 * 1024 * 1024, deployment_secret=SECRET)
    factory = functools.partial(make_fake_engine, 0.005, "fake")
    inst = loop_thread.call(start_instance(factory, FakeTokenizer(), config,
                                           startup_timeout_s=60.0))
    try:
        yield f"http://127.0.0.1:{inst.port}"
    finally:
        loop_thread.call(inst.stop())


def big_token_list() -> bytes:
    n = BIG_BODY_BYTES // 2
    return b'{"prompt": [' + b"1," * (n - 1) + b'1], "max_tokens": 1}'


async def _scenario(base: str) -> dict:
    timeout = aiohttp.ClientTimeout(total=DEADLINE_S)
    async with aiohttp.ClientSession(timeout=timeout) as s:
        stream = await s.post(f"{base}/v1/completions", json={
            "prompt": "hi", "max_tokens": 4000, "stream": True})
        assert stream.status == 200
        seen = {"chunks": 0}
        first = asyncio.Event()

        async def read_stream() -> None:
            async for line in stream.content:
                if line.startswith(b"data: "):
                    seen["chunks"] += 1
                    first.set()

        reader = asyncio.create_task(read_stream())
        await asyncio.wait_for(first.wait(), DEADLINE_S)

        async def big() -> tuple[int, str]:
            async with s.post(f"{base}/v1/completions", data=big_token_list(),
                              headers={"Content-Type": "application/json"}) as r:
                return r.status, await r.text()

        async def small() -> int:
            async with s.post(f"{base}/v1/completions",
                              json={"prompt": "ok", "max_tokens": 3}) as r:
                await r.read()
                return r.status

        big_task = asyncio.create_task(big())
        await asyncio.sleep(0)  # the big upload is under way before the small request leaves
        small_task = asyncio.create_task(small())
        at_send = seen["chunks"]
        status, text = await big_task
        out = {"big_status": status, "big_text": text, "small_done_first": small_task.done(),
               "chunks_meanwhile": seen["chunks"] - at_send}
        out["small_status"] = await small_task
        reader.cancel()
        stream.close()
        return out


def test_a_60mb_token_list_is_refused_without_stalling_other_streams(base):
    out = asyncio.run(_scenario(base))
    assert out["big_status"] == 400, out["big_text"][:300]
    assert "values" in json.loads(out["big_text"])["error"]["message"]
    assert out["small_done_first"] and out["small_status"] == 200
    assert out["chunks_meanwhile"] > 0  # the stream kept flowing while the body was judged


def test_a_large_but_valid_body_is_decoded_and_served(base):
    status, body, _ = post(f"{base}/v1/completions",
                           {"prompt": "z" * 1_000_000, "max_tokens": 1})
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"  # tokenised
    status, body, _ = post(f"{base}/v1/completions", {"prompt": list(range(1, 200)) * 20,
                                                      "max_tokens": 1})
    assert status == 200, body


def test_the_model_card_advertises_the_body_limit(base):
    status, body, _ = get(f"{base}/v1/models")
    assert status == 200 and body["data"][0]["max_request_bytes"] == 64 * 1024 * 1024


def test_with_a_deployment_secret_abort_needs_the_internal_token(base):
    raw = json.dumps({"prompt": "hi", "max_tokens": 5,
                      "kv_transfer_params": {"do_remote_decode": True}}).encode()
    # a hand-off is issued only to the deployment's proxy: sign the request as the proxy does
    auth = {"X-Request-Id": "held-a",
            HANDOFF_AUTH_HEADER: sign_handoff_request(SECRET, "held-a", raw)}
    status, body, _ = post(f"{base}/v1/completions", raw=raw, headers=auth)
    assert status == 200 and body["kv_transfer_params"] is not None
    assert post(f"{base}/v1/abort", {"request_id": "held-a"})[0] == 401
    forged = {INTERNAL_AUTH_HEADER: internal_token("wrong-secret", "abort", "held-a")}
    assert post(f"{base}/v1/abort", {"request_id": "held-a"}, headers=forged)[0] == 401
    other = {INTERNAL_AUTH_HEADER: internal_token(SECRET, "abort", "held-b")}  # another id
    assert post(f"{base}/v1/abort", {"request_id": "held-a"}, headers=other)[0] == 401
    assert get(f"{base}/v1/pool")[1]["used_blocks"] == 1  # still held: nothing was aborted
    good = {INTERNAL_AUTH_HEADER: internal_token(SECRET, "abort", "held-a")}
    status, body, _ = post(f"{base}/v1/abort", {"request_id": "held-a"}, headers=good)
    assert status == 200 and body["aborted"] is True
    status, body, _ = post(f"{base}/v1/abort", {"request_id": "held-a"}, headers=good)
    assert status == 404 and body["aborted"] is False  # truthful: it is gone now
