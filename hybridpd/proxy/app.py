"""The proxy's HTTP app: OpenAI endpoints routed through a prefill and a decode instance.

Owns routes, the error middleware (OpenAI-shaped errors, a logged 500 for anything unexpected;
backend errors passed through with their status and body), validating what the proxy itself
requests with the same models as the instances (`hybridpd/openai/`: malformed or
not-yet-supported fields are refused before any backend is called; unknown ones are logged and
passed on), X-Request-Id on every response, /openapi.json, the shared
client session and the health monitor's lifecycle, and
/health, /v1/models, /metrics of the proxy itself. Bodies are bounded as on the instances
(`httpkit/bodies.py`): the size limit is `--max-body-bytes` or, by default, the smallest
`max_request_bytes` the backends' /v1/models advertise (learned in the background until one
answers; `httpkit.bodies.DEFAULT_MAX_BYTES` meanwhile), nesting depth and integer count too.
With an API key every /v1/* route needs `Authorization: Bearer <key>`. The per-request P/D
flow is `flow.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web

from hybridpd.httpkit.auth import bearer_matches
from hybridpd.httpkit.bodies import (
    DEFAULT_MAX_BYTES,
    DEFAULT_TIMEOUT_S,
    BodyError,
    BodyLimits,
    read_json,
)
from hybridpd.openai.errors import ApiError, error_body
from hybridpd.openai.parse import validate_request
from hybridpd.openai.schema import openapi_schema
from hybridpd.proxy.flow import REQUEST_ID_KEY, BackendError, PDFlow
from hybridpd.proxy.health import DEFAULT_INTERVAL_S, HealthMonitor
from hybridpd.proxy.proxy_metrics import Outcome, ProxyMetrics
from hybridpd.proxy.routing import BackendRole, NoBackendError, Router
from hybridpd.server.limits import max_values_for

log = logging.getLogger(__name__)
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 600.0  # longest silence of a backend mid-request
MODELS_TIMEOUT_S = 5.0
POOL_KEEPALIVE_S = 10.0  # below the instances' idle timeout: never reuse a closing connection
ROUTER_KEY = web.AppKey("router", Router)
METRICS_KEY = web.AppKey("metrics", ProxyMetrics)
FLOW_KEY = web.AppKey("flow", PDFlow)
SESSION_KEY = web.AppKey("session", aiohttp.ClientSession)


@dataclasses.dataclass
class ProxyBounds:
    """The proxy's body limits (learned from the backends unless fixed) and its API key."""

    body: BodyLimits
    learned: bool  # True once fixed by the operator or learned from a backend
    api_key: str | None = dataclasses.field(default=None, repr=False)


BOUNDS_KEY = web.AppKey("bounds", ProxyBounds)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error(message: str, status: int, err_type: str = "invalid_request_error") -> web.Response:
    return web.json_response(error_body(message, err_type), status=status)


async def _echo_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """X-Request-Id on every response: the request's id (the client's, or the one the proxy
    gave both legs), also on errors passed through from a backend."""
    rid = request.get(REQUEST_ID_KEY) or request.headers.get("X-Request-Id")
    if rid and "X-Request-Id" not in response.headers:
        response.headers["X-Request-Id"] = rid


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    metrics = request.app[METRICS_KEY]
    try:
        key = request.app[BOUNDS_KEY].api_key
        if key and request.path.startswith("/v1/") and not bearer_matches(request.headers, key):
            metrics.requests.inc(labels={"outcome": Outcome.BAD_REQUEST.value})
            return _error("invalid or missing API key (Authorization: Bearer <key>)", 401,
                          "authentication_error")
        return await handler(request)
    except BodyError as exc:  # aiohttp drains (lingers on) an unread rest; a stalled one: close
        metrics.requests.inc(labels={"outcome": Outcome.BAD_REQUEST.value})
        resp = _error(exc.message, exc.status)
        if exc.status == 408:
            resp.force_close()
        return resp
    except BackendError as exc:
        metrics.requests.inc(labels={"outcome": Outcome.BACKEND_ERROR.value})
        return web.Response(status=exc.status, body=exc.body, content_type=exc.content_type)
    except NoBackendError as exc:
        metrics.requests.inc(labels={"outcome": Outcome.NO_BACKEND.value})
        return _error(f"service unavailable: {exc}", 503, "server_error")
    except aiohttp.ClientError as exc:
        metrics.requests.inc(labels={"outcome": Outcome.BACKEND_ERROR.value})
        return _error(f"backend failed: {exc!r}", 502, "server_error")
    except ApiError as exc:
        metrics.requests.inc(labels={"outcome": Outcome.BAD_REQUEST.value})
        return web.json_response(exc.body(), status=exc.status)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _error(exc.reason, exc.status)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception as exc:  # noqa: BLE001 - a bug must answer an OpenAI-shaped 500
        log.exception("unhandled error in the proxy")
        metrics.requests.inc(labels={"outcome": Outcome.PROXY_ERROR.value})
        return _error(f"internal proxy error: {type(exc).__name__}", 500, "server_error")


def build_app(
    prefill_urls: list[str], decode_urls: list[str], routing: str = "round-robin",
    health_interval_s: float = DEFAULT_INTERVAL_S, *, api_key: str | None = None,
    secret: str | None = None, max_body_bytes: int | None = None,
    body_timeout_s: float | None = None,
) -> web.Application:
    """The proxy app; `secret` (the deployment secret) authenticates its calls to P's
    /v1/abort, `api_key` guards its own /v1/* routes."""
    body = BodyLimits(max_bytes=max_body_bytes or DEFAULT_MAX_BYTES,
                      timeout_s=DEFAULT_TIMEOUT_S if body_timeout_s is None else body_timeout_s)
    app = web.Application(middlewares=[error_middleware], client_max_size=body.max_bytes)
    app[BOUNDS_KEY] = ProxyBounds(body, learned=max_body_bytes is not None, api_key=api_key)
    app[ROUTER_KEY] = Router(prefill_urls, decode_urls, routing)
    app[METRICS_KEY] = ProxyMetrics()

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_S,
                                        sock_read=READ_TIMEOUT_S)
        # no connection cap: every in-flight request holds one stream per leg
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=POOL_KEEPALIVE_S)
        session = aiohttp.ClientSession(timeout=timeout, connector=connector)
        monitor = HealthMonitor(app[ROUTER_KEY].backends, session, health_interval_s)
        app[SESSION_KEY] = session
        app[FLOW_KEY] = PDFlow(session, app[ROUTER_KEY], app[METRICS_KEY], secret)
        await monitor.check_all()
        monitor.start()
        learned = app[BOUNDS_KEY].learned or await _learn_body_limit_once(app, session)
        learner = asyncio.get_running_loop().create_task(
            _learn_body_limit(app, session, health_interval_s, learned))
        try:
            yield
        finally:
            learner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await learner
            await monitor.stop()
            await session.close()

    app.cleanup_ctx.append(lifecycle)
    app.on_response_prepare.append(_echo_request_id)
    app.router.add_post("/v1/completions", _completions)
    app.router.add_post("/v1/chat/completions", _chat)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/health", _health)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/openapi.json", _openapi)
    return app


async def _openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_schema())


async def _learn_body_limit(
    app: web.Application, session: aiohttp.ClientSession, interval_s: float, done: bool
) -> None:
    """Until learned (the first try is made at start-up), try again every interval."""
    while not done:
        await asyncio.sleep(interval_s)
        done = await _learn_body_limit_once(app, session)


async def _learn_body_limit_once(app: web.Application, session: aiohttp.ClientSession) -> bool:
    """The smallest `max_request_bytes` (and `max_model_len`) of the backends' model cards, so
    the proxy refuses what no instance would accept; False when no backend answered."""
    bounds = app[BOUNDS_KEY]
    sizes, lens = [], []
    for backend in app[ROUTER_KEY].backends:
        try:
            timeout = aiohttp.ClientTimeout(total=MODELS_TIMEOUT_S)
            async with session.get(f"{backend.url}/v1/models", timeout=timeout) as r:
                card = (await r.json())["data"][0] if r.status == 200 else {}
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError,
                IndexError, TypeError):
            continue
        if isinstance(card.get("max_request_bytes"), int):
            sizes.append(card["max_request_bytes"])
        if isinstance(card.get("max_model_len"), int):
            lens.append(card["max_model_len"])
    if not sizes:
        return False
    bounds.body = dataclasses.replace(
        bounds.body, max_bytes=min(sizes),
        max_values=max_values_for(min(lens)) if lens else None)
    bounds.learned = True
    log.info("request bodies limited to %d bytes (from the backends)", min(sizes))
    return True


async def _body(request: web.Request, chat: bool) -> dict[str, Any] | web.Response:
    body = await read_json(request, request.app[BOUNDS_KEY].body)
    if not isinstance(body, dict):
        return _error("request body must be a JSON object", 400)
    validate_request(body, chat)  # the instances' models: refuse before any backend is called
    return body


async def _generate(request: web.Request, path: str, chat: bool) -> web.StreamResponse:
    body = await _body(request, chat)
    if isinstance(body, web.Response):
        request.app[METRICS_KEY].requests.inc(labels={"outcome": Outcome.BAD_REQUEST.value})
        return body
    return await request.app[FLOW_KEY].handle(request, path, body, chat)


async def _completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, "/v1/completions", chat=False)


async def _chat(request: web.Request) -> web.StreamResponse:
    return await _generate(request, "/v1/chat/completions", chat=True)


async def _models(request: web.Request) -> web.Response:
    router, session = request.app[ROUTER_KEY], request.app[SESSION_KEY]
    for role in (BackendRole.DECODE, BackendRole.PREFILL):
        for backend in (b for b in router.of_role(role) if b.healthy):
            try:
                timeout = aiohttp.ClientTimeout(total=MODELS_TIMEOUT_S)
                async with session.get(f"{backend.url}/v1/models", timeout=timeout) as r:
                    if r.status == 200:
                        return web.json_response(await r.json())
            except (aiohttp.ClientError, asyncio.TimeoutError):
                continue
    return _error("service unavailable: no healthy instance answered /v1/models", 503,
                  "server_error")


async def _health(request: web.Request) -> web.Response:
    router = request.app[ROUTER_KEY]
    ok = router.has_healthy(BackendRole.PREFILL) and router.has_healthy(BackendRole.DECODE)
    backends = [{"url": b.url, "role": b.role.value, "healthy": b.healthy,
                 "in_flight": b.in_flight, "last_error": b.last_error} for b in router.backends]
    body = {"status": "ok" if ok else "unhealthy", "backends": backends}
    return web.json_response(body, status=200 if ok else 503)


async def _metrics(request: web.Request) -> web.Response:
    metrics = request.app[METRICS_KEY]
    return web.Response(body=metrics.render(request.app[ROUTER_KEY]).encode(),
                        headers={"Content-Type": metrics.registry.CONTENT_TYPE})
