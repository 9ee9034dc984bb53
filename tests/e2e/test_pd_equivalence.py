"""P/D through the proxy equals a co-located instance token for token (real processes, real
HTTP, real NIXL over UCX loopback): 1P1D and 2P2D, two layer patterns, both handoff modes,
prompt lengths from 1 to several logical blocks, completions and chat, streaming and not.
Bytes moved per request are exactly the request's K/V + conv + SSM bytes."""

from __future__ import annotations

import pytest

from .cluster import (
    KB,
    block_tokens,
    completion,
    post,
    state_bytes,
    stream,
    wait_pool_free,
)

CASES = [
    (1, 1, "tiny", "first-token"),
    (1, 1, "tiny", "n-1"),
    (1, 1, "small", "first-token"),
    (1, 1, "small", "n-1"),
    (2, 2, "tiny", "first-token"),
    (2, 2, "small", "n-1"),
]


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c[0]}P{c[1]}D-{c[2]}-{c[3]}")
def case(request, e2e_models, pool):
    n_p, n_d, model, handoff = request.param
    dep = pool.deployment(e2e_models[model], num_prefill=n_p, num_decode=n_d, handoff=handoff)
    return dep, model, handoff


def _name(path: str) -> str:
    from pathlib import Path

    return Path(path).name


def _lengths(model_dir: str) -> list[int]:
    bt = block_tokens(model_dir)
    return [1, 2, KB - 1, bt, 2 * bt + 3]


def test_completions_match_colocated(case, e2e_models, references):
    dep, model, handoff = case
    path = e2e_models[model]
    ref = references[model].url
    name = _name(path)
    for i, n in enumerate(_lengths(path)):
        prompt = [(13 * j + 5 * i) % 300 + 3 for j in range(n)]
        s_ref, want = completion(ref, name, prompt, 12)
        s_pd, got = completion(dep.url, name, prompt, 12)
        assert s_ref == 200 and s_pd == 200, (want, got)
        assert got["choices"][0]["token_ids"] == want["choices"][0]["token_ids"], f"len {n}"
        assert got["choices"][0]["text"] == want["choices"][0]["text"]
        stats = got.get("kv_transfer_stats")
        state_tokens = n if handoff == "first-token" else n - 1
        if state_tokens == 0:
            continue
        assert stats and stats["outcome"] == "ok", got
        assert [stats["bytes"]] == state_bytes(path, state_tokens)
        assert 0 < stats["descriptors"] <= 64
    for child in dep.prefill + dep.decode:
        pool = wait_pool_free(child.url)
        assert pool["free_blocks"] == pool["total_blocks"], (child.name, pool)


def test_streaming_and_chat_match_colocated(case, e2e_models, references):
    dep, model, _ = case
    path = e2e_models[model]
    ref = references[model].url
    name = _name(path)
    prompt = [(7 * j) % 300 + 3 for j in range(block_tokens(path) + 5)]
    body = {"model": name, "prompt": prompt, "max_tokens": 12, "temperature": 0,
            "ignore_eos": True}
    _, want = post(ref + "/v1/completions", body)
    chunks = stream(dep.url + "/v1/completions", body)
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == \
        want["choices"][0]["text"]
    assert len(chunks) >= 2, "the first token must arrive as its own chunk"
    chat = {"model": name, "messages": [{"role": "user", "content": "hello there, decode!"}],
            "max_tokens": 10, "temperature": 0}
    _, want_chat = post(ref + "/v1/chat/completions", {**chat, "ignore_eos": True})
    _, got_chat = post(dep.url + "/v1/chat/completions", {**chat, "ignore_eos": True})
    assert got_chat["choices"][0]["message"]["content"] == \
        want_chat["choices"][0]["message"]["content"]
    chat_chunks = stream(dep.url + "/v1/chat/completions", {**chat, "ignore_eos": True})
    streamed = "".join(c["choices"][0]["delta"].get("content") or ""
                       for c in chat_chunks if c["choices"])
    assert streamed == want_chat["choices"][0]["message"]["content"]
    for child in dep.prefill + dep.decode:
        pool = wait_pool_free(child.url)
        assert pool["free_blocks"] == pool["total_blocks"], (child.name, pool)


def test_openai_client_against_the_proxy(case, e2e_models, references):
    openai = pytest.importorskip("openai")
    dep, model, _ = case
    name = _name(e2e_models[model])
    client = openai.OpenAI(base_url=dep.url + "/v1", api_key="unused", max_retries=0)
    ref = openai.OpenAI(base_url=references[model].url + "/v1", api_key="unused")
    kw = dict(model=name, max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    got = client.completions.create(prompt="state travels over NIXL", **kw)
    want = ref.completions.create(prompt="state travels over NIXL", **kw)
    assert got.choices[0].text == want.choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        prompt="state travels over NIXL", stream=True, **kw) if c.choices)
    assert streamed == want.choices[0].text
    msgs = [{"role": "user", "content": "hi"}]
    chat = client.chat.completions.create(messages=msgs, **kw)
    assert chat.choices[0].message.content == \
        ref.chat.completions.create(messages=msgs, **kw).choices[0].message.content
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=name, prompt="x", max_tokens=-3)
    assert "max_tokens" in str(err.value)
