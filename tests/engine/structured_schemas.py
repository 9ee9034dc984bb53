"""Twenty JSON schemas for the structured-output tests: objects, nesting, arrays, enums,
numbers, booleans, nulls, required fields, unions, $defs. Each is bounded (string lengths,
array sizes, number ranges, closed objects) so that a random-weight model, whose choices only
the grammar steers, reaches the end within the tests' token budget."""

from __future__ import annotations

from typing import Any

_NAME = {"type": "string", "minLength": 1, "maxLength": 6}
_SMALL = {"type": "integer", "minimum": 0, "maximum": 99}

SCHEMAS: list[dict[str, Any]] = [
    {"type": "object", "properties": {"a": _SMALL}, "required": ["a"],
     "additionalProperties": False},
    {"type": "object", "properties": {"name": _NAME, "age": _SMALL},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
     "additionalProperties": False},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}},
     "required": ["color"], "additionalProperties": False},
    {"type": "object", "properties": {"x": {"type": "integer", "minimum": -5, "maximum": 5},
                                      "y": {"type": "integer", "minimum": 10, "maximum": 20}},
     "required": ["x", "y"], "additionalProperties": False},
    {"type": "array", "items": _SMALL, "minItems": 1, "maxItems": 4},
    {"type": "array", "items": {"enum": ["a", "b"]}, "minItems": 2, "maxItems": 3},
    {"type": "object", "properties": {"tags": {"type": "array", "items": _NAME,
                                               "maxItems": 3}},
     "required": ["tags"], "additionalProperties": False},
    {"type": "object", "properties": {"inner": {
        "type": "object", "properties": {"v": _SMALL}, "required": ["v"],
        "additionalProperties": False}}, "required": ["inner"], "additionalProperties": False},
    {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {
        "type": "object", "properties": {"c": {"type": "boolean"}}, "required": ["c"],
        "additionalProperties": False}}, "required": ["b"], "additionalProperties": False}},
     "required": ["a"], "additionalProperties": False},
    {"type": "object", "properties": {"n": {"type": "null"}, "k": _SMALL},
     "required": ["n", "k"], "additionalProperties": False},
    {"type": "object", "properties": {"v": {"type": ["integer", "null"], "minimum": 0,
                                            "maximum": 9}},
     "required": ["v"], "additionalProperties": False},
    {"type": "object", "properties": {"id": {"type": "string", "pattern": "^[a-f0-9]{4}$"}},
     "required": ["id"], "additionalProperties": False},
    {"type": "object", "properties": {"kind": {"const": "point"}, "p": {
        "type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
        "minItems": 2, "maxItems": 2}}, "required": ["kind", "p"],
     "additionalProperties": False},
    {"type": "object", "properties": {"shape": {"anyOf": [
        {"type": "object", "properties": {"r": _SMALL}, "required": ["r"],
         "additionalProperties": False},
        {"type": "object", "properties": {"w": _SMALL, "h": _SMALL}, "required": ["w", "h"],
         "additionalProperties": False}]}}, "required": ["shape"],
     "additionalProperties": False},
    {"type": "object", "properties": {"a": _SMALL, "b": _NAME, "c": {"type": "boolean"}},
     "required": ["a"], "additionalProperties": False},
    {"type": "object", "properties": {"people": {"type": "array", "maxItems": 2, "items": {
        "type": "object", "properties": {"name": _NAME, "admin": {"type": "boolean"}},
        "required": ["name", "admin"], "additionalProperties": False}}},
     "required": ["people"], "additionalProperties": False},
    {"$defs": {"pt": {"type": "object", "properties": {"x": _SMALL}, "required": ["x"],
                      "additionalProperties": False}},
     "type": "object", "properties": {"from": {"$ref": "#/$defs/pt"},
                                      "to": {"$ref": "#/$defs/pt"}},
     "required": ["from", "to"], "additionalProperties": False},
    {"type": "integer", "minimum": 100, "maximum": 999},
    {"type": "object", "properties": {"level": {"enum": [1, 2, 3]},
                                      "mode": {"enum": ["fast", "slow", None]}},
     "required": ["level", "mode"], "additionalProperties": False},
]
