"""Structured output and tool calls over HTTP, against a real engine on the random-weight tiny
demo model: the official `openai` client for `response_format` and `tools`, raw HTTP for
vLLM's `guided_*` and `structured_outputs`."""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterator

import openai
import pytest
from http_util import parse_sse, post, request
from schema_check import violations

from hybridpd.engine.args import EngineArgs
from hybridpd.engine.core import build_engine_core
from hybridpd.server.runtime import start_instance
from hybridpd.server.serving import ServerConfig
from hybridpd.tokenizer import Tokenizer

MODEL = "tiny"
USER = [{"role": "user", "content": "Give me JSON."}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "minLength": 1, "maxLength": 8},
        "unit": {"enum": ["C", "F"]}}, "required": ["city", "unit"],
        "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {
    "name": "set_alarm", "parameters": {"type": "object", "properties": {
        "hour": {"type": "integer", "minimum": 0, "maximum": 23}}, "required": ["hour"],
        "additionalProperties": False}}}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:  # noqa: ANN001
    from hybridpd.demo.writer import write_demo_model

    return str(write_demo_model(tmp_path_factory.mktemp("models") / "tiny", preset="tiny",
                                seed=3).path)


@pytest.fixture(scope="module")
def base(loop_thread, tiny_model: str) -> Iterator[str]:  # noqa: ANN001
    factory = functools.partial(build_engine_core, EngineArgs(model_dir=tiny_model,
                                                              device="cpu"))
    config = ServerConfig(model_name=MODEL, max_model_len=512, vocab_size=384)
    inst = loop_thread.call(start_instance(factory, Tokenizer.from_dir(tiny_model), config,
                                           startup_timeout_s=120.0))
    try:
        yield f"http://127.0.0.1:{inst.port}"
    finally:
        loop_thread.call(inst.stop())


@pytest.fixture(scope="module")
def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60)


SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 99}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "array", "items": {"enum": ["x", "y"]}, "minItems": 1, "maxItems": 3},
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "null"}},
     "required": ["ok", "n"], "additionalProperties": False},
]


@pytest.mark.parametrize("schema", SCHEMAS)
def test_response_format_json_schema_with_the_openai_client(client, schema) -> None:  # noqa: ANN001
    r = client.chat.completions.create(
        model=MODEL, messages=USER, max_tokens=100, temperature=0,
        response_format={"type": "json_schema",
                         "json_schema": {"name": "answer", "schema": schema, "strict": True}})
    choice = r.choices[0]
    assert choice.finish_reason == "stop"
    assert violations(json.loads(choice.message.content), schema) == []


def test_response_format_json_object_on_both_endpoints(client) -> None:  # noqa: ANN001
    r = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=12,
                                       temperature=0, response_format={"type": "json_object"})
    assert r.choices[0].message.content.startswith("{")
    free = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=12,
                                          temperature=0)
    assert not free.choices[0].message.content.startswith("{")  # the grammar did it
    c = client.completions.create(model=MODEL, prompt="JSON:", max_tokens=12, temperature=0,
                                  extra_body={"response_format": {"type": "json_object"}})
    assert c.choices[0].text.startswith("{")


@pytest.mark.parametrize("field, value, check", [
    ("guided_json", SCHEMAS[0], lambda t: violations(json.loads(t), SCHEMAS[0]) == []),
    ("guided_regex", r"[0-9]{3}-[a-z]{2}", lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2}", t)),
    ("guided_choice", ["alpha", "beta"], lambda t: t in ("alpha", "beta")),
    ("structured_outputs", {"choice": ["up", "down"]}, lambda t: t in ("up", "down")),
    ("structured_outputs", {"json": SCHEMAS[2]},
     lambda t: violations(json.loads(t), SCHEMAS[2]) == []),
    ("structured_outputs", {"regex": "a+b"}, lambda t: re.fullmatch("a+b", t)),
])
def test_vllm_guided_fields_over_raw_http(base, field, value, check) -> None:  # noqa: ANN001
    for path, body in (("completions", {"prompt": "Answer:"}), ("chat/completions",
                                                                {"messages": USER})):
        status, out, _ = post(f"{base}/v1/{path}", {**body, "model": MODEL, "max_tokens": 60,
                                                    "temperature": 0, field: value})
        assert status == 200, out
        choice = out["choices"][0]
        text = choice["text"] if path == "completions" else choice["message"]["content"]
        assert check(text), (field, text)
        assert choice["finish_reason"] == "stop"


def test_n_choices_each_follow_the_schema(client) -> None:  # noqa: ANN001
    schema = SCHEMAS[0]
    r = client.chat.completions.create(
        model=MODEL, messages=USER, max_tokens=100, temperature=1.0, seed=3, n=3,
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}})
    assert [c.index for c in r.choices] == [0, 1, 2]
    for c in r.choices:
        assert violations(json.loads(c.message.content), schema) == [], c.message.content


def test_named_tool_with_n_gives_every_choice_its_own_call(client) -> None:  # noqa: ANN001
    r = client.chat.completions.create(
        model=MODEL, messages=USER, max_tokens=80, temperature=1.0, seed=5, n=3,
        tools=[WEATHER, CLOCK],
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert [c.index for c in r.choices] == [0, 1, 2]
    ids = []
    for c in r.choices:
        assert c.finish_reason == "tool_calls"
        (call,) = c.message.tool_calls
        assert call.function.name == "get_weather"
        assert violations(json.loads(call.function.arguments),
                          WEATHER["function"]["parameters"]) == []
        ids.append(call.id)
    assert len(set(ids)) == 3  # tool-call ids unique across choices
    # seeded samples: choice i is the single request with seed + i (each parsed on its own)
    args = [c.message.tool_calls[0].function.arguments for c in r.choices]
    for i, want in enumerate(args):
        one = client.chat.completions.create(
            model=MODEL, messages=USER, max_tokens=80, temperature=1.0, seed=5 + i,
            tools=[WEATHER, CLOCK],
            tool_choice={"type": "function", "function": {"name": "get_weather"}})
        assert one.choices[0].message.tool_calls[0].function.arguments == want


def _calls_by_choice(chunks: list) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for c in chunks:
        for ch in c["choices"]:
            out.setdefault(ch["index"], []).extend(ch["delta"].get("tool_calls", []))
    return out


def test_streamed_required_tools_with_n(base) -> None:  # noqa: ANN001
    body = {"model": MODEL, "messages": USER, "max_tokens": 120, "temperature": 0, "n": 2,
            "tools": [WEATHER, CLOCK], "tool_choice": "required",
            "parallel_tool_calls": False}
    status, whole, _ = post(f"{base}/v1/chat/completions", body)
    assert status == 200, whole
    want = [c["message"]["tool_calls"][0]["function"] for c in whole["choices"]]
    status, text, _ = request("POST", f"{base}/v1/chat/completions", {
        **body, "stream": True, "stream_options": {"include_usage": True}})
    assert status == 200
    events = parse_sse(text)
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
    chunks = events[:-1]
    calls = _calls_by_choice(chunks)
    assert sorted(calls) == [0, 1]
    assert [[tc["function"] for tc in calls[i]] for i in (0, 1)] == [[want[0]], [want[1]]]
    assert len({tc["id"] for i in (0, 1) for tc in calls[i]}) == 2
    assert all(tc["index"] == 0 for i in (0, 1) for tc in calls[i])  # per choice
    finishes = {ch["index"]: ch["finish_reason"] for c in chunks for ch in c["choices"]
                if ch["finish_reason"] is not None}
    assert finishes == {0: "tool_calls", 1: "tool_calls"}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]


def test_named_tool_call_arguments_validate(client) -> None:  # noqa: ANN001
    r = client.chat.completions.create(
        model=MODEL, messages=USER, max_tokens=80, temperature=0, tools=[WEATHER, CLOCK],
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    args = json.loads(call.function.arguments)
    assert violations(args, WEATHER["function"]["parameters"]) == []


def test_required_tool_calls_validate(client) -> None:  # noqa: ANN001
    # one call: with parallel calls allowed a random model appends calls until max_tokens
    r = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=120,
                                       temperature=0, tools=[WEATHER, CLOCK],
                                       tool_choice="required", parallel_tool_calls=False)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    params = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, CLOCK)}
    for call in choice.message.tool_calls:
        assert violations(json.loads(call.function.arguments), params[call.function.name]) == []


def test_auto_and_none_leave_free_text(client) -> None:  # noqa: ANN001
    free = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=10,
                                          temperature=0).choices[0]
    for choice in ("auto", "none"):
        r = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=10,
                                           temperature=0, tools=[WEATHER], tool_choice=choice)
        c = r.choices[0]
        assert not c.message.tool_calls  # the random model writes no <tool_call> block
        assert c.finish_reason == "length"
        assert c.message.content == free.message.content  # the demo template ignores tools


def test_streamed_named_tool_call(base) -> None:  # noqa: ANN001
    status, text, _ = request("POST", f"{base}/v1/chat/completions", {
        "model": MODEL, "messages": USER, "max_tokens": 80, "temperature": 0, "stream": True,
        "tools": [WEATHER], "stream_options": {"include_usage": True},
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}}})
    assert status == 200
    chunks = [c for c in parse_sse(text) if c != "[DONE]"]
    calls = [tc for c in chunks for ch in c["choices"] for tc in ch["delta"].get("tool_calls", [])]
    assert len(calls) == 1 and calls[0]["index"] == 0
    assert calls[0]["function"]["name"] == "get_weather"
    args = json.loads(calls[0]["function"]["arguments"])
    assert violations(args, WEATHER["function"]["parameters"]) == []
    assert chunks[-2]["choices"][0]["finish_reason"] == "tool_calls"
    assert chunks[-1]["usage"]["completion_tokens"] > 0


@pytest.mark.parametrize("extra, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x",
                                                                 "schema": "{bad"}}},
     "response_format"),
    ({"response_format": {"type": "yaml"}}, "response_format"),
    ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
    ({"structured_outputs": {"xml": "a"}}, "structured_outputs"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "required", "guided_regex": "a"}, "tool_choice"),
    ({"tools": [{"type": "function"}]}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"guided_regex": "(unclosed"}, None),  # the engine's compile error
])
def test_bad_structured_requests_are_400s(base, extra, param) -> None:  # noqa: ANN001
    status, out, _ = post(f"{base}/v1/chat/completions",
                          {"model": MODEL, "messages": USER, "max_tokens": 5, **extra})
    assert status == 400, out
    assert out["error"]["type"] == "invalid_request_error"
    if param is not None:
        assert out["error"]["param"] == param
    status, out, _ = post(f"{base}/v1/chat/completions",
                          {"model": MODEL, "messages": USER, "max_tokens": 2})
    assert status == 200  # nothing else was lost


def test_streamed_json_schema(base) -> None:  # noqa: ANN001
    status, text, _ = request("POST", f"{base}/v1/chat/completions", {
        "model": MODEL, "messages": USER, "max_tokens": 100, "temperature": 0, "stream": True,
        "response_format": {"type": "json_schema",
                            "json_schema": {"name": "a", "schema": SCHEMAS[0]}}})
    assert status == 200
    chunks = [c for c in parse_sse(text) if c != "[DONE]"]
    content = "".join(ch["delta"].get("content") or "" for c in chunks for ch in c["choices"])
    assert len([c for c in chunks if c["choices"][0]["delta"].get("content")]) > 1  # streamed
    assert violations(json.loads(content), SCHEMAS[0]) == []
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_streamed_auto_tools_stream_the_text(base) -> None:  # noqa: ANN001
    body = {"model": MODEL, "messages": USER, "max_tokens": 16, "temperature": 0,
            "tools": [WEATHER]}
    status, whole, _ = post(f"{base}/v1/chat/completions", body)
    assert status == 200
    status, text, _ = request("POST", f"{base}/v1/chat/completions", {**body, "stream": True})
    assert status == 200
    chunks = [c for c in parse_sse(text) if c != "[DONE]"]
    pieces = [ch["delta"].get("content") for c in chunks for ch in c["choices"]]
    assert len([p for p in pieces if p]) > 1  # not held to the end: no call was started
    assert "".join(p or "" for p in pieces) == whole["choices"][0]["message"]["content"]
    assert not any(ch["delta"].get("tool_calls") for c in chunks for ch in c["choices"])


def test_auto_parses_a_hermes_call_the_model_writes(base) -> None:  # noqa: ANN001
    # the grammar makes the random model write a Hermes block after some text
    forced = (r'[a-z]{3} <tool_call>\{"name": "get_weather", "arguments": '
              r'\{"city": "[a-z]{2}", "unit": "C"\}\}</tool_call>')
    body = {"model": MODEL, "messages": USER, "max_tokens": 120, "temperature": 0,
            "tools": [WEATHER], "guided_regex": forced}
    status, whole, _ = post(f"{base}/v1/chat/completions", body)
    assert status == 200, whole
    choice = whole["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert re.fullmatch("[a-z]{3}", choice["message"]["content"])
    (call,) = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    assert violations(json.loads(call["function"]["arguments"]),
                      WEATHER["function"]["parameters"]) == []
    status, text, _ = request("POST", f"{base}/v1/chat/completions", {**body, "stream": True})
    chunks = [c for c in parse_sse(text) if c != "[DONE]"]
    content = "".join(ch["delta"].get("content") or "" for c in chunks for ch in c["choices"])
    assert content.strip() == choice["message"]["content"]  # "<tool_call>" never went out
    (streamed,) = [tc for c in chunks for ch in c["choices"]
                   for tc in ch["delta"].get("tool_calls", [])]
    assert streamed["function"] == call["function"] and streamed["index"] == 0
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_auto_with_n_parses_each_choice_on_its_own(base) -> None:  # noqa: ANN001
    # choice 0 and 1 write different calls (seed + i); each is parsed from its own text
    forced = (r'[a-z]{2} <tool_call>\{"name": "get_weather", "arguments": '
              r'\{"city": "[a-z]{1,4}", "unit": "[CF]"\}\}</tool_call>')
    body = {"model": MODEL, "messages": USER, "max_tokens": 120, "temperature": 1.0,
            "seed": 11, "n": 2, "tools": [WEATHER], "guided_regex": forced}
    status, whole, _ = post(f"{base}/v1/chat/completions", body)
    assert status == 200, whole
    singles = []
    for i in (0, 1):
        status, one, _ = post(f"{base}/v1/chat/completions",
                              {**body, "n": 1, "seed": 11 + i})
        assert status == 200, one
        singles.append(one["choices"][0])
    ids = []
    for i, choice in enumerate(whole["choices"]):
        assert choice["index"] == i and choice["finish_reason"] == "tool_calls"
        (call,) = choice["message"]["tool_calls"]
        assert call["function"] == singles[i]["message"]["tool_calls"][0]["function"]
        assert choice["message"]["content"] == singles[i]["message"]["content"]
        ids.append(call["id"])
    assert len(set(ids)) == 2
    status, text, _ = request("POST", f"{base}/v1/chat/completions", {**body, "stream": True})
    assert status == 200
    chunks = [c for c in parse_sse(text) if c != "[DONE]"]
    content: dict[int, str] = {}
    for c in chunks:
        for ch in c["choices"]:
            content[ch["index"]] = content.get(ch["index"], "") + (
                ch["delta"].get("content") or "")
    assert "<tool_call>" not in content[0] + content[1]  # held back, then parsed
    assert [content[i].strip() for i in (0, 1)] == [s["message"]["content"] for s in singles]
    calls = _calls_by_choice(chunks)
    assert [[tc["function"] for tc in calls[i]] for i in (0, 1)] == [
        [s["message"]["tool_calls"][0]["function"]] for s in singles]
    assert len({tc["id"] for i in (0, 1) for tc in calls[i]}) == 2
