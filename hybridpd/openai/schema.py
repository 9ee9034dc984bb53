"""The OpenAPI document of the OpenAI endpoints, generated from the pydantic models.

Owns `/openapi.json`'s content (served by the instances and the proxy alike: the same two
endpoints, the same models). Knows nothing of HTTP frameworks.
"""

from __future__ import annotations

import functools
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from hybridpd.openai.requests import ChatCompletionRequest, CompletionRequest
from hybridpd.openai.responses import (
    ChatCompletionChunk,
    ChatCompletionResponse,
    CompletionResponse,
    ErrorResponse,
)

REF = "#/components/schemas/{model}"
ENDPOINTS: tuple[tuple[str, str, type[BaseModel], type[BaseModel], type[BaseModel]], ...] = (
    ("/v1/completions", "Create a completion", CompletionRequest, CompletionResponse,
     CompletionResponse),
    ("/v1/chat/completions", "Create a chat completion", ChatCompletionRequest,
     ChatCompletionResponse, ChatCompletionChunk),
)


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": REF.format(model=model.__name__)}


@functools.cache
def openapi_schema(title: str = "hybridpd", version: str = "0") -> dict[str, Any]:
    """An OpenAPI 3.1 document listing the two generation endpoints."""
    models: list[tuple[type[BaseModel], Any]] = [(ErrorResponse, "serialization")]
    for _, _, req, resp, chunk in ENDPOINTS:
        models += [(req, "validation"), (resp, "serialization"), (chunk, "serialization")]
    _, defs = models_json_schema(models, ref_template=REF)
    paths: dict[str, Any] = {}
    for path, summary, req, resp, chunk in ENDPOINTS:
        error = {"description": "OpenAI-shaped error",
                 "content": {"application/json": {"schema": _ref(ErrorResponse)}}}
        paths[path] = {"post": {
            "summary": summary,
            "requestBody": {"required": True,
                            "content": {"application/json": {"schema": _ref(req)}}},
            "responses": {
                "200": {"description": "the answer, or with stream=true its SSE chunks",
                        "content": {"application/json": {"schema": _ref(resp)},
                                    "text/event-stream": {"schema": _ref(chunk)}}},
                "400": error, "default": error,
            },
        }}
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version},
        "paths": paths,
        "components": {"schemas": defs.get("$defs", {})},
    }
