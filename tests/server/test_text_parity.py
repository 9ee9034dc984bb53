"""`LLM` and the API server share one text pipeline: the same request gives the same text.

Real engine on the tiny demo model (random weights: its output has multi-byte characters split
across tokens). Stop strings are taken from the unconstrained output so that they span token
boundaries; each case runs through `LLM.generate`, a non-streamed and a streamed completions
request, and all three must agree on text and finish reason, and the text must be what the
stop-string definition says (the unconstrained text cut before the stop, or after it with
include_stop_str_in_output).
"""

from __future__ import annotations

import functools
from dataclasses import replace

import pytest
import torch
from harness import LoopThread
from http_util import parse_sse, post

from hybridpd.engine.args import EngineArgs
from hybridpd.engine.core import build_engine_core
from hybridpd.engine.llm import LLM, CompletionOutput
from hybridpd.request import SamplingParams
from hybridpd.server.runtime import start_instance
from hybridpd.server.serving import ServerConfig
from hybridpd.text_pipeline import DEFAULT_TEXT, TextOptions
from hybridpd.tokenizer import Tokenizer

torch.set_num_threads(1)
MAX_MODEL_LEN = 512
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(LLM, server base URL) on the same model."""
    from hybridpd.demo.writer import write_demo_model

    model_dir = str(write_demo_model(tmp_path_factory.mktemp("models") / "tiny",
                                     preset="tiny", seed=3).path)
    kw = dict(device="cpu", cache_memory=8 << 20, kernel_block_size=4,
              max_model_len=MAX_MODEL_LEN)
    llm = LLM(model_dir, **kw)
    lt = LoopThread()
    inst = lt.call(start_instance(functools.partial(build_engine_core,
                                                    EngineArgs(model_dir=model_dir, **kw)),
                                  Tokenizer.from_dir(model_dir),
                                  ServerConfig("tiny", MAX_MODEL_LEN),
                                  startup_timeout_s=120.0), timeout=180.0)
    try:
        yield llm, f"http://127.0.0.1:{inst.port}"
    finally:
        lt.call(inst.stop())
        lt.close()
        llm.close()


def _prompt(llm: LLM) -> list[int]:
    return llm.tokenizer.encode("The quick brown fox")


def _body(prompt: list[int], params: SamplingParams, text: TextOptions) -> dict:
    body: dict = {"prompt": prompt, "max_tokens": params.max_tokens,
                  "temperature": params.temperature, "ignore_eos": params.ignore_eos,
                  "stop": list(params.stop), "n": params.n,
                  "skip_special_tokens": text.skip_special_tokens,
                  "include_stop_str_in_output": text.include_stop_str_in_output}
    if params.seed is not None:
        body["seed"] = params.seed
    if params.logit_bias:
        body["logit_bias"] = {str(t): b for t, b in params.logit_bias}
    if params.allowed_token_ids is not None:
        body["allowed_token_ids"] = list(params.allowed_token_ids)
    return body


def _server(base: str, body: dict) -> list[tuple[str, str]]:
    status, out, _ = post(f"{base}/v1/completions", body)
    assert status == 200, out
    return [(c["text"], c["finish_reason"]) for c in sorted(out["choices"],
                                                            key=lambda c: c["index"])]


def _server_streamed(base: str, body: dict) -> list[tuple[str, str]]:
    status, text, _ = post(f"{base}/v1/completions", {**body, "stream": True})
    assert status == 200, text
    events = parse_sse(text)
    assert events[-1] == "[DONE]"
    texts: dict[int, str] = {}
    reasons: dict[int, str] = {}
    for e in events[:-1]:
        for c in e["choices"]:
            texts[c["index"]] = texts.get(c["index"], "") + c["text"]
            if c["finish_reason"] is not None:
                assert c["index"] not in reasons, "a choice finished twice"
                reasons[c["index"]] = c["finish_reason"]
    return [(texts[i], reasons[i]) for i in sorted(texts)]


def _llm(llm: LLM, prompt: list[int], params: SamplingParams,
         text: TextOptions) -> list[CompletionOutput]:
    outs = llm.generate([prompt], params, text)
    return sorted(outs, key=lambda o: o.index)


def _all_three(llm: LLM, base: str, prompt: list[int], params: SamplingParams,
               text: TextOptions = DEFAULT_TEXT) -> list[tuple[str, str]]:
    """The (text, finish_reason) of every choice; asserts LLM == server == streamed server."""
    offline = [(o.text, o.finish_reason) for o in _llm(llm, prompt, params, text)]
    body = _body(prompt, params, text)
    assert _server(base, body) == offline
    assert _server_streamed(base, body) == offline
    return offline


def _pieces(llm: LLM, ids: list[int]) -> list[str]:
    return [llm.tokenizer.decode([t]) for t in ids]


def _spanning_stop(llm: LLM, ids: list[int], tokens: int) -> str:
    """A stop string made of the last character of one printable token, `tokens - 2` whole
    tokens and the first character of the next: it spans `tokens` tokens."""
    pieces = _pieces(llm, ids)
    for k in range(len(pieces) - tokens):
        window = pieces[k:k + tokens]
        if all(p.isprintable() and p.strip() and "\ufffd" not in p for p in window):
            return window[0][-1] + "".join(window[1:-1]) + window[-1][0]
    raise AssertionError(f"no {tokens} printable tokens in a row in {pieces}")


def _greedy(**kw) -> SamplingParams:
    return SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True, **kw)


@pytest.mark.parametrize("tokens", [2, 3])
@pytest.mark.parametrize("include", [False, True])
def test_stop_strings_spanning_tokens_give_the_same_text(pair, tokens, include):
    llm, base = pair
    prompt = _prompt(llm)
    full = _llm(llm, prompt, _greedy(), TextOptions())[0]
    stop = _spanning_stop(llm, full.token_ids, tokens)
    cut = full.text.index(stop)
    expected = full.text[:cut + len(stop)] if include else full.text[:cut]
    got = _all_three(llm, base, prompt, _greedy(stop=(stop, "never-in-this-text")),
                     TextOptions(include_stop_str_in_output=include))
    assert got == [(expected, "stop")]


def test_without_a_stop_all_text_comes_out_including_split_characters(pair):
    llm, base = pair
    prompt = _prompt(llm)
    got = _all_three(llm, base, prompt, _greedy(stop=("never-in-this-text",)))
    full = _llm(llm, prompt, _greedy(), TextOptions())[0]
    assert got == [(full.text, "length")]
    assert full.text == llm.tokenizer.decode(full.token_ids)  # the flush lost nothing


@pytest.mark.parametrize("skip", [True, False])
def test_skip_special_tokens_gives_the_same_text(pair, skip):
    llm, base = pair
    prompt = _prompt(llm)
    bos = llm.tokenizer.bos_token_id
    assert bos is not None
    plain = _llm(llm, prompt, _greedy(), TextOptions())[0].token_ids[:6]
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, seed=5, ignore_eos=True,
                            allowed_token_ids=(bos, *plain))
    ids = _llm(llm, prompt, params, TextOptions())[0].token_ids
    assert bos in ids and any(t != bos for t in ids), ids  # the case mixes special and plain
    got = _all_three(llm, base, prompt, params, TextOptions(skip_special_tokens=skip))
    assert got == [(llm.tokenizer.decode(ids, skip_special_tokens=skip), "length")]


def test_n3_each_choice_stops_on_its_own(pair):
    llm, base = pair
    prompt = _prompt(llm)
    sampled = SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, seed=7, n=3,
                             ignore_eos=True)
    free = _llm(llm, prompt, sampled, TextOptions())
    assert len({o.text for o in free}) == 3, [o.text for o in free]
    stop = _spanning_stop(llm, free[1].token_ids, 2)  # from choice 1's text
    got = _all_three(llm, base, prompt, replace(sampled, stop=(stop,)))
    for o, (text, reason) in zip(free, got, strict=True):
        if stop in o.text:
            assert (text, reason) == (o.text[:o.text.index(stop)], "stop")
        else:  # this choice runs to its length, unaffected by the others' stops
            assert (text, reason) == (o.text, "length")
    assert got[1][1] == "stop"
