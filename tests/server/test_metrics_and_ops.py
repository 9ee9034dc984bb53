"""An instance's operator surface over real HTTP (fake engine in a real engine process, the demo
model's real tokenizer): /metrics parsed by prometheus_client with vLLM's families and
`model_name` on every sample, P/D token counts that do not double count, /tokenize and
/detokenize equal to transformers.AutoTokenizer, /version, the API key on every route but the
open ones, CORS preflights answered before the key is checked."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import pytest
from fakes import fake_handoff, make_fake_engine
from harness import MODEL
from http_util import metric_value, parse_sse, request
from prometheus_client.parser import text_string_to_metric_families

import hybridpd
from hybridpd.demo.embedded import SHIPPED_DIR
from hybridpd.httpkit.cors import CorsPolicy
from hybridpd.server.runtime import start_instance
from hybridpd.server.server_metrics import VLLM_EQUIVALENTS
from hybridpd.server.serving import ServerConfig
from hybridpd.tokenizer import Tokenizer

KEY = "s3cret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
ORIGIN = "https://ui.example"
DOCS = Path(__file__).resolve().parents[2] / "docs" / "architecture.md"


@pytest.fixture(scope="module")
def base(loop_thread):
    config = ServerConfig(model_name=MODEL, max_model_len=256, api_key=KEY,
                          cors=CorsPolicy(allowed_origins=(ORIGIN,)))
    factory = functools.partial(make_fake_engine, 0.0, "ops")
    inst = loop_thread.call(start_instance(factory, Tokenizer.from_dir(SHIPPED_DIR), config,
                                           startup_timeout_s=60.0))
    try:
        yield f"http://127.0.0.1:{inst.port}"
    finally:
        loop_thread.call(inst.stop())


@pytest.fixture(scope="module")
def hf_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(SHIPPED_DIR)


def post(url: str, body: object, headers: dict[str, str] | None = None):
    return request("POST", url, body, headers={**AUTH, **(headers or {})})


def scrape(base: str) -> str:
    status, text, headers = request("GET", f"{base}/metrics")  # open: no key
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    return text


def value(base: str, sample: str, **labels: str) -> float:
    return metric_value(scrape(base), sample, model_name=MODEL, **labels)


def test_metrics_parse_and_have_the_documented_families_with_model_name(base):
    assert post(f"{base}/v1/completions", {"prompt": "hi", "max_tokens": 3})[0] == 200
    families = list(text_string_to_metric_families(scrape(base)))
    names = {f.name for f in families}
    missing = [n for n in VLLM_EQUIVALENTS if n.removesuffix("_total") not in names]
    assert not missing, missing
    samples = [s for f in families for s in f.samples]
    assert samples and all(s.labels.get("model_name") == MODEL for s in samples)
    assert not [s.name for s in samples if s.name.endswith("_created")]


def test_every_metric_is_documented_against_its_vllm_name():
    text = DOCS.read_text()
    for ours, theirs in VLLM_EQUIVALENTS.items():
        assert re.search(rf"`{re.escape(ours)}`.*`{re.escape(theirs)}`", text), ours


def test_latency_families_observe_every_request_streamed_or_not(base):
    names = ("time_to_first_token_seconds", "e2e_request_latency_seconds",
             "request_time_per_output_token_seconds", "inter_token_latency_seconds",
             "request_queue_time_seconds")
    before = {n: value(base, f"hybridpd_{n}_count") for n in names}
    assert post(f"{base}/v1/completions", {"prompt": "hi", "max_tokens": 4})[0] == 200
    status, text, _ = post(f"{base}/v1/completions",
                           {"prompt": "hi", "max_tokens": 4, "stream": True})
    assert status == 200 and parse_sse(text)[-1] == "[DONE]"
    after = {n: value(base, f"hybridpd_{n}_count") for n in names}
    assert after["time_to_first_token_seconds"] == before["time_to_first_token_seconds"] + 2
    assert after["e2e_request_latency_seconds"] == before["e2e_request_latency_seconds"] + 2
    tpot = "request_time_per_output_token_seconds"
    assert after[tpot] == before[tpot] + 2  # one per request (4 tokens each)
    itl = "inter_token_latency_seconds"
    assert after[itl] == before[itl] + 2 * 3  # one per later token
    queue = "request_queue_time_seconds"  # the engine's figure, on each first output
    assert after[queue] == before[queue] + 2


def test_prompt_tokens_are_counted_where_prefilled_and_generated_ones_where_sampled(base):
    prompt = [5, 6, 7, 8]

    def totals() -> tuple[float, float]:
        text = scrape(base)
        return (metric_value(text, "hybridpd_prompt_tokens_total", model_name=MODEL),
                metric_value(text, "hybridpd_generation_tokens_total", model_name=MODEL))

    p0, g0 = totals()
    status, body, _ = post(f"{base}/v1/completions", {  # P's leg: prompt + first token
        "prompt": prompt, "max_tokens": 6, "kv_transfer_params": {"do_remote_decode": True}},
        headers={"X-Request-Id": "count-p"})
    assert status == 200 and body["kv_transfer_params"], body
    p1, g1 = totals()
    assert (p1 - p0, g1 - g0) == (len(prompt), 1)
    assert post(f"{base}/v1/abort", {"request_id": "count-p"})[0] == 200  # release P's hold
    status, body, _ = post(f"{base}/v1/completions", {  # D's leg: the other 5, no prompt
        "prompt": prompt, "max_tokens": 6,
        "kv_transfer_params": fake_handoff("count-d", len(prompt))},
        headers={"X-Request-Id": "count-d"})
    assert status == 200, body
    p2, g2 = totals()
    assert (p2 - p1, g2 - g1) == (0, 5)  # P + D = the prompt once and all 6 tokens once


def test_engine_gauges_and_kv_cache_usage(base):
    text = scrape(base)
    free = metric_value(text, "hybridpd_pool_free_blocks", model_name=MODEL)
    used = metric_value(text, "hybridpd_pool_used_blocks", model_name=MODEL)
    usage = metric_value(text, "hybridpd_kv_cache_usage_perc", model_name=MODEL)
    assert free + used == 100 and usage == pytest.approx(used / 100)
    assert metric_value(text, "hybridpd_num_preemptions_total", model_name=MODEL) == 0
    assert metric_value(text, "hybridpd_engine_added_total", model_name=MODEL) >= 1


def test_tokenize_equals_autotokenizer(base, hf_tokenizer):
    for text in ("Hello world", "417+285=", "count r in strawberry=", " é 日本 "):
        status, body, _ = post(f"{base}/tokenize", {"prompt": text})
        assert status == 200, body
        want = hf_tokenizer(text)["input_ids"]
        assert body == {"count": len(want), "max_model_len": 256, "tokens": want,
                        "token_strs": None}
        status, body, _ = post(f"{base}/tokenize", {"prompt": text, "add_special_tokens": False,
                                                    "return_token_strs": True})
        want = hf_tokenizer(text, add_special_tokens=False)["input_ids"]
        assert body["tokens"] == want
        assert body["token_strs"] == hf_tokenizer.convert_ids_to_tokens(want)
        status, body, _ = post(f"{base}/detokenize", {"tokens": want})
        assert status == 200 and body == {"prompt": hf_tokenizer.decode(want)}


def test_tokenize_chat_equals_the_template_of_autotokenizer(base, hf_tokenizer):
    messages = [{"role": "user", "content": "12+30="}]
    for gen in (True, False):
        status, body, _ = post(f"{base}/tokenize",
                               {"messages": messages, "add_generation_prompt": gen})
        assert status == 200, body
        text = hf_tokenizer.apply_chat_template(messages, tokenize=False,
                                                add_generation_prompt=gen)
        assert body["tokens"] == hf_tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("path,body,param", [
    ("/tokenize", {}, "messages"),
    ("/tokenize", {"prompt": "a", "messages": []}, "prompt"),
    ("/tokenize", {"prompt": 5}, "prompt"),
    ("/tokenize", {"prompt": "a", "add_special_tokens": "yes"}, "add_special_tokens"),
    ("/tokenize", {"messages": [{"role": "user"}]}, "messages"),
    ("/tokenize", {"prompt": "a", "model": "other"}, "model"),
    ("/detokenize", {"tokens": "abc"}, "tokens"),
    ("/detokenize", {"tokens": [1, True]}, "tokens"),
    ("/detokenize", {"tokens": [10**9]}, "tokens"),
])
def test_bad_tokenizer_requests_get_a_clear_error(base, path, body, param):
    status, answer, _ = post(f"{base}{path}", body)
    assert status in (400, 404) and answer["error"]["param"] == param, answer
    assert post(f"{base}/tokenize", {"prompt": "still fine"})[0] == 200


def test_version_is_open_and_the_key_guards_everything_else(base):
    status, body, _ = request("GET", f"{base}/version")
    assert status == 200 and body == {"version": hybridpd.__version__}
    assert request("GET", f"{base}/health")[0] == 200
    for method, path, body in (("POST", "/tokenize", {"prompt": "a"}),
                               ("POST", "/detokenize", {"tokens": [1]}),
                               ("POST", "/v1/completions", {"prompt": "a", "max_tokens": 1}),
                               ("GET", "/v1/models", None), ("GET", "/v1/pool", None)):
        status, answer, _ = request(method, f"{base}{path}", body)
        assert status == 401 and answer["error"]["code"] == "invalid_api_key", path
        wrong = {"Authorization": "Bearer nope"}
        assert request(method, f"{base}{path}", body, headers=wrong)[0] == 401, path
        assert request(method, f"{base}{path}", body, headers=AUTH)[0] == 200, path


def test_cors_preflight_is_answered_without_the_key_and_responses_carry_the_origin(base):
    ask = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
           "Access-Control-Request-Headers": "authorization, content-type"}
    status, _, headers = request("OPTIONS", f"{base}/v1/chat/completions", headers=ask)
    assert status == 200
    assert headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "POST" in headers["Access-Control-Allow-Methods"]
    assert headers["Access-Control-Allow-Headers"] == "authorization, content-type"
    status, _, _ = request("OPTIONS", f"{base}/v1/chat/completions",
                           headers={**ask, "Origin": "https://evil.example"})
    assert status == 400
    status, _, headers = post(f"{base}/v1/completions", {"prompt": "a", "max_tokens": 2,
                                                         "stream": True},
                              headers={"Origin": ORIGIN})
    assert status == 200 and headers["Access-Control-Allow-Origin"] == ORIGIN
    status, _, headers = request("GET", f"{base}/v1/models", headers={"Origin": ORIGIN})
    assert status == 401 and headers["Access-Control-Allow-Origin"] == ORIGIN  # readable error
    status, _, headers = request("GET", f"{base}/version",
                                 headers={"Origin": "https://evil.example"})
    assert status == 200 and "Access-Control-Allow-Origin" not in headers
