"""The OpenAI protocol package on an instance: the official `openai` client and raw HTTP.

Unknown fields are ignored with a logged warning; declared-but-unsupported values are a 400
naming the field; vLLM's chat and text extras each change the answer as documented; every
response carries X-Request-Id; answers validate against the shared response models; the
OpenAPI document lists both endpoints.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import openai
import pytest
import torch
from fakes import REPLY, FakeTokenizer
from harness import MODEL, start_fake_instance
from http_util import get, parse_sse, post

from hybridpd.openai.parse import IGNORED_FIELDS_MESSAGE
from hybridpd.openai.responses import (
    ChatCompletionChunk,
    ChatCompletionResponse,
    CompletionResponse,
    ErrorResponse,
)
from hybridpd.openai.support import NOT_SUPPORTED_YET

torch.set_num_threads(1)
SPECIAL = ord("!")  # ExtrasTokenizer treats "!" as a special token


class ExtrasTokenizer(FakeTokenizer):
    """FakeTokenizer with a special token ("!") and a chat template that shows what it got."""

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        kept = [i for i in ids if not (skip_special_tokens and i == SPECIAL)]
        return super().decode(kept, skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            **template_vars: Any) -> str:
        head = "".join(f"[{k}={v}]" for k, v in sorted(template_vars.items()))
        body = "".join(f"<{m['role']}{':' + m['name'] if 'name' in m else ''}>{m['content']}\n"
                       for m in messages)
        return head + body + ("<assistant>" if add_generation_prompt else "")


def reply(n: int) -> str:
    return bytes(REPLY[i % len(REPLY)] for i in range(n)).decode()


@pytest.fixture(scope="module")
def base(loop_thread):
    inst = start_fake_instance(loop_thread, delay_s=0.002, tokenizer=ExtrasTokenizer())
    try:
        yield f"http://127.0.0.1:{inst.port}"
    finally:
        loop_thread.call(inst.stop())


@pytest.fixture()
def client(base):
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=30)


CHAT = [{"role": "user", "content": "hi"}]


def rendered_prompt(body: dict[str, Any]) -> str:
    """The chat template's text, from the prompt ids `return_token_ids` sends back."""
    return bytes(t for t in body["prompt_token_ids"] if t < 256).decode()


# ---- unknown and unsupported fields ---------------------------------------------------------
def test_unknown_fields_are_ignored_with_a_logged_warning(client, caplog):
    with caplog.at_level(logging.WARNING, logger="hybridpd.openai.parse"):
        out = client.completions.create(model=MODEL, prompt="hi", max_tokens=3,
                                        extra_body={"reasoning_effort": "low", "bogus": 1})
    assert out.choices[0].text == reply(3)
    warned = [r for r in caplog.records if r.msg == IGNORED_FIELDS_MESSAGE]
    assert len(warned) == 1 and "'bogus'" in warned[0].getMessage()
    assert "'reasoning_effort'" in warned[0].getMessage()


UNSUPPORTED = [  # structured output and tools: tests/server/test_structured_*.py
    ("/v1/chat/completions", {"max_completion_tokens": 0}, "max_completion_tokens"),
]


@pytest.mark.parametrize("path,extra,field", UNSUPPORTED)
def test_declared_but_unsupported_values_are_400_naming_the_field(base, path, extra, field):
    body = {"prompt": "hi"} if path == "/v1/completions" else {"messages": CHAT}
    status, err, _ = post(f"{base}{path}", {**body, "max_tokens": 2, **extra})
    assert status == 400, err
    ErrorResponse.model_validate(err)
    assert err["error"]["param"] == field
    assert err["error"]["message"].startswith(f"`{field}` is not supported yet")
    assert field in NOT_SUPPORTED_YET


@pytest.mark.parametrize("path,extra", [
    ("/v1/completions", {"presence_penalty": 0, "frequency_penalty": 0.0, "n": 1,
                         "repetition_penalty": 1, "logit_bias": {}, "best_of": 1,
                         "echo": False, "min_p": 0}),
    ("/v1/chat/completions", {"response_format": {"type": "text"}, "tool_choice": "none",
                              "parallel_tool_calls": True, "tools": []}),
])
def test_unsupported_fields_at_their_default_are_accepted(base, path, extra):
    body = {"prompt": "hi"} if path == "/v1/completions" else {"messages": CHAT}
    status, out, _ = post(f"{base}{path}", {**body, "max_tokens": 2, **extra})
    assert status == 200, out


@pytest.mark.parametrize("extra,field", [
    ({"presence_penalty": 2.5}, "presence_penalty"),  # OpenAI's range is [-2, 2]
    ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"n": 0}, "n"),
    ({"response_format": {"type": "yaml"}}, "response_format"),
    ({"tool_choice": "sometimes"}, "tool_choice"),
])
def test_out_of_range_declared_fields_name_the_field(base, extra, field):
    status, err, _ = post(f"{base}/v1/chat/completions", {"messages": CHAT, **extra})
    assert status == 400 and err["error"]["param"] == field, err


# ---- X-Request-Id ------------------------------------------------------------------------
def test_x_request_id_is_echoed_on_every_response(base):
    status, body, headers = post(f"{base}/v1/completions", {"prompt": "hi", "max_tokens": 2},
                                 headers={"X-Request-Id": "echo-1"})
    assert status == 200 and headers["X-Request-Id"] == "echo-1" == body["id"]
    status, body, headers = post(f"{base}/v1/completions", {"prompt": "hi", "n": 0},
                                 headers={"X-Request-Id": "echo-2"})
    assert status == 400 and headers["X-Request-Id"] == "echo-2"
    status, body, headers = post(f"{base}/v1/chat/completions", {"messages": CHAT,
                                                                 "max_tokens": 2})
    assert status == 200 and headers["X-Request-Id"] == body["id"]
    assert body["id"].startswith("chatcmpl-")


# ---- text extras ----------------------------------------------------------------------------
def test_include_stop_str_in_output_keeps_the_stop_string(client):
    plain = client.completions.create(model=MODEL, prompt="hi", max_tokens=20, stop=["world"])
    kept = client.completions.create(model=MODEL, prompt="hi", max_tokens=20, stop=["world"],
                                     extra_body={"include_stop_str_in_output": True})
    assert plain.choices[0].text == "Hello " and plain.choices[0].finish_reason == "stop"
    assert kept.choices[0].text == "Hello world" and kept.choices[0].finish_reason == "stop"
    stream = client.completions.create(model=MODEL, prompt="hi", max_tokens=20, stop=["world"],
                                       stream=True,
                                       extra_body={"include_stop_str_in_output": True})
    assert "".join(c.choices[0].text for c in stream) == "Hello world"


def test_skip_special_tokens_false_keeps_special_tokens_in_the_text(client):
    assert reply(12) == "Hello world!"  # the 12th token is ExtrasTokenizer's special one
    skipped = client.completions.create(model=MODEL, prompt="hi", max_tokens=12)
    kept = client.completions.create(model=MODEL, prompt="hi", max_tokens=12,
                                     extra_body={"skip_special_tokens": False})
    assert skipped.choices[0].text == "Hello world"
    assert kept.choices[0].text == "Hello world!"


def test_continuous_usage_stats_put_usage_on_every_chunk(base):
    for path, body in (("/v1/completions", {"prompt": "hi"}),
                       ("/v1/chat/completions", {"messages": CHAT})):
        status, text, _ = post(f"{base}{path}", {
            **body, "max_tokens": 4, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}})
        assert status == 200, text
        events = parse_sse(text)
        chunks = [e for e in events[:-1] if e["choices"]]
        assert events[-1] == "[DONE]" and len(chunks) >= 4
        counts = [c["usage"]["completion_tokens"] for c in chunks]
        assert counts[-1] == 4 and counts == sorted(counts), counts
        final = events[-2]
        assert final["choices"] == [] and final["usage"]["completion_tokens"] == 4
        prompt_tokens = final["usage"]["prompt_tokens"]
        assert all(c["usage"]["prompt_tokens"] == prompt_tokens for c in chunks)
        model = ChatCompletionChunk if "chat" in path else CompletionResponse
        for c in events[:-1]:
            model.model_validate(c)
    # without it, only the final chunk has usage
    status, text, _ = post(f"{base}/v1/completions", {
        "prompt": "hi", "max_tokens": 3, "stream": True,
        "stream_options": {"include_usage": True}})
    assert [e for e in parse_sse(text)[:-1] if "usage" in e and e["choices"]] == []


# ---- chat template extras ------------------------------------------------------------------
def chat(base: str, messages: list[dict], **extra: Any) -> dict[str, Any]:
    status, body, _ = post(f"{base}/v1/chat/completions", {
        "messages": messages, "max_tokens": 2, "return_token_ids": True, **extra})
    assert status == 200, body
    return body


def test_message_name_reaches_the_chat_template(base, client):
    body = chat(base, [{"role": "user", "name": "alice", "content": "hi"}])
    assert rendered_prompt(body) == "<user:alice>hi\n<assistant>"
    out = client.chat.completions.create(model=MODEL, messages=[
        {"role": "user", "name": "bob", "content": "hi"}], max_tokens=2,
        extra_body={"return_token_ids": True})
    assert rendered_prompt(out.model_dump()) == "<user:bob>hi\n<assistant>"


def test_chat_template_kwargs_and_add_generation_prompt(base):
    assert rendered_prompt(chat(base, CHAT)) == "<user>hi\n<assistant>"
    body = chat(base, CHAT, chat_template_kwargs={"persona": "pirate"})
    assert rendered_prompt(body) == "[persona=pirate]<user>hi\n<assistant>"
    body = chat(base, CHAT, add_generation_prompt=False)
    assert rendered_prompt(body) == "<user>hi\n"


def test_continue_final_message_leaves_the_last_message_open(base):
    msgs = [*CHAT, {"role": "assistant", "content": "Once upon"}]
    body = chat(base, msgs, continue_final_message=True, add_generation_prompt=False)
    assert rendered_prompt(body) == "<user>hi\n<assistant>Once upon"
    status, err, _ = post(f"{base}/v1/chat/completions", {
        "messages": msgs, "continue_final_message": True})  # add_generation_prompt defaults on
    assert status == 400 and err["error"]["param"] == "continue_final_message", err


# ---- models and schema ----------------------------------------------------------------------
def test_answers_validate_against_the_response_models(base, client):
    status, body, _ = post(f"{base}/v1/completions", {"prompt": "hi", "max_tokens": 3,
                                                      "logprobs": 2})
    assert CompletionResponse.model_validate(body).choices[0].text == reply(3)
    status, body, _ = post(f"{base}/v1/chat/completions", {
        "messages": CHAT, "max_tokens": 3, "logprobs": True, "top_logprobs": 2})
    out = ChatCompletionResponse.model_validate(body)
    assert out.choices[0].message.content == reply(3) and out.usage.completion_tokens == 3
    assert out.choices[0].logprobs is not None and len(out.choices[0].logprobs.content or []) == 3
    status, text, _ = post(f"{base}/v1/chat/completions", {"messages": CHAT, "max_tokens": 3,
                                                           "stream": True})
    events = parse_sse(text)
    assert "".join(ChatCompletionChunk.model_validate(e).choices[0].delta.content or ""
                   for e in events[:-1]) == reply(3)


def test_openapi_document_lists_both_endpoints(base):
    status, doc, _ = get(f"{base}/openapi.json")
    assert status == 200 and doc["openapi"].startswith("3.")
    assert set(doc["paths"]) == {"/v1/completions", "/v1/chat/completions"}
    schemas = doc["components"]["schemas"]
    ref = doc["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"][
        "application/json"]["schema"]["$ref"]
    chat_req = schemas[ref.rsplit("/", 1)[-1]]
    for field in ("messages", "presence_penalty", "tools", "chat_template_kwargs",
                  "continue_final_message", "response_format", "guided_json"):
        assert field in chat_req["properties"], field
    assert "prompt" in schemas["CompletionRequest"]["properties"]
    assert "CompletionResponse" in schemas and "ChatCompletionChunk" in schemas



def test_continuous_usage_stats_needs_include_usage_as_in_vllm(base):
    status, text, _ = post(f"{base}/v1/completions", {
        "prompt": "hi", "max_tokens": 3, "stream": True,
        "stream_options": {"continuous_usage_stats": True}})
    assert status == 200 and all("usage" not in e for e in parse_sse(text)[:-1]), text


def test_an_assistant_message_may_omit_its_content(base):
    body = chat(base, [*CHAT, {"role": "assistant", "content": None}, {"role": "user",
                                                                     "content": "go"}])
    assert rendered_prompt(body) == "<user>hi\n<assistant>\n<user>go\n<assistant>"
    status, err, _ = post(f"{base}/v1/chat/completions", {"messages": [{"role": "user"}]})
    assert status == 400 and err["error"]["param"] == "messages"


def test_the_openai_client_sees_the_field_of_an_unsupported_value(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=CHAT, store=True)
    assert info.value.param == "store" and info.value.code == "unsupported_field"
    assert "`store` is not supported yet" in info.value.message


def _chat(base: str, **body: Any) -> dict:
    status, out, _ = post(f"{base}/v1/chat/completions", {"max_tokens": 6, **body})
    assert status == 200, out
    return out


def _chat_content(base: str, **body: Any) -> str:
    return _chat(base, **body)["choices"][0]["message"]["content"]


@pytest.mark.parametrize("messages, options, echoed", [
    # the last message is the assistant's: its content starts the answer
    (CHAT + [{"role": "assistant", "content": "Once upon"}], {}, "Once upon"),
    # a user message is not the answer's role: nothing is echoed
    (CHAT, {}, ""),
    # without a generation prompt the answer continues the last message's role (vLLM)
    (CHAT, {"add_generation_prompt": False}, "hi"),
])
def test_chat_echo_puts_the_last_message_first(base, messages, options, echoed):
    plain = _chat_content(base, messages=messages, **options)
    assert plain  # the fake engine answers something
    assert _chat_content(base, messages=messages, echo=True, **options) == echoed + plain
    status, text, _ = post(f"{base}/v1/chat/completions",
                           {"messages": messages, "max_tokens": 6, "stream": True,
                            "echo": True, **options})
    assert status == 200
    events = [e for e in parse_sse(text) if e != "[DONE]"]
    pieces = [e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"]]
    assert "".join(pieces) == echoed + plain
    if echoed:  # its own chunk, right after the role chunk
        assert pieces[:2] == ["", echoed]


def test_chat_echo_keeps_the_generated_logprobs_only(base):
    msgs = CHAT + [{"role": "assistant", "content": "Once"}]
    plain = _chat(base, messages=msgs, logprobs=True)
    echoed = _chat(base, messages=msgs, logprobs=True, echo=True)
    assert echoed["choices"][0]["message"]["content"] == \
        "Once" + plain["choices"][0]["message"]["content"]
    assert echoed["choices"][0]["logprobs"] == plain["choices"][0]["logprobs"]
    assert "prompt_logprobs" not in echoed or echoed["prompt_logprobs"] is None
