"""n > 1 and lists of prompts over HTTP, with the real engine on the tiny demo model.

n = 3 returns three choices (streamed too) whose greedy text equals one request's and whose
seeded samples are reproducible, with the prompt computed once (the engine's counter); a list of
4 prompts (text or token ids) returns 4 choices in order, each equal to its single answer.
"""

from __future__ import annotations

import functools

import pytest
import torch
from harness import LoopThread
from http_util import engine_counter, get, metric_value, parse_sse, post

from hybridpd.engine.args import EngineArgs
from hybridpd.engine.core import build_engine_core
from hybridpd.server.runtime import start_instance
from hybridpd.server.serving import ServerConfig
from hybridpd.tokenizer import Tokenizer

torch.set_num_threads(1)
MAX_MODEL_LEN = 512
PROMPTS = ["The quick brown fox", "Once upon a time", "1, 2, 3,", "Hello"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from hybridpd.demo.writer import write_demo_model

    model_dir = str(write_demo_model(tmp_path_factory.mktemp("models") / "tiny",
                                     preset="tiny", seed=3).path)
    lt = LoopThread()
    args = EngineArgs(model_dir=model_dir, device="cpu", cache_memory=8 << 20,
                      kernel_block_size=4, max_model_len=MAX_MODEL_LEN)
    config = ServerConfig("tiny", MAX_MODEL_LEN)
    inst = lt.call(start_instance(functools.partial(build_engine_core, args),
                                  Tokenizer.from_dir(model_dir), config,
                                  startup_timeout_s=120.0), timeout=180.0)
    try:
        yield f"http://127.0.0.1:{inst.port}"
    finally:
        lt.call(inst.stop())
        lt.close()


def _metric(base: str, name: str) -> float:
    status, text, _ = get(f"{base}/metrics")
    assert status == 200
    return metric_value(text, f"hybridpd_{name}")


def _complete(base: str, **body) -> dict:
    status, out, _ = post(f"{base}/v1/completions", {"max_tokens": 8, "ignore_eos": True,
                                                      **body})
    assert status == 200, out
    return out


def _streamed(base: str, path: str = "/v1/completions", **body) -> list:
    status, text, _ = post(f"{base}{path}", {"max_tokens": 8, "ignore_eos": True,
                                             "stream": True, **body})
    assert status == 200, text
    events = parse_sse(text)
    assert events[-1] == "[DONE]"
    return events[:-1]


def _by_index(events: list, key: str = "text") -> dict[int, str]:
    out: dict[int, str] = {}
    for e in events:
        for c in e["choices"]:
            piece = c[key] if key == "text" else c["delta"].get("content", "")
            out[c["index"]] = out.get(c["index"], "") + piece
    return out


def test_n3_greedy_equals_one_request_and_prefills_once(base):
    prompt = PROMPTS[0]
    one = _complete(base, prompt=prompt, temperature=0)["choices"][0]["text"]
    before = engine_counter(base, "prompt_tokens_computed")
    forks = engine_counter(base, "forks")
    served = _metric(base, "prompt_tokens_total"), _metric(base, "generation_tokens_total")
    out = _complete(base, prompt=prompt, temperature=0, n=3)
    assert [c["index"] for c in out["choices"]] == [0, 1, 2]
    assert [c["text"] for c in out["choices"]] == [one] * 3
    assert all(c["finish_reason"] == "length" for c in out["choices"])
    assert out["usage"]["completion_tokens"] == 24
    n_prompt = out["usage"]["prompt_tokens"]
    assert engine_counter(base, "prompt_tokens_computed") - before == n_prompt  # once
    assert engine_counter(base, "forks") - forks == 1
    # the API's counters: the prompt once, every choice's tokens
    assert _metric(base, "prompt_tokens_total") - served[0] == n_prompt
    assert _metric(base, "generation_tokens_total") - served[1] == 24
    events = _streamed(base, prompt=prompt, temperature=0, n=3)
    assert _by_index(events) == {0: one, 1: one, 2: one}
    ends = [(c["index"], c["finish_reason"]) for e in events for c in e["choices"]
            if c["finish_reason"] is not None]
    assert sorted(ends) == [(0, "length"), (1, "length"), (2, "length")]


def test_n3_seeded_is_reproducible(base):
    body = dict(prompt=PROMPTS[1], temperature=1.0, seed=1234, n=3)
    a = [c["text"] for c in _complete(base, **body)["choices"]]
    b = [c["text"] for c in _complete(base, **body)["choices"]]
    assert a == b and len(set(a)) > 1
    # sample i is the single request with seed + i
    single = [_complete(base, prompt=PROMPTS[1], temperature=1.0, seed=1234 + i)["choices"][0][
        "text"] for i in range(3)]
    assert a == single
    streamed = _by_index(_streamed(base, **body))
    assert [streamed[i] for i in range(3)] == a


def test_list_of_prompts_returns_choices_in_order(base, tmp_path):
    singles = [_complete(base, prompt=p, temperature=0)["choices"][0]["text"] for p in PROMPTS]
    out = _complete(base, prompt=PROMPTS, temperature=0)
    assert [c["index"] for c in out["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in out["choices"]] == singles
    streamed = _by_index(_streamed(base, prompt=PROMPTS, temperature=0))
    assert [streamed[i] for i in range(4)] == singles
    # token-id lists, and n with several prompts: prompt-major choices
    ids = [[5, 6, 7], [9, 10, 11, 12]]
    ones = [_complete(base, prompt=p, temperature=0)["choices"][0]["text"] for p in ids]
    two = _complete(base, prompt=ids, temperature=0, n=2)
    assert [c["text"] for c in two["choices"]] == [ones[0], ones[0], ones[1], ones[1]]
    assert two["usage"]["prompt_tokens"] == 7


def test_chat_n2_and_best_of(base):
    msgs = [{"role": "user", "content": "hi"}]
    status, one, _ = post(f"{base}/v1/chat/completions", {"messages": msgs, "max_tokens": 6,
                                                          "temperature": 0})
    assert status == 200, one
    text = one["choices"][0]["message"]["content"]
    status, two, _ = post(f"{base}/v1/chat/completions", {"messages": msgs, "max_tokens": 6,
                                                          "temperature": 0, "n": 2})
    assert status == 200, two
    assert [c["message"]["content"] for c in two["choices"]] == [text, text]
    events = _streamed(base, "/v1/chat/completions", messages=msgs, max_tokens=6,
                       temperature=0, n=2, ignore_eos=False)
    assert _by_index(events, "delta") == {0: text, 1: text}
    best = _complete(base, prompt=PROMPTS[2], temperature=1.0, seed=7, n=2, best_of=4)
    assert [c["index"] for c in best["choices"]] == [0, 1]


@pytest.mark.parametrize("body,param", [
    ({"prompt": "x", "n": 2, "best_of": 3, "stream": True}, "best_of"),
    ({"prompt": "x", "n": 3, "best_of": 2}, "best_of"),
    ({"prompt": "x", "n": 500}, "n"),
    ({"prompt": ["x", "y"], "kv_transfer_params": {"do_remote_decode": True}},
     "kv_transfer_params"),
    ({"prompt": "x", "n": 2, "kv_transfer_params": {"do_remote_decode": True}}, None),
    ({"prompt": "x", "n": 2, "return_token_ids": True}, "return_token_ids"),
    ({"prompt": ["x", []]}, "prompt"),
])
def test_bad_choice_requests_get_400(base, body, param):
    status, out, _ = post(f"{base}/v1/completions", body)
    assert status == 400 and out["error"]["param"] == param, out
    if param is None:  # n > 1 with a hand-off passes the API; this engine is co-located
        assert "--role both" in out["error"]["message"], out


def test_chat_echo_with_n_echoes_in_front_of_every_choice(base):
    """vLLM's chat echo with n > 1: every choice's content starts with the last (assistant)
    message's content; streamed, the role chunk of every choice, then the echo chunk of every
    choice, then the answers."""
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Once upon"}]
    body = {"messages": msgs, "max_tokens": 6, "temperature": 1.0, "seed": 4, "n": 3,
            "ignore_eos": True}
    status, plain, _ = post(f"{base}/v1/chat/completions", body)
    assert status == 200, plain
    answers = [c["message"]["content"] for c in plain["choices"]]
    status, echoed, _ = post(f"{base}/v1/chat/completions", {**body, "echo": True})
    assert status == 200, echoed
    assert [c["message"]["content"] for c in echoed["choices"]] == [
        "Once upon" + a for a in answers]
    assert echoed["usage"] == plain["usage"]  # the echo is no generated token
    events = _streamed(base, "/v1/chat/completions", **body, echo=True)
    heads = [(e["choices"][0]["index"], e["choices"][0]["delta"]) for e in events[:6]]
    assert heads == [(k, {"role": "assistant", "content": ""}) for k in range(3)] + [
        (k, {"content": "Once upon"}) for k in range(3)]
    assert _by_index(events, "delta") == {k: "Once upon" + a for k, a in enumerate(answers)}
