"""Loglikelihood scoring through a whole deployment (pooled instances started as `up` starts
them: proxy, signed hand-offs, real processes, NIXL over UCX loopback): echo + logprobs +
max_tokens = 0 equals the co-located instance's answer (which tests/proxy/test_prompt_scoring.py
checks against transformers' log-softmax); with generation, P's echoed prompt and scores are
merged before D's tokens; afterwards both pools are free."""

from __future__ import annotations

import pytest

from .cluster import post, wait_pool_free


@pytest.fixture(scope="module")
def deployment(e2e_models, pool):
    return pool.deployment(e2e_models["tiny"], handoff="first-token")


def _close(a: list, b: list) -> bool:
    return len(a) == len(b) and all((x is None and y is None) or abs(x - y) < 1e-5
                                    for x, y in zip(a, b))


@pytest.mark.parametrize("max_tokens", [0, 6])
def test_scoring_through_pd_equals_colocated(deployment, references, max_tokens):
    body = {"model": "tiny", "prompt": "417+285=702, 31+4=35", "max_tokens": max_tokens,
            "echo": True, "logprobs": 2, "temperature": 0, "ignore_eos": True,
            "prompt_logprobs": 1}
    s_ref, want = post(references["tiny"].url + "/v1/completions", body)
    s_pd, got = post(deployment.url + "/v1/completions", body)
    assert s_ref == 200 and s_pd == 200, (want, got)
    w, g = want["choices"][0], got["choices"][0]
    assert g["text"] == w["text"] and g["text"].startswith(body["prompt"])
    assert g["finish_reason"] == w["finish_reason"] == "length"
    assert got["usage"] == want["usage"]
    assert g["logprobs"]["tokens"] == w["logprobs"]["tokens"]
    assert g["logprobs"]["text_offset"] == w["logprobs"]["text_offset"]
    assert _close(g["logprobs"]["token_logprobs"], w["logprobs"]["token_logprobs"])
    n_prompt = want["usage"]["prompt_tokens"]
    assert len(g["logprobs"]["tokens"]) == n_prompt + max_tokens
    assert len(g["prompt_logprobs"]) == n_prompt and g["prompt_logprobs"][0] is None
    for child in deployment.prefill + deployment.decode:
        pool = wait_pool_free(child.url)
        assert pool["free_blocks"] == pool["total_blocks"], (child.name, pool)
