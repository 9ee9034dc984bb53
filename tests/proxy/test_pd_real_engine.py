"""End to end with the real engine: proxy -> prefill instance -> NIXL (UCX loopback) -> decode
instance, each instance a real API process + engine process on the tiny demo model.

Greedy text through P/D equals the co-located instance's, streaming and not, completions and
chat, in both handoff modes; afterwards both pools are completely free.
"""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
import torch
from http_util import engine_counter, get, metric_value, parse_sse, post, wait_until
from real_deployment import real_deployment

from hybridpd.server.serving import ServerConfig

torch.set_num_threads(1)
MAX_MODEL_LEN = 512


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    from hybridpd.demo.writer import write_demo_model

    path = tmp_path_factory.mktemp("models") / "tiny"
    return str(write_demo_model(path, preset="tiny", seed=3).path)


@pytest.fixture(scope="module")
def deployment(model_dir):
    """{handoff: proxy URL} plus the co-located URL and every instance URL."""
    with real_deployment(model_dir, ServerConfig("tiny", MAX_MODEL_LEN)) as urls:
        yield urls


def _text(base: str, path: str, body: dict) -> str:
    chat = "chat" in path
    status, resp, _ = post(f"{base}{path}", body)
    assert status == 200, resp
    if not body.get("stream"):
        choice = resp["choices"][0]
        return choice["message"]["content"] if chat else choice["text"]
    events = parse_sse(resp)
    assert events[-1] == "[DONE]"
    if chat:
        return "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1])
    return "".join(e["choices"][0]["text"] for e in events[:-1])


@pytest.mark.parametrize("handoff", ["first-token", "n-1"])
def test_pd_through_proxy_matches_colocated(deployment, handoff):
    cases = [
        ("/v1/completions", {"prompt": "Hello there, tiny model", "max_tokens": 9}),
        ("/v1/completions", {"prompt": "x" * 40, "max_tokens": 5, "stream": True}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                  "max_tokens": 6}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hey you"}],
                                  "max_tokens": 7, "stream": True}),
    ]
    d_url = deployment["instances"][1 if handoff == "first-token" else 3]
    before = engine_counter(d_url, "kv_transfers_ok")
    for path, body in cases:
        body = {**body, "temperature": 0, "ignore_eos": True}
        want = _text(deployment["both"], path, body)
        assert _text(deployment[handoff], path, body) == want, (path, body)
    status, resp, _ = post(f"{deployment[handoff]}/v1/completions",
                           {"prompt": "count", "max_tokens": 6, "temperature": 0,
                            "ignore_eos": True})
    assert resp["usage"]["completion_tokens"] == 6
    assert engine_counter(d_url, "kv_transfers_ok") == before + len(cases) + 1


async def _disconnect_mid_stream(url: str) -> None:
    async with aiohttp.ClientSession() as s:
        body = {"prompt": "go on", "max_tokens": 400, "ignore_eos": True, "stream": True}
        async with s.post(f"{url}/v1/completions", json=body) as r:
            assert r.status == 200
            await r.content.readuntil(b"\n\n")
            await r.content.readuntil(b"\n\n")


def test_pools_are_free_after_requests_and_disconnects(deployment):
    for handoff in ("first-token", "n-1"):
        asyncio.run(_disconnect_mid_stream(deployment[handoff]))
    for url in deployment["instances"]:
        assert wait_until(lambda u=url: get(f"{u}/v1/pool")[1]["used_blocks"] == 0), url
    for d_url in (deployment["instances"][1], deployment["instances"][3]):
        decode_metrics = get(f"{d_url}/metrics")[1]
        assert metric_value(decode_metrics, "hybridpd_kv_transfer_outcomes_total",
                            outcome="ok") >= 1
        assert metric_value(decode_metrics, "hybridpd_requests_total",
                            finish_reason="abort") == 1


def _choice_texts(base: str, path: str, body: dict) -> list[str]:
    chat = "chat" in path
    status, resp, _ = post(f"{base}{path}", body)
    assert status == 200, resp
    texts: dict[int, str] = {}
    if not body.get("stream"):
        for c in resp["choices"]:
            texts[c["index"]] = c["message"]["content"] if chat else c["text"]
    else:
        events = parse_sse(resp)
        assert events[-1] == "[DONE]"
        for e in events[:-1]:
            for c in e.get("choices") or ():
                piece = (c["delta"].get("content") or "") if chat else c["text"]
                texts[c["index"]] = texts.get(c["index"], "") + piece
    return [texts[i] for i in sorted(texts)]


@pytest.mark.parametrize("handoff", ["first-token", "n-1"])
def test_n_through_proxy_forks_on_decode(deployment, handoff):
    """n = 3 through P/D: P prefills once (n = 1), D forks after one transfer; greedy choices
    equal the co-located single answer, seeded ones (n-1 hand-off) the co-located n = 3."""
    p_url, d_url = deployment["instances"][0 if handoff == "first-token" else 2:][:2]
    forks, transfers = engine_counter(d_url, "forks"), engine_counter(d_url, "kv_transfers_ok")
    p_prompt = engine_counter(p_url, "prompt_tokens_computed")
    cases = [
        ("/v1/completions", {"prompt": "Hello there, tiny model", "max_tokens": 7}),
        ("/v1/completions", {"prompt": "three ways", "max_tokens": 5, "stream": True}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                  "max_tokens": 6, "stream": True}),
    ]
    for path, body in cases:
        body = {**body, "temperature": 0, "ignore_eos": True}
        one = _choice_texts(deployment["both"], path, body)
        assert _choice_texts(deployment[handoff], path, {**body, "n": 3}) == one * 3
    assert engine_counter(d_url, "forks") - forks == len(cases)
    assert engine_counter(d_url, "kv_transfers_ok") - transfers == len(cases)
    prompt_tokens = engine_counter(p_url, "prompt_tokens_computed") - p_prompt
    colocated = deployment["both"]
    before = engine_counter(colocated, "prompt_tokens_computed")
    for path, body in cases:  # the same prompts once more, co-located, n = 1
        _choice_texts(colocated, path, {**body, "temperature": 0, "ignore_eos": True})
    once = engine_counter(colocated, "prompt_tokens_computed") - before
    # P computed each prompt once (n-1: all but its last token, which D computes)
    assert prompt_tokens == once - (len(cases) if handoff == "n-1" else 0)
    seeded = {"prompt": "roll the dice", "max_tokens": 6, "temperature": 1.0, "seed": 99,
              "n": 3, "ignore_eos": True}
    if handoff == "n-1":
        want = _choice_texts(colocated, "/v1/completions", seeded)
        assert _choice_texts(deployment[handoff], "/v1/completions", seeded) == want
    else:  # every sample would start with P's one token: refused by D with a clear 400
        status, resp, _ = post(f"{deployment[handoff]}/v1/completions", seeded)
        assert status == 400 and "n-1" in resp["error"]["message"], resp
    # a list of prompts: one P/D flow per prompt, choices in prompt order
    listed = {"prompt": ["a cat", "two dogs", "x", "seven"], "max_tokens": 5,
              "temperature": 0, "ignore_eos": True, "n": 2}
    want = _choice_texts(colocated, "/v1/completions", listed)
    assert len(want) == 8
    status, resp, _ = post(f"{deployment[handoff]}/v1/completions", listed)
    assert status == 200, resp
    assert [c["index"] for c in resp["choices"]] == list(range(8))
    assert [c["text"] for c in resp["choices"]] == want
    status, colo, _ = post(f"{colocated}/v1/completions", listed)
    assert resp["usage"] == colo["usage"]
    # streamed too (tests/proxy/test_pd_choice_streams.py has the chunk-level checks)
    assert _choice_texts(deployment[handoff], "/v1/completions", {**listed, "stream": True}) \
        == want
    for url in deployment["instances"]:  # every fork, hand-off and refusal freed its blocks
        assert wait_until(lambda u=url: get(f"{u}/v1/pool")[1]["used_blocks"] == 0), url
