"""Unit tests of backend choice and of merging the P and D answers (no HTTP)."""

from __future__ import annotations

import pytest
import torch

from hybridpd.proxy import merge
from hybridpd.proxy.routing import BackendRole, NoBackendError, Router

torch.set_num_threads(1)


def test_round_robin_rotates_over_healthy_backends():
    r = Router(["p0", "p1", "p2"], ["d0"], "round-robin")
    r.backends[1].healthy = False
    picks = [r.pick(BackendRole.PREFILL).url for _ in range(4)]
    assert sorted(set(picks)) == ["p0", "p2"] and picks[0] != picks[1]
    assert r.pick(BackendRole.DECODE).url == "d0"


def test_least_loaded_prefers_fewest_in_flight():
    r = Router(["p0"], ["d0", "d1", "d2"], "least-loaded")
    d0, d1, d2 = r.of_role(BackendRole.DECODE)
    d0.in_flight, d1.in_flight, d2.in_flight = 3, 1, 2
    assert r.pick(BackendRole.DECODE) is d1
    with Router.track(d1):
        with Router.track(d1):
            assert r.pick(BackendRole.DECODE) is d2
    assert d1.in_flight == 1


def test_no_healthy_backend_raises():
    r = Router(["p0"], ["d0"], "round-robin")
    r.backends[0].healthy = False
    with pytest.raises(NoBackendError, match="prefill"):
        r.pick(BackendRole.PREFILL)
    with pytest.raises(NoBackendError):
        r.pick(BackendRole.DECODE, exclude=[r.backends[1]])
    with pytest.raises(ValueError):
        Router([], ["d0"], "round-robin")


def _lp(tokens: str, start: int) -> dict:
    return {"tokens": list(tokens), "token_logprobs": [-1.0] * len(tokens),
            "top_logprobs": [{}] * len(tokens),
            "text_offset": list(range(start, start + len(tokens)))}


def test_merge_final_concatenates_text_logprobs_and_usage():
    p = {"choices": [{"text": "A", "logprobs": _lp("A", 0), "finish_reason": "length"}],
         "usage": {"prompt_tokens": 5, "completion_tokens": 1}, "kv_transfer_params": {"x": 1}}
    d = {"id": "r", "choices": [{"text": "BC", "logprobs": _lp("BC", 0),
                                 "finish_reason": "stop"}],
         "usage": {"prompt_tokens": 6, "completion_tokens": 2, "total_tokens": 8}}
    out = merge.merge_final(merge.first_piece(p, chat=False), d, chat=False)
    assert out["choices"][0]["text"] == "ABC" and out["choices"][0]["finish_reason"] == "stop"
    assert out["choices"][0]["logprobs"]["text_offset"] == [0, 1, 2]
    assert out["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
    assert "kv_transfer_params" not in out and d["choices"][0]["text"] == "BC"


def test_rewrite_d_chat_chunks():
    p = {"choices": [{"message": {"content": "A"}, "finish_reason": "length"}],
         "usage": {"prompt_tokens": 5, "completion_tokens": 1}}
    first = merge.first_piece(p, chat=True)
    role = {"choices": [{"delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
    assert merge.rewrite_d_chunk(role, first, chat=True) is None
    usage = {"choices": [], "usage": {"prompt_tokens": 6, "completion_tokens": 4}}
    assert merge.rewrite_d_chunk(usage, first, chat=True)["usage"]["completion_tokens"] == 5
    chunk = {"choices": [{"delta": {"content": "B"}, "finish_reason": None}]}
    assert merge.rewrite_d_chunk(chunk, first, chat=True) == chunk


def test_merge_token_ids_p_then_d_and_keep_d_stats():
    p = {"choices": [{"text": "", "logprobs": None, "finish_reason": "length",
                      "token_ids": [195]}],
         "prompt_token_ids": [1, 2], "usage": {"prompt_tokens": 2, "completion_tokens": 1}}
    stats = {"bytes": 10, "outcome": "ok"}
    d = {"id": "r", "choices": [{"text": "é!", "logprobs": None, "finish_reason": "stop",
                                 "token_ids": [169, 33]}],
         "prompt_token_ids": [1, 2], "kv_transfer_stats": stats,
         "usage": {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}}
    first = merge.first_piece(p, chat=False)
    out = merge.merge_final(first, d, chat=False)
    assert out["choices"][0]["token_ids"] == [195, 169, 33]
    assert out["prompt_token_ids"] == [1, 2] and out["kv_transfer_stats"] == stats
    chunk = merge.first_chunk("r", "m", 0, first, chat=False)
    assert chunk["choices"][0]["token_ids"] == [195] and chunk["prompt_token_ids"] == [1, 2]
    d_chunk = {"id": "r", "prompt_token_ids": [1, 2], "kv_transfer_stats": stats,
               "choices": [{"text": "é", "token_ids": [169], "finish_reason": "stop"}]}
    rewritten = merge.rewrite_d_chunk(d_chunk, first, chat=False)
    assert "prompt_token_ids" not in rewritten and rewritten["kv_transfer_stats"] == stats
    assert rewritten["choices"][0]["token_ids"] == [169]
    plain = merge.first_piece({"choices": [{"text": "A"}], "usage": {}}, chat=False)
    assert "token_ids" not in merge.first_chunk("r", "m", 0, plain, chat=False)["choices"][0]
