"""The OpenAI-compatible HTTP app of one instance (aiohttp).

Owns routes, the error middleware (every failure becomes an OpenAI-shaped JSON error), who may
call what (with an API key every route but `OPEN_PATHS` — /health, /metrics, /version —
needs `Authorization: Bearer <key>`; /v1/abort needs the key or the deployment's internal
token whenever either is configured), CORS when configured (`httpkit/cors.py`), bounded
JSON bodies (`httpkit/bodies.py`, sized by `server/limits.py`), the request id (X-Request-Id
honoured and echoed on every response; a client id already in use runs under a unique internal
id, `RequestIds`, while the client keeps seeing its own), the OpenAPI document
(/openapi.json, from `hybridpd/openai/`), the tokenizer endpoints (/tokenize, /detokenize in
vLLM's shapes) and the introspection endpoints (/health, /metrics, /version, /v1/models,
/v1/pool, /v1/abort — which says truthfully whether the id existed: 404 and `aborted: false`
if not).
The request flow itself lives in `serving.py`; the engine is reached only through
`EngineClient`. Knows nothing of P/D routing.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

from aiohttp import web

from hybridpd.disagg.auth import (
    HANDOFF_AUTH_HEADER,
    AuthError,
    ReplayGuard,
    verify_handoff_request,
)
from hybridpd.httpkit.auth import (
    ABORT_PURPOSE,
    INTERNAL_AUTH_HEADER,
    OPEN_PATHS,
    bearer_matches,
    internal_token_ok,
)
from hybridpd.httpkit.bodies import BodyError, decode_json, read_body, read_json
from hybridpd.httpkit.cors import install_cors
from hybridpd.httpkit.site import version
from hybridpd.openai.errors import ApiError
from hybridpd.openai.responses import new_request_id
from hybridpd.openai.schema import openapi_schema
from hybridpd.server.engine_client import DuplicateRequestError, EngineClient, EngineDeadError
from hybridpd.server.limits import RequestLimits, max_token_bytes_of, request_limits
from hybridpd.server.protocol import Endpoint, parse_request
from hybridpd.server.server_metrics import ServerMetrics
from hybridpd.server.serving import CompletionService, ServerConfig

log = logging.getLogger(__name__)
STATS_TIMEOUT_S = 2.0
ABORT_TIMEOUT_S = 5.0
MAX_ID_ALIASES = 4096  # client ids remembered with the unique internal ids they ran under
REQUEST_ID_KEY = web.RequestKey("request_id", str)  # the client-visible id of a request
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    metrics: ServerMetrics = request.app[METRICS_KEY]
    try:
        _check_api_key(request)
        return await handler(request)
    except BodyError as exc:  # aiohttp drains (lingers on) an unread rest; a stalled one: close
        metrics.errors.inc(labels={"status": str(exc.status)})
        err = ApiError(exc.message, exc.param, status=exc.status)
        resp = web.json_response(err.body(), status=exc.status)
        if exc.status == 408:
            resp.force_close()
        return resp
    except ApiError as exc:
        metrics.errors.inc(labels={"status": str(exc.status)})
        return web.json_response(exc.body(), status=exc.status)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        metrics.errors.inc(labels={"status": str(exc.status)})
        err = ApiError(exc.reason, status=exc.status, err_type="invalid_request_error")
        return web.json_response(err.body(), status=exc.status)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception as exc:  # noqa: BLE001 - a bug must answer 500, never kill the server
        log.exception("unhandled error")
        metrics.errors.inc(labels={"status": "500"})
        err = ApiError(f"internal error: {exc!r}", status=500, err_type="server_error")
        return web.json_response(err.body(), status=500)


def _check_api_key(request: web.Request) -> None:
    key = request.app[CONFIG_KEY].api_key
    if key and request.path not in OPEN_PATHS and request.path != "/v1/abort" \
            and not bearer_matches(request.headers, key):
        raise ApiError("invalid or missing API key (Authorization: Bearer <key>)",
                       status=401, code="invalid_api_key", err_type="authentication_error")


class RequestIds:
    """Client request ids -> the engine ids they run under (unique while in flight).

    A client id not in use runs as itself; a reused one (still streaming here, or held by the
    engine for a decode instance) runs as `<id>-<8 hex>`. Aliases are remembered (the most
    recent MAX_ID_ALIASES) so /v1/abort with the client's id reaches every request sent under
    it, held P blocks included.
    """

    def __init__(self, max_aliases: int = MAX_ID_ALIASES) -> None:
        self._active: collections.Counter[str] = collections.Counter()
        self._aliases: collections.OrderedDict[str, list[str]] = collections.OrderedDict()
        self._max = max_aliases

    def claim(self, public_id: str, force_new: bool = False) -> str:
        """An engine id for a new request under `public_id`; `release` it when done."""
        engine_id = public_id
        if force_new or self._active[public_id]:
            engine_id = f"{public_id}-{uuid.uuid4().hex[:8]}"
            self._aliases.setdefault(public_id, []).append(engine_id)
            self._aliases.move_to_end(public_id)
            while len(self._aliases) > self._max:
                self._aliases.popitem(last=False)
        self._active[public_id] += 1
        return engine_id

    def release(self, public_id: str) -> None:
        self._active[public_id] -= 1
        if self._active[public_id] <= 0:
            del self._active[public_id]

    def engine_ids(self, public_id: str) -> list[str]:
        """Every engine id a client id may stand for (itself first)."""
        return [public_id, *self._aliases.get(public_id, ())]

    def forget(self, public_id: str) -> None:
        self._aliases.pop(public_id, None)


async def _echo_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """X-Request-Id on every response: the request's id, or the client's header."""
    rid = request.get(REQUEST_ID_KEY) or request.headers.get("X-Request-Id")
    if rid and "X-Request-Id" not in response.headers:
        response.headers["X-Request-Id"] = rid


CLIENT_KEY = web.AppKey("client", EngineClient)
METRICS_KEY = web.AppKey("metrics", ServerMetrics)
SERVICE_KEY = web.AppKey("service", CompletionService)
CONFIG_KEY = web.AppKey("config", ServerConfig)
LIMITS_KEY = web.AppKey("limits", RequestLimits)
HANDOFF_GUARD_KEY = web.AppKey("handoff_guard", ReplayGuard)
TOKENIZER_KEY: web.AppKey[Any] = web.AppKey("tokenizer")
IDS_KEY = web.AppKey("request_ids", RequestIds)


def build_app(client: EngineClient, tokenizer: Any, config: ServerConfig) -> web.Application:
    """The instance app. The caller owns `client` (and closes it after the app stops)."""
    limits = request_limits(config.max_model_len, config.vocab_size,
                            max_token_bytes_of(tokenizer), config.body_timeout_s,
                            config.max_body_bytes)
    app = web.Application(middlewares=[error_middleware], client_max_size=limits.body.max_bytes)
    metrics = ServerMetrics(config.model_name)
    app[CLIENT_KEY] = client
    app[METRICS_KEY] = metrics
    app[CONFIG_KEY] = config
    app[LIMITS_KEY] = limits
    app[SERVICE_KEY] = CompletionService(client, tokenizer, config, metrics,
                                         limits.max_prompt_bytes)
    app[HANDOFF_GUARD_KEY] = ReplayGuard()
    app[TOKENIZER_KEY] = tokenizer
    if config.cors is not None:
        install_cors(app, config.cors)
    app[IDS_KEY] = RequestIds()
    app.on_response_prepare.append(_echo_request_id)
    app.router.add_post("/v1/completions", _completions)
    app.router.add_post("/v1/chat/completions", _chat)
    app.router.add_post("/v1/abort", _abort)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/v1/pool", _pool)
    app.router.add_post("/tokenize", _tokenize)
    app.router.add_post("/detokenize", _detokenize)
    app.router.add_get("/version", version)
    app.router.add_get("/health", _health)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/openapi.json", _openapi)
    return app


async def _openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_schema())


async def _json_body(request: web.Request) -> Any:
    return await read_json(request, request.app[LIMITS_KEY].body)


async def _generate(request: web.Request, endpoint: Endpoint) -> web.StreamResponse:
    limits = request.app[LIMITS_KEY].body
    raw = await read_body(request, limits)  # kept: the hand-off auth covers these bytes
    api = parse_request(await decode_json(raw, limits), endpoint)
    prefix = "chatcmpl" if endpoint is Endpoint.CHAT else "cmpl"
    request_id = request.headers.get("X-Request-Id") or new_request_id(prefix)
    request[REQUEST_ID_KEY] = request_id
    _check_handoff_caller(request, api.kv_transfer_params, request_id, raw)
    service, ids = request.app[SERVICE_KEY], request.app[IDS_KEY]
    gen_reqs = await service.prepare_all(api, request_id)
    for attempt in range(2):  # a second time under a fresh id if the engine still holds it
        engine_id = ids.claim(request_id, force_new=attempt > 0)
        reqs = [replace(g, request_id=engine_id if len(gen_reqs) == 1 else f"{engine_id}-{i}")
                for i, g in enumerate(gen_reqs)]  # one engine request per prompt
        try:
            return await service.respond(request, api, reqs, public_id=request_id)
        except DuplicateRequestError as exc:
            if attempt:
                raise ApiError(str(exc), status=409, code="duplicate_request_id") from None
        except ApiError as exc:
            if exc.status != 409 or attempt:
                raise
        except ValueError as exc:
            raise ApiError(str(exc)) from None
        finally:
            ids.release(request_id)
    raise AssertionError("unreachable")


def _check_handoff_caller(request: web.Request, kv: dict[str, Any] | None, request_id: str,
                          raw_body: bytes) -> None:
    """With a deployment secret, a prefill instance hands off state only to the proxy (403
    otherwise)."""
    config = request.app[CONFIG_KEY]
    if config.role != "prefill" or not config.deployment_secret or not kv:
        return
    try:
        verify_handoff_request(request.headers.get(HANDOFF_AUTH_HEADER),
                               config.deployment_secret, request_id, raw_body,
                               request.app[HANDOFF_GUARD_KEY])
    except AuthError as exc:
        raise ApiError(str(exc), "kv_transfer_params", status=403,
                       code="handoff_not_authorized") from None


async def _completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, Endpoint.COMPLETIONS)


async def _chat(request: web.Request) -> web.StreamResponse:
    return await _generate(request, Endpoint.CHAT)


async def _abort(request: web.Request) -> web.Response:
    body = await _json_body(request)
    rid = body.get("request_id") if isinstance(body, dict) else None
    if not isinstance(rid, str) or not rid:
        raise ApiError("request_id (string) is required", "request_id")
    if not _may_abort(request, rid):
        raise ApiError("aborting a request needs the API key (Authorization: Bearer <key>) or "
                       "the deployment's internal token", status=401, code="unauthorized",
                       err_type="authentication_error")
    ids = request.app[IDS_KEY]
    try:
        found = False
        for engine_id in ids.engine_ids(rid):
            found = await request.app[CLIENT_KEY].abort_checked(engine_id, ABORT_TIMEOUT_S) \
                or found
    except (EngineDeadError, asyncio.TimeoutError) as exc:
        raise ApiError(f"engine unavailable: {exc}", status=503, err_type="server_error") from None
    ids.forget(rid)
    if not found:
        err = ApiError(f"no request {rid!r} on this instance", "request_id", status=404,
                       code="request_not_found")
        return web.json_response({**err.body(), "request_id": rid, "aborted": False},
                                 status=404)
    return web.json_response({"request_id": rid, "aborted": True})


def _may_abort(request: web.Request, rid: str) -> bool:
    """With neither an API key nor a deployment secret configured anyone may (a dev setup);
    otherwise the caller shows the key or a fresh internal token bound to this id."""
    config = request.app[CONFIG_KEY]
    if not config.api_key and not config.deployment_secret:
        return True
    if config.api_key and bearer_matches(request.headers, config.api_key):
        return True
    if not config.deployment_secret:
        return False
    token = request.headers.get(INTERNAL_AUTH_HEADER)
    return internal_token_ok(token, config.deployment_secret, ABORT_PURPOSE, rid)


async def _models(request: web.Request) -> web.Response:
    config = request.app[CONFIG_KEY]
    cards = [{
        "id": name,
        "object": "model",
        "created": int(time.time()),
        "owned_by": "hybridpd",
        "max_model_len": config.max_model_len,
        "max_request_bytes": request.app[LIMITS_KEY].body.max_bytes,  # read by the proxy
    } for name in config.model_names]
    return web.json_response({"object": "list", "data": cards})


async def _health(request: web.Request) -> web.Response:
    client = request.app[CLIENT_KEY]
    if client.healthy:
        return web.json_response({"status": "ok", "role": request.app[CONFIG_KEY].role})
    return web.json_response({"status": "unhealthy", "reason": client.dead_reason}, status=503)


async def _pool(request: web.Request) -> web.Response:
    try:
        stats = await request.app[CLIENT_KEY].stats(STATS_TIMEOUT_S)
    except (EngineDeadError, asyncio.TimeoutError) as exc:
        raise ApiError(f"engine unavailable: {exc}", status=503, err_type="server_error") from None
    return web.json_response({
        "total_blocks": stats.pool_total_blocks,
        "free_blocks": stats.pool_free_blocks,
        "used_blocks": stats.pool_total_blocks - stats.pool_free_blocks,
        "num_running": stats.num_running,
        "num_waiting": stats.num_waiting,
    })


async def _metrics(request: web.Request) -> web.Response:
    client, metrics = request.app[CLIENT_KEY], request.app[METRICS_KEY]
    stats = None
    if client.healthy:
        try:
            stats = await client.stats(STATS_TIMEOUT_S)
        except (EngineDeadError, asyncio.TimeoutError):
            stats = None
    metrics.observe_engine(stats, client.healthy)
    return web.Response(body=metrics.render(), headers={"Content-Type": metrics.CONTENT_TYPE})


def _flag(body: dict[str, Any], name: str, default: bool) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ApiError(f"{name} must be a boolean", name)
    return value


def _check_model(request: web.Request, body: dict[str, Any]) -> None:
    model, served = body.get("model"), request.app[CONFIG_KEY].model_name
    if model is not None and model != served:
        raise ApiError(f"model {model!r} does not exist; this server serves {served!r}",
                       "model", status=404, code="model_not_found")


async def _tokenize(request: web.Request) -> web.Response:
    """vLLM's /tokenize: `prompt` (+ add_special_tokens, default true) or `messages` (+
    add_generation_prompt default true, add_special_tokens default false); answers
    `{count, max_model_len, tokens, token_strs}` (token_strs with `return_token_strs`)."""
    body = await _json_body(request)
    if not isinstance(body, dict):
        raise ApiError("request body must be a JSON object")
    _check_model(request, body)
    tokenizer = request.app[TOKENIZER_KEY]
    has_prompt, has_messages = "prompt" in body, "messages" in body
    if has_prompt == has_messages:
        raise ApiError("give exactly one of prompt (a string) or messages (a list)",
                       "prompt" if has_prompt else "messages")
    want_strs = _flag(body, "return_token_strs", False)
    if has_prompt:
        prompt = body["prompt"]
        if not isinstance(prompt, str):
            raise ApiError("prompt must be a string", "prompt")
        special = _flag(body, "add_special_tokens", True)
        ids = await asyncio.to_thread(tokenizer.encode, prompt, add_special_tokens=special)
    else:
        messages = body["messages"]
        if not isinstance(messages, list):
            raise ApiError("messages must be a list of messages", "messages")
        gen_prompt = _flag(body, "add_generation_prompt", True)
        special = _flag(body, "add_special_tokens", False)
        try:
            text = await asyncio.to_thread(tokenizer.apply_chat_template, messages, gen_prompt)
        except ValueError as exc:
            raise ApiError(f"invalid messages: {exc}", "messages") from None
        ids = await asyncio.to_thread(tokenizer.encode, text, add_special_tokens=special)
    ids = list(ids)
    strs = [tokenizer.id_to_token(t) for t in ids] if want_strs else None
    return web.json_response({"count": len(ids),
                              "max_model_len": request.app[CONFIG_KEY].max_model_len,
                              "tokens": ids, "token_strs": strs})


async def _detokenize(request: web.Request) -> web.Response:
    """vLLM's /detokenize: `{tokens: [int]}` -> `{prompt}` (special tokens kept, as
    `AutoTokenizer.decode` does by default)."""
    body = await _json_body(request)
    if not isinstance(body, dict):
        raise ApiError("request body must be a JSON object")
    _check_model(request, body)
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        raise ApiError("tokens must be a list of token ids (integers)", "tokens")
    tokenizer = request.app[TOKENIZER_KEY]
    vocab = request.app[CONFIG_KEY].vocab_size or getattr(tokenizer, "vocab_size", None)
    bad = [t for t in tokens if t < 0 or (vocab is not None and t >= vocab)]
    if bad:
        raise ApiError(f"token ids must be in [0, {vocab}); got {bad[0]}", "tokens")
    text = await asyncio.to_thread(tokenizer.decode, tokens, skip_special_tokens=False)
    return web.json_response({"prompt": text})
