"""Structured output and a named tool call through the P/D proxy (real processes, HTTP and
NIXL over UCX loopback): P samples the first token under the grammar, D's grammar takes it and
goes on; the answers equal the co-located instance's and validate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from schema_check import violations

from .cluster import post, stream, wait_pool_free

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 6},
    "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2}},
    "required": ["name", "tags"], "additionalProperties": False}
TOOL = {"type": "function", "function": {"name": "lookup", "parameters": SCHEMA}}


@pytest.fixture(scope="module", params=["first-token", "n-1"])
def deployment(request, e2e_models, pool):  # noqa: ANN001
    return pool.deployment(e2e_models["tiny"], handoff=request.param)


def test_pd_structured_output_and_tool_call(deployment, e2e_models, references) -> None:  # noqa: ANN001
    name = Path(e2e_models["tiny"]).name
    msgs = [{"role": "user", "content": "Describe it."}]
    bodies = [
        {"model": name, "messages": msgs, "max_tokens": 80, "temperature": 0,
         "response_format": {"type": "json_schema",
                             "json_schema": {"name": "x", "schema": SCHEMA}}},
        {"model": name, "messages": msgs, "max_tokens": 80, "temperature": 0, "tools": [TOOL],
         "tool_choice": {"type": "function", "function": {"name": "lookup"}}},
    ]
    for body in bodies:
        s_ref, want = post(f"{references['tiny'].url}/v1/chat/completions", body)
        s_pd, got = post(f"{deployment.url}/v1/chat/completions", body)
        assert s_ref == 200 and s_pd == 200, (want, got)
        w, g = want["choices"][0], got["choices"][0]
        assert g["finish_reason"] == w["finish_reason"]
        if "tools" in body:
            assert g["finish_reason"] == "tool_calls"
            (call,) = g["message"]["tool_calls"]
            assert call["function"] == w["message"]["tool_calls"][0]["function"]
            text = call["function"]["arguments"]
        else:
            assert g["message"]["content"] == w["message"]["content"]
            text = g["message"]["content"]
        assert violations(json.loads(text), SCHEMA) == []
    events = stream(f"{deployment.url}/v1/chat/completions",
                    {**bodies[1], "stream": True, "stream_options": {"include_usage": True}})
    calls = [tc for e in events for ch in e.get("choices", [])
             for tc in ch["delta"].get("tool_calls", [])]
    assert [c["function"] for c in calls] == [g["message"]["tool_calls"][0]["function"]]
    assert events[-1]["usage"] == got["usage"]
    for child in deployment.prefill + deployment.decode:
        pool = wait_pool_free(child.url)
        assert pool["free_blocks"] == pool["total_blocks"], (child.name, pool)


def test_pd_auto_tool_call_streamed_and_whole(deployment, e2e_models, references) -> None:  # noqa: ANN001
    name = Path(e2e_models["tiny"]).name
    forced = (r'[a-z]{3} <tool_call>\{"name": "lookup", "arguments": '
              r'\{"name": "[a-z]{2}", "tags": \["a"\]\}\}</tool_call>')
    body = {"model": name, "messages": [{"role": "user", "content": "Look it up."}],
            "max_tokens": 120, "temperature": 0, "tools": [TOOL], "guided_regex": forced}
    url = f"{deployment.url}/v1/chat/completions"
    s_ref, want = post(f"{references['tiny'].url}/v1/chat/completions", body)
    s_pd, got = post(url, body)
    assert s_ref == 200 and s_pd == 200, (want, got)
    g = got["choices"][0]
    assert "tool_parser" not in got and g["finish_reason"] == "tool_calls"
    assert g["message"]["content"] == want["choices"][0]["message"]["content"]
    (call,) = g["message"]["tool_calls"]
    assert call["function"] == want["choices"][0]["message"]["tool_calls"][0]["function"]
    events = stream(url, body)
    content = "".join(ch["delta"].get("content") or "" for e in events
                      for ch in e.get("choices", []))
    assert content.strip() == g["message"]["content"]  # the block itself never went out
    calls = [tc for e in events for ch in e.get("choices", [])
             for tc in ch["delta"].get("tool_calls", [])]
    assert [c["function"] for c in calls] == [call["function"]]
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"
