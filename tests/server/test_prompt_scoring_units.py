"""Request fields and response shapes of prompt scoring (no processes): echo, prompt_logprobs
and max_tokens = 0 parsing, the echoed prompt's logprobs, vLLM's prompt_logprobs shape, and
the proxy's decode-leg body and merge of P's prompt scores."""

from __future__ import annotations

import pytest

from hybridpd.engine.protocol import TokenLogprob
from hybridpd.openai import responses as R
from hybridpd.proxy import merge
from hybridpd.server.protocol import ApiError, Endpoint, parse_request

MSGS = [{"role": "user", "content": "x"}]


def text(t: int) -> str:
    return {1: "<s>", 5: "ab", 6: "c", 7: "?", 8: "?"}.get(t, f"t{t}")


def test_echo_logprobs_and_max_tokens_0_parse():
    r = parse_request({"prompt": "hi", "max_tokens": 0, "echo": True, "logprobs": 3},
                      Endpoint.COMPLETIONS)
    p = r.sampling_params(0)
    assert r.echo and p.max_tokens == 0 and p.logprobs == 3 and p.prompt_logprobs == 3
    r = parse_request({"prompt": "hi", "echo": True, "logprobs": 1, "prompt_logprobs": 4},
                      Endpoint.COMPLETIONS)
    assert r.sampling_params(5).prompt_logprobs == 4  # the larger of the two
    r = parse_request({"prompt": "hi", "echo": True}, Endpoint.COMPLETIONS)
    assert r.sampling_params(5).prompt_logprobs is None  # echo alone scores nothing
    r = parse_request({"prompt": "hi", "max_tokens": 0, "prompt_logprobs": 0},
                      Endpoint.COMPLETIONS)
    assert not r.echo and r.sampling_params(0).prompt_logprobs == 0
    r = parse_request({"messages": MSGS, "prompt_logprobs": 2}, Endpoint.CHAT)
    assert r.sampling_params(5).prompt_logprobs == 2


@pytest.mark.parametrize("body, endpoint, param", [
    ({"prompt": "hi", "max_tokens": 0}, Endpoint.COMPLETIONS, "max_tokens"),
    ({"prompt": "hi", "prompt_logprobs": 21}, Endpoint.COMPLETIONS, "prompt_logprobs"),
    ({"prompt": "hi", "prompt_logprobs": -1}, Endpoint.COMPLETIONS, "prompt_logprobs"),
    ({"prompt": "hi", "echo": 1}, Endpoint.COMPLETIONS, "echo"),
    ({"messages": MSGS, "echo": "yes"}, Endpoint.CHAT, "echo"),
    ({"messages": MSGS, "n": 2, "prompt_logprobs": 1}, Endpoint.CHAT, "prompt_logprobs"),
    ({"messages": MSGS, "max_tokens": 0, "prompt_logprobs": 1}, Endpoint.CHAT, "max_tokens"),
    ({"prompt": "hi", "max_tokens": 0, "echo": True, "min_tokens": 1}, Endpoint.COMPLETIONS,
     "min_tokens"),
])
def test_bad_scoring_requests_name_the_field(body, endpoint, param):
    with pytest.raises(ApiError) as e:
        parse_request(body, endpoint)
    assert e.value.status == 400 and e.value.param == param


def test_echo_logprobs_shape():
    lps = (None, TokenLogprob(5, -1.5, ((6, -0.5), (5, -1.5))),
           TokenLogprob(6, -0.25, ((7, -0.2), (8, -0.9), (6, -0.25))))
    out = R.echo_logprobs([1, 5, 6], lps, text)
    assert out["tokens"] == ["<s>", "ab", "c"] and out["text_offset"] == [0, 3, 5]
    assert out["token_logprobs"] == [None, -1.5, -0.25]
    # "?" is the text of tokens 7 and 8: the better one's logprob stays
    assert out["top_logprobs"] == [None, {"c": -0.5, "ab": -1.5}, {"?": -0.2, "c": -0.25}]
    gen = R.completion_logprobs([TokenLogprob(6, -0.1)], text, offset=6)
    joined = R.join_completion_logprobs(out, gen)
    assert joined["tokens"] == ["<s>", "ab", "c", "c"] and joined["text_offset"][-1] == 6
    assert R.echo_logprobs([1, 5], None, text)["token_logprobs"] == [None, None]
    # a BOS the tokenizer added is not in the echoed text: it takes no room
    assert R.echo_logprobs([1, 5, 6], lps, text, added_bos=True)["text_offset"] == [0, 0, 2]


def test_vllm_prompt_logprobs_shape():
    lps = (None, TokenLogprob(5, -1.5, ((6, -0.5), (5, -1.5)), rank=2),
           TokenLogprob(6, -3.0, ((7, -0.2),), rank=9))
    out = R.prompt_logprobs_json(lps, text)
    assert out[0] is None
    assert out[1] == {"5": {"logprob": -1.5, "rank": 2, "decoded_token": "ab"},
                      "6": {"logprob": -0.5, "rank": 1, "decoded_token": "c"}}
    assert out[2] == {"6": {"logprob": -3.0, "rank": 9, "decoded_token": "c"},
                      "7": {"logprob": -0.2, "rank": 1, "decoded_token": "?"}}


@pytest.mark.parametrize("chat", [False, True])
def test_proxy_keeps_p_prompt_scores_and_spares_d_the_prompt(chat):
    body = {"prompt": "hi", "echo": True, "logprobs": 1, "prompt_logprobs": 2, "max_tokens": 4}
    assert merge.decode_leg_body(body) == {"prompt": "hi", "logprobs": 1, "max_tokens": 4}
    scores = [None, {"5": {"logprob": -1.0, "rank": 1, "decoded_token": "ab"}}]
    if chat:
        p_choice = {"message": {"role": "assistant", "content": "A"}, "logprobs": None,
                    "finish_reason": None}
        p_body = {"choices": [p_choice], "prompt_logprobs": scores}
        d_choice = {"index": 0, "message": {"role": "assistant", "content": "B"},
                    "logprobs": None, "finish_reason": "length"}
    else:
        p_body = {"choices": [{"text": "hiA", "logprobs": None, "finish_reason": None,
                               "prompt_logprobs": scores}]}
        d_choice = {"index": 0, "text": "B", "logprobs": None, "finish_reason": "length"}
    p_body["usage"] = {"prompt_tokens": 2, "completion_tokens": 1}
    first = merge.first_piece(p_body, chat)
    d_body = {"choices": [d_choice], "usage": {"prompt_tokens": 2, "completion_tokens": 3}}
    out = merge.merge_final(first, d_body, chat)
    chunk = merge.first_chunk("r", "m", 0, first, chat)
    if chat:
        assert out["prompt_logprobs"] == scores and chunk["prompt_logprobs"] == scores
        assert out["choices"][0]["message"]["content"] == "AB"
    else:
        assert out["choices"][0]["prompt_logprobs"] == scores
        assert out["choices"][0]["text"] == "hiAB"
        assert chunk["choices"][0]["prompt_logprobs"] == scores
    assert out["usage"]["completion_tokens"] == 4
