"""The OpenAI / vLLM request fields of structured output and tool calling, and tool calls in
answers.

Owns mapping `response_format` (json_object, json_schema), vLLM's `structured_outputs` and
`guided_json` / `guided_regex` / `guided_choice` / `guided_grammar` to one `StructuredSpec`;
`tools` + `tool_choice` to a `ToolPlan` (none, auto, required, named: named and required
constrain the output through the same structured-output path); and turning generated text
into `tool_calls` (`ToolPlan.parse`). Knows nothing of HTTP servers, engines or tokenizers.

Tool-call formats: *named* — the output is the function's arguments (a JSON object valid
against its `parameters`); *required* — a JSON array of `{"name": ..., "parameters": {...}}`,
one item per call (at most one when `parallel_tool_calls` is false); *auto* — the model writes
text, and its calls are parsed by the `ToolParser` of the model, chosen from its chat template
(`tool_parser_for`): HERMES, blocks `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`
anywhere in the text (the Hermes, Qwen and Nemotron-H templates; also the default), or JSON,
an output that is one JSON object `{"name": ..., "parameters"|"arguments": {...}}` or a list
of them (Llama-3-style templates, which write `"parameters"` and no `<tool_call>`). Text that
does not parse as a call of one of the request's tools stays content.
"""

from __future__ import annotations

import enum
import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from hybridpd.engine.structured import StructuredSpec
from hybridpd.openai.errors import ApiError

STRUCTURED_FIELDS = ("response_format", "structured_outputs", "guided_json", "guided_regex",
                     "guided_choice", "guided_grammar")
TOOL_FIELDS = ("tools", "tool_choice", "parallel_tool_calls")
TOOL_PARSER_FIELD = "tool_parser"  # P/D legs' answers: the instance's parser, for the proxy
_HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


class FieldError(ValueError):
    """A bad value in a request field; `param` names the field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


class ToolParser(str, enum.Enum):
    HERMES = "hermes"  # <tool_call>{"name", "arguments"}</tool_call> blocks in the text
    JSON = "json"  # the whole output: {"name", "parameters"|"arguments"} or a list of them


def tool_parser_for(chat_template: str | None) -> ToolParser:
    """The auto-mode parser of a model, from its chat template: HERMES where the template
    writes `<tool_call>` (and by default), JSON for templates that describe calls as
    `{"name": ..., "parameters": ...}` objects without it."""
    t = chat_template or ""
    if "<tool_call>" in t:
        return ToolParser.HERMES
    if '"parameters"' in t or "<|python_tag|>" in t:
        return ToolParser.JSON
    return ToolParser.HERMES


class ToolChoice(str, enum.Enum):
    NONE = "none"  # tools are described to the model, never called
    AUTO = "auto"  # the model decides; calls are parsed from its text (Hermes blocks)
    REQUIRED = "required"  # at least one call, output constrained to the calls' array
    NAMED = "named"  # one call of the named function, output constrained to its arguments


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it

    def to_openai(self) -> dict[str, Any]:
        return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class ToolPlan:
    choice: ToolChoice
    tools: tuple[dict[str, Any], ...]  # the request's function definitions
    name: str | None = None  # NAMED: the function
    parallel: bool = True
    parser: ToolParser = ToolParser.HERMES  # AUTO: the model's format (`tool_parser_for`)

    def spec(self) -> StructuredSpec | None:
        """The output constraint of NAMED and REQUIRED; None for AUTO and NONE."""
        if self.choice == ToolChoice.NAMED:
            return StructuredSpec.json_schema(_parameters(self._function(self.name)))
        if self.choice == ToolChoice.REQUIRED:
            calls = [{"type": "object", "properties": {
                "name": {"const": f["name"]}, "parameters": _parameters(f)},
                "required": ["name", "parameters"], "additionalProperties": False}
                for f in (t["function"] for t in self.tools)]
            array: dict[str, Any] = {"type": "array", "minItems": 1,
                                     "items": calls[0] if len(calls) == 1 else {"anyOf": calls}}
            if not self.parallel:
                array["maxItems"] = 1
            return StructuredSpec.json_schema(array)
        return None

    def template_tools(self) -> list[dict[str, Any]] | None:
        """What the chat template gets as `tools` (None: the request had none)."""
        return list(self.tools) if self.tools else None

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content, tool calls) of a finished output."""
        if self.choice == ToolChoice.NAMED:
            assert self.name is not None
            return None, [ToolCall(self.name, _compact(text))]
        if self.choice == ToolChoice.REQUIRED:
            try:
                items = json.loads(text)
            except json.JSONDecodeError:  # cut short by max_tokens: no call to report
                return text, []
            return None, [ToolCall(i["name"], json.dumps(i["parameters"])) for i in items]
        if self.choice == ToolChoice.AUTO:
            names = {t["function"]["name"] for t in self.tools}
            if self.parser == ToolParser.JSON:
                return _parse_json_calls(text, names)
            return _parse_hermes(text, names)
        return text, []

    def _function(self, name: str | None) -> dict[str, Any]:
        for t in self.tools:
            if t["function"]["name"] == name:
                return t["function"]
        raise FieldError(f"tool_choice names function {name!r}, which is not in tools",
                         "tool_choice")


def _compact(text: str) -> str:
    try:
        return json.dumps(json.loads(text))
    except json.JSONDecodeError:
        return text  # cut short by max_tokens: the client sees what was generated


def _parameters(function: dict[str, Any]) -> dict[str, Any]:
    params = function.get("parameters")
    return params if params else {"type": "object", "properties": {}}


def _call_of(obj: Any, names: set[str]) -> ToolCall | None:
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    return ToolCall(obj["name"], args if isinstance(args, str) else json.dumps(args))


def _parse_json_calls(text: str, names: set[str]) -> tuple[str | None, list[ToolCall]]:
    body = text.strip().removeprefix("<|python_tag|>").strip()
    try:
        obj = json.loads(body)
    except json.JSONDecodeError:
        return text, []
    items = obj if isinstance(obj, list) else [obj]
    calls = [_call_of(i, names) for i in items]
    if not calls or any(c is None for c in calls):
        return text, []
    return None, [c for c in calls if c is not None]


def _parse_hermes(text: str, names: set[str]) -> tuple[str | None, list[ToolCall]]:
    calls: list[ToolCall] = []
    kept: list[str] = []
    pos = 0
    for m in _HERMES_CALL.finditer(text):
        try:
            obj = json.loads(m.group(1))
        except json.JSONDecodeError:
            continue
        call = _call_of(obj, names)
        if call is None:
            continue
        calls.append(call)
        kept.append(text[pos:m.start()])
        pos = m.end()
    kept.append(text[pos:])
    content = "".join(kept).strip() if calls else text
    return (content or None), calls


HERMES_OPEN = "<tool_call>"
PYTHON_TAG = "<|python_tag|>"


class AutoCallStream:
    """An auto-mode answer streamed as it comes: text goes out until it may start a call
    (HERMES: from `<tool_call>`, a possible beginning of it held back; JSON: an output that
    opens with `{`, `[` or `<|python_tag|>`); from there on it is held and parsed at the
    end (`finish`)."""

    def __init__(self, plan: ToolPlan) -> None:
        assert plan.choice == ToolChoice.AUTO
        self.plan = plan
        self.held = ""
        self.holding = False  # a call may have begun: hold everything until the end
        self.free = False  # JSON: the output is no call; nothing more to hold

    def push(self, text: str) -> str:
        """The part of the text seen so far that can go out now."""
        self.held += text
        if self.holding:
            return ""
        if self.free:
            out, self.held = self.held, ""
            return out
        if self.plan.parser == ToolParser.JSON:
            head = self.held.lstrip()
            if not head or PYTHON_TAG.startswith(head[:len(PYTHON_TAG)]) \
                    and len(head) < len(PYTHON_TAG):
                return ""  # not yet known
            if head[0] in "{[" or head.startswith(PYTHON_TAG):
                self.holding = True
                return ""
            self.free = True
            out, self.held = self.held, ""
            return out
        at = self.held.find(HERMES_OPEN)
        if at >= 0:
            self.holding = True
            out, self.held = self.held[:at], self.held[at:]
            return out
        keep = next((k for k in range(min(len(HERMES_OPEN) - 1, len(self.held)), 0, -1)
                     if HERMES_OPEN.startswith(self.held[-k:])), 0)
        out, self.held = self.held[:len(self.held) - keep], self.held[len(self.held) - keep:]
        return out

    def finish(self) -> tuple[str, list[ToolCall]]:
        """(the rest of the content, the calls) once the output is complete."""
        content, calls = self.plan.parse(self.held)
        self.held = ""
        return content or "", calls


class AutoCallStreams:
    """One `AutoCallStream` per choice of an auto-mode answer (n > 1: each choice holds back
    and parses its own calls), made on a choice's first text."""

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self._streams: dict[int, AutoCallStream] = {}

    def of(self, index: int) -> AutoCallStream:
        stream = self._streams.get(index)
        if stream is None:
            stream = self._streams[index] = AutoCallStream(self.plan)
        return stream


def auto_call_chunk(chunk: dict[str, Any], calls: AutoCallStreams) -> dict[str, Any] | None:
    """A chat stream chunk (OpenAI JSON) as an auto-mode tool stream lets it out: each
    choice's text pushed through its own stream; a choice's last chunk gets its held rest and
    the calls found; None for a chunk left with nothing to say."""
    choices = chunk.get("choices") or []
    if not choices:
        return chunk  # the usage chunk
    kept = [c for c in (_auto_call_choice(choice, calls.of(int(choice.get("index", 0))))
                        for choice in choices) if c is not None]
    return {**chunk, "choices": kept} if kept else None


def _auto_call_choice(choice: dict[str, Any], calls: AutoCallStream) -> dict[str, Any] | None:
    delta = dict(choice.get("delta") or {})
    text = calls.push(delta.get("content") or "")
    finish = choice.get("finish_reason")
    if finish is None:
        if not text:
            return None
        delta["content"] = text
        return {**choice, "delta": delta}
    rest, found = calls.finish()
    delta["content"] = text + rest
    if found:
        delta["tool_calls"] = [{"index": i, **c.to_openai()} for i, c in enumerate(found)]
        if finish == "stop":
            finish = "tool_calls"
    return {**choice, "delta": delta, "finish_reason": finish}


def with_tool_calls(body: dict[str, Any], plan: ToolPlan) -> dict[str, Any]:
    """A whole chat answer (OpenAI JSON) with each choice's text turned into its own
    `tool_calls` where it holds any (finish_reason "tool_calls" where it had stopped); used on
    an answer made of raw text (the P/D proxy's merged answer)."""
    for choice in body["choices"]:
        content, calls = plan.parse(choice["message"].get("content") or "")
        if calls:
            choice["message"] = {**choice["message"], "content": content,
                                 "tool_calls": [c.to_openai() for c in calls]}
            if choice.get("finish_reason") == "stop":
                choice["finish_reason"] = "tool_calls"
    return body


def answer_as_events(body: dict[str, Any], include_usage: bool) -> list[dict[str, Any]]:
    """A whole chat answer as the stream chunks of a request with tools: one chunk per choice
    with role, content and tool_calls, then the usage chunk if asked (the caller adds
    [DONE])."""
    head: dict[str, Any] = {k: body[k] for k in ("id", "created", "model") if k in body}
    events: list[dict[str, Any]] = []
    for choice in body["choices"]:
        msg = choice["message"]
        delta: dict[str, Any] = {"role": "assistant", "content": msg.get("content")}
        if msg.get("tool_calls"):
            delta["tool_calls"] = [{"index": i, **c} for i, c in enumerate(msg["tool_calls"])]
        events.append({**head, "object": "chat.completion.chunk", "choices": [{
            "index": choice.get("index", 0), "delta": delta, "logprobs": choice.get("logprobs"),
            "finish_reason": choice.get("finish_reason")}]})
    for key in ("kv_transfer_stats", "pd_timing"):
        if key in body and events:
            events[-1][key] = body[key]
    if include_usage and body.get("usage"):
        events.append({**head, "object": "chat.completion.chunk", "choices": [],
                       "usage": body["usage"]})
    return events


def calling_plan(body: dict[str, Any]) -> ToolPlan | None:
    """The tool plan of a chat body that may call tools (not 'none'); None otherwise or when
    the fields are malformed (the instance that gets the body answers the 400)."""
    try:
        plan = tool_plan(body)
    except FieldError:
        return None
    return plan if plan is not None and plan.choice != ToolChoice.NONE else None


# ---- request fields -----------------------------------------------------------------------------
def _plain(value: Any) -> Any:
    if hasattr(value, "model_dump"):
        return value.model_dump(by_alias=True, exclude_none=True)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def fields_of(req: Any) -> dict[str, Any]:
    """The structured-output and tool fields a validated request model declares and sets, as
    plain JSON values (the functions below read those)."""
    declared = type(req).model_fields
    return {name: _plain(getattr(req, name)) for name in (*STRUCTURED_FIELDS, *TOOL_FIELDS)
            if name in declared and getattr(req, name) is not None}


def request_structured(req: Any) -> StructuredSpec | None:
    """The output constraint of a request model: its structured-output fields, or what its
    tool_choice forces (named, required); ApiError naming the field when malformed or when
    both ask."""
    body = fields_of(req)
    try:
        spec = structured_spec(body)
        plan = tool_plan(body)
        forced = plan.spec() if plan is not None else None
    except FieldError as exc:
        raise ApiError(str(exc), exc.param) from None
    if forced is not None and spec is not None:
        raise ApiError("tool_choice 'required' or a named function constrains the output "
                       "itself; it cannot be combined with response_format or guided decoding",
                       "tool_choice")
    return spec or forced


def request_tool_plan(req: Any) -> ToolPlan | None:
    """The tool plan of a chat request model; ApiError naming the field when malformed."""
    try:
        return tool_plan(fields_of(req))
    except FieldError as exc:
        raise ApiError(str(exc), exc.param) from None


def structured_spec(body: dict[str, Any]) -> StructuredSpec | None:
    """The one output constraint a request body asks for (FieldError when malformed or when
    several fields ask at once)."""
    found: list[tuple[str, StructuredSpec]] = []
    rf = body.get("response_format")
    if rf is not None:
        spec = _response_format(rf)
        if spec is not None:
            found.append(("response_format", spec))
    so = body.get("structured_outputs")
    if so is not None:
        found.append(("structured_outputs", _structured_outputs(so)))
    for name, kind in (("guided_json", "json"), ("guided_regex", "regex"),
                       ("guided_choice", "choice"), ("guided_grammar", "grammar")):
        if body.get(name) is not None:
            found.append((name, _spec_of(kind, body[name], name)))
    if len(found) > 1:
        raise FieldError(f"only one of {', '.join(n for n, _ in found)} may be given",
                         found[1][0])
    return found[0][1] if found else None


def _response_format(rf: Any) -> StructuredSpec | None:
    if not isinstance(rf, dict) or not isinstance(rf.get("type"), str):
        raise FieldError("response_format must be an object with a string 'type'",
                         "response_format")
    kind = rf["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredSpec.json_object()
    if kind == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, dict) or "schema" not in js and "json_schema" not in js:
            raise FieldError("response_format json_schema needs "
                             "{'json_schema': {'name': ..., 'schema': {...}}}", "response_format")
        return _spec_of("json", js.get("schema", js.get("json_schema")), "response_format")
    raise FieldError(f"response_format type {kind!r} is not supported (text, json_object, "
                     "json_schema)", "response_format")


def _structured_outputs(so: Any) -> StructuredSpec:
    if not isinstance(so, dict):
        raise FieldError("structured_outputs must be an object", "structured_outputs")
    given = {k: v for k, v in so.items() if v is not None and v is not False}
    known = {"json", "regex", "choice", "grammar", "json_object"}
    unknown = sorted(set(given) - known)
    if unknown:
        raise FieldError(f"structured_outputs.{unknown[0]} is not supported "
                         f"({', '.join(sorted(known))})", "structured_outputs")
    if len(given) != 1:
        raise FieldError("structured_outputs needs exactly one of "
                         f"{', '.join(sorted(known))}", "structured_outputs")
    ((kind, value),) = given.items()
    if kind == "json_object":
        if value is not True:
            raise FieldError("structured_outputs.json_object must be true", "structured_outputs")
        return StructuredSpec.json_object()
    return _spec_of(kind, value, "structured_outputs")


def _spec_of(kind: str, value: Any, param: str) -> StructuredSpec:
    try:
        if kind == "json":
            if not isinstance(value, dict | str | bool):
                raise ValueError("a JSON schema must be an object (or its JSON text)")
            return StructuredSpec.json_schema(value)
        if kind == "choice":
            if not isinstance(value, list):
                raise ValueError("choice must be a list of strings")
            return StructuredSpec.choice(value)
        if not isinstance(value, str):
            raise ValueError(f"{kind} must be a string")
        return StructuredSpec.regex(value) if kind == "regex" else StructuredSpec.grammar(value)
    except ValueError as exc:
        raise FieldError(f"{param}: {exc}", param) from None


def tool_plan(body: dict[str, Any]) -> ToolPlan | None:
    """`tools` + `tool_choice` (+ `parallel_tool_calls`) of a chat body; None without tools
    and without a forcing tool_choice. FieldError when malformed."""
    tools = body.get("tools")
    choice = body.get("tool_choice")
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise FieldError("parallel_tool_calls must be a boolean", "parallel_tool_calls")
    if tools is None or tools == []:
        if choice in (None, "none"):
            return None
        raise FieldError("tool_choice needs tools", "tool_choice")
    if not isinstance(tools, list):
        raise FieldError("tools must be a list", "tools")
    names = []
    for i, t in enumerate(tools):
        f = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type", "function") != "function" \
                or not isinstance(f, dict) or not isinstance(f.get("name"), str) \
                or not f["name"]:
            raise FieldError(f"tools[{i}] must be {{'type': 'function', 'function': "
                             "{'name': ..., 'parameters': {...}}}", "tools")
        params = f.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise FieldError(f"tools[{i}].function.parameters must be an object", "tools")
        if params:
            _spec_of("json", params, "tools")  # a schema that is no schema: 400 now
        names.append(f["name"])
    if len(set(names)) != len(names):
        raise FieldError("tools: function names must be unique", "tools")
    if choice is None:
        choice = "auto"
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise FieldError("tool_choice must be 'none', 'auto', 'required' or "
                             "{'type': 'function', 'function': {'name': ...}}", "tool_choice")
        return ToolPlan(ToolChoice(choice), tuple(tools), parallel=parallel)
    fn = choice.get("function") if isinstance(choice, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise FieldError("tool_choice must be 'none', 'auto', 'required' or "
                         "{'type': 'function', 'function': {'name': ...}}", "tool_choice")
    plan = ToolPlan(ToolChoice.NAMED, tuple(tools), fn["name"], parallel)
    plan._function(fn["name"])  # names a function of tools
    return plan
