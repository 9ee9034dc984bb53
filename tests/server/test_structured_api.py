"""Request-field mapping of structured output and tools, and the tool-call parsers (no
engine): which field becomes which `StructuredSpec`, what tool_choice constrains, what
`ToolPlan.parse` makes of an output."""

from __future__ import annotations

import json

import pytest

from hybridpd.engine.structured import StructuredKind, StructuredSpec
from hybridpd.openai.structured import (
    FieldError,
    ToolChoice,
    ToolPlan,
    structured_spec,
    tool_plan,
)
from hybridpd.server.protocol import ApiError, Endpoint, parse_request

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}}
TOOL = {"type": "function", "function": {"name": "f", "parameters": SCHEMA}}
TOOL_G = {"type": "function", "function": {"name": "g"}}


@pytest.mark.parametrize("body, expected", [
    ({"response_format": {"type": "text"}}, None),
    ({"response_format": {"type": "json_object"}}, StructuredSpec.json_object()),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "n",
                                                                 "schema": SCHEMA}}},
     StructuredSpec.json_schema(SCHEMA)),
    ({"guided_json": SCHEMA}, StructuredSpec.json_schema(SCHEMA)),
    ({"guided_json": json.dumps(SCHEMA)}, StructuredSpec.json_schema(SCHEMA)),
    ({"guided_regex": "a+"}, StructuredSpec.regex("a+")),
    ({"guided_choice": ["x", "y"]}, StructuredSpec.choice(["x", "y"])),
    ({"guided_grammar": 'start: "a"'}, StructuredSpec.grammar('start: "a"')),
    ({"structured_outputs": {"json": SCHEMA}}, StructuredSpec.json_schema(SCHEMA)),
    ({"structured_outputs": {"regex": "b", "choice": None}}, StructuredSpec.regex("b")),
    ({"structured_outputs": {"json_object": True}}, StructuredSpec.json_object()),
    ({"structured_outputs": {"grammar": 'start: "a"'}}, StructuredSpec.grammar('start: "a"')),
    ({}, None),
])
def test_fields_map_to_one_spec(body, expected) -> None:  # noqa: ANN001
    assert structured_spec(body) == expected


@pytest.mark.parametrize("body, message", [
    ({"response_format": "json"}, "must be an object"),
    ({"response_format": {"type": "json_schema"}}, "needs"),
    ({"guided_json": [1]}, "must be an object"),
    ({"guided_choice": "x"}, "list of strings"),
    ({"guided_regex": 3}, "must be a string"),
    ({"structured_outputs": {}}, "exactly one"),
    ({"structured_outputs": {"json_object": "yes"}}, "must be true"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "only one of"),
])
def test_bad_fields_name_themselves(body, message) -> None:  # noqa: ANN001
    with pytest.raises(FieldError, match=message) as err:
        structured_spec(body)
    assert err.value.param in body


def test_tool_choice_modes_and_their_constraints() -> None:
    assert tool_plan({}) is None and tool_plan({"tools": [], "tool_choice": "none"}) is None
    auto = tool_plan({"tools": [TOOL]})
    assert auto is not None and auto.choice == ToolChoice.AUTO and auto.spec() is None
    none = tool_plan({"tools": [TOOL], "tool_choice": "none"})
    assert none is not None and none.spec() is None
    named = tool_plan({"tools": [TOOL, TOOL_G],
                       "tool_choice": {"type": "function", "function": {"name": "f"}}})
    assert named is not None and named.spec() == StructuredSpec.json_schema(SCHEMA)
    no_params = tool_plan({"tools": [TOOL_G],
                           "tool_choice": {"type": "function", "function": {"name": "g"}}})
    assert no_params is not None and no_params.spec() == StructuredSpec.json_schema(
        {"type": "object", "properties": {}})
    req = tool_plan({"tools": [TOOL, TOOL_G], "tool_choice": "required",
                     "parallel_tool_calls": False})
    assert req is not None
    spec = req.spec()
    assert spec is not None and spec.kind == StructuredKind.JSON_SCHEMA
    array = json.loads(spec.value)
    assert array["minItems"] == 1 and array["maxItems"] == 1
    assert [c["properties"]["name"]["const"] for c in array["items"]["anyOf"]] == ["f", "g"]


@pytest.mark.parametrize("body, message", [
    ({"tool_choice": "auto"}, "needs tools"),
    ({"tools": {"f": 1}}, "must be a list"),
    ({"tools": [{"type": "retrieval"}]}, "tools\\[0\\]"),
    ({"tools": [TOOL, TOOL]}, "unique"),
    ({"tools": [TOOL], "tool_choice": "sometimes"}, "tool_choice must be"),
    ({"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "h"}}},
     "not in tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]},
     "parameters must be an object"),
    ({"tools": [TOOL], "parallel_tool_calls": "no"}, "boolean"),
])
def test_bad_tools(body, message) -> None:  # noqa: ANN001
    with pytest.raises(FieldError, match=message):
        tool_plan(body)


def test_named_and_required_outputs_become_tool_calls() -> None:
    named = ToolPlan(ToolChoice.NAMED, (TOOL,), "f")
    content, calls = named.parse('{"a": 1}')
    assert content is None and [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("f", {"a": 1})]
    req = ToolPlan(ToolChoice.REQUIRED, (TOOL, TOOL_G))
    content, calls = req.parse('[{"name":"g","parameters":{}},{"name":"f","parameters":{"a":2}}]')
    assert content is None and [c.name for c in calls] == ["g", "f"]
    assert json.loads(calls[1].arguments) == {"a": 2}
    content, calls = req.parse('[{"name":"g","para')  # cut short: no call
    assert calls == [] and content == '[{"name":"g","para'
    oa = named.parse("{}")[1][0].to_openai()
    assert oa["type"] == "function" and oa["id"].startswith("call_")
    assert set(oa["function"]) == {"name", "arguments"}


def test_hermes_parser_for_auto() -> None:
    auto = ToolPlan(ToolChoice.AUTO, (TOOL, TOOL_G))
    text = ('Let me check. <tool_call>\n{"name": "f", "arguments": {"a": 3}}\n</tool_call>'
            '<tool_call>{"name": "g", "arguments": {}}</tool_call>')
    content, calls = auto.parse(text)
    assert content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("f", {"a": 3}), ("g", {})]
    only = '<tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call>'
    assert auto.parse(only)[0] is None
    for plain in ("no calls here", '<tool_call>{"name": "zz", "arguments": {}}</tool_call>',
                  "<tool_call>not json</tool_call>"):
        assert auto.parse(plain) == (plain, [])  # unknown tools and bad JSON stay content
    assert ToolPlan(ToolChoice.NONE, (TOOL,)).parse(only) == (only, [])


def test_parse_request_puts_the_constraint_into_sampling_params() -> None:
    api = parse_request({"messages": [{"role": "user", "content": "hi"}], "tools": [TOOL],
                         "tool_choice": "required"}, Endpoint.CHAT)
    assert api.tools is not None and api.tools.choice == ToolChoice.REQUIRED
    params = api.sampling_params(10)
    assert params.structured is not None and params.structured == api.tools.spec()
    api = parse_request({"prompt": "x", "guided_choice": ["a"]}, Endpoint.COMPLETIONS)
    assert api.sampling_params(4).structured == StructuredSpec.choice(["a"])
    assert parse_request({"prompt": "x"}, Endpoint.COMPLETIONS).sampling_params(4).structured \
        is None
    api = parse_request({"prompt": "x", "tools": [TOOL], "tool_choice": "required"},
                        Endpoint.COMPLETIONS)  # tools are a chat feature: ignored (logged)
    assert api.sampling_params(4).structured is None
    with pytest.raises(ApiError) as err:
        parse_request({"messages": [{"role": "user", "content": "hi"}], "tools": [TOOL],
                       "tool_choice": "required", "guided_regex": "a"}, Endpoint.CHAT)
    assert err.value.param == "tool_choice"


def test_the_auto_parser_is_chosen_by_the_chat_template() -> None:
    from hybridpd.demo.tokenizer_files import CHAT_TEMPLATE
    from hybridpd.openai.structured import ToolParser, tool_parser_for

    assert tool_parser_for(None) == ToolParser.HERMES
    assert tool_parser_for(CHAT_TEMPLATE) == ToolParser.HERMES  # the demo's: the default
    assert tool_parser_for("{{ '<tool_call>' }}{{ tools | tojson }}") == ToolParser.HERMES
    llama = '{"name": function name, "parameters": dictionary of argument name and its value}'
    assert tool_parser_for(llama) == ToolParser.JSON


def test_json_parser_for_auto() -> None:
    from hybridpd.openai.structured import ToolParser

    auto = ToolPlan(ToolChoice.AUTO, (TOOL, TOOL_G), parser=ToolParser.JSON)
    content, calls = auto.parse(' {"name": "f", "parameters": {"a": 5}}\n')
    assert content is None and [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("f", {"a": 5})]
    content, calls = auto.parse('<|python_tag|>[{"name": "g", "arguments": {}}, '
                                '{"name": "f", "arguments": {"a": 1}}]')
    assert [c.name for c in calls] == ["g", "f"]
    for plain in ("hello", '{"name": "zz", "parameters": {}}', '{"a": 1}',
                  '[{"name": "f", "parameters": {}}, {"name": "nope"}]'):
        assert auto.parse(plain) == (plain, [])
    hermes_text = '<tool_call>{"name": "f", "arguments": {}}</tool_call>'
    assert auto.parse(hermes_text) == (hermes_text, [])  # not this model's format


def _stream_all(plan: ToolPlan, pieces: list[str]) -> tuple[list[str], str, list]:
    from hybridpd.openai.structured import AutoCallStream

    s = AutoCallStream(plan)
    out = [s.push(p) for p in pieces]
    rest, calls = s.finish()
    return out, rest, calls


def test_auto_stream_lets_text_out_and_holds_calls() -> None:
    from hybridpd.openai.structured import ToolParser

    hermes = ToolPlan(ToolChoice.AUTO, (TOOL,))
    out, rest, calls = _stream_all(hermes, ["Hello", " wor", "ld <to", "ol", "_call>",
                                            '{"name": "f", "arguments": {"a": 1}}',
                                            "</tool_call>"])
    assert out == ["Hello", " wor", "ld ", "", "", "", ""]  # "<to" held: it may open a call
    assert rest == "" and [c.name for c in calls] == ["f"]
    out, rest, calls = _stream_all(hermes, ["a <t", "ag> b", " <"])
    assert "".join(out) + rest == "a <tag> b <" and calls == []  # a false start goes out
    assert out == ["a ", "<tag> b", " "]
    json_plan = ToolPlan(ToolChoice.AUTO, (TOOL,), parser=ToolParser.JSON)
    out, rest, calls = _stream_all(json_plan, [" ", "Sure", ", here"])
    assert out == ["", " Sure", ", here"] and rest == "" and calls == []
    out, rest, calls = _stream_all(json_plan, ["<|py", "thon_tag|>", '{"name": "f", ',
                                               '"parameters": {}}'])
    assert out == ["", "", "", ""] and rest == "" and [c.name for c in calls] == ["f"]
    out, rest, calls = _stream_all(json_plan, ['{"a": 1}'])
    assert out == [""] and rest == '{"a": 1}' and calls == []  # JSON, but no call: content
