"""Cross-origin resource sharing (CORS) for an aiohttp app, with `vllm serve`'s options.

Owns `CorsPolicy` (`--allowed-origins`, `--allowed-methods`, `--allowed-headers`,
`--allow-credentials`; lists as JSON, as vLLM takes them, or comma-separated), the flags
(`add_cors_arguments`, `cors_policy_from`, for `serve` and `proxy`), `parse_list`, and
`install_cors(app, policy)`: a middleware that answers preflight requests (OPTIONS with
`Origin` and `Access-Control-Request-Method`) before any route or API-key check runs — 200
with the allow headers, or 400 naming what is not allowed — and a response-prepare hook that
adds `Access-Control-Allow-Origin` (and `-Credentials`, `Vary: Origin`) to every response to an
allowed origin, streamed ones included (their headers are sent before a middleware would see
them). Knows nothing of routes.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
MAX_AGE_S = 600
SAFE_HEADERS = frozenset({"accept", "accept-language", "content-language", "content-type"})
ALL_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")


def parse_list(text: str) -> tuple[str, ...]:
    """`'["a", "b"]'` (JSON, as `vllm serve` takes it) or `a,b`; ValueError when malformed."""
    text = text.strip()
    if text.startswith(("[", "{")):  # JSON (a list is the only valid one)
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not a JSON list of strings: {text!r} ({exc.msg})") from None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"not a JSON list of strings: {text!r}")
        items = value
    else:
        items = text.split(",")
    return tuple(v.strip() for v in items if v.strip())


def _list_arg(text: str) -> tuple[str, ...]:
    try:
        return parse_list(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_cors_arguments(parser: argparse.ArgumentParser) -> None:
    """vLLM's CORS flags. CORS stays off until one of them is given (vLLM allows every
    origin by default; a server bound to a developer's loopback should not answer any web
    page that asks)."""
    a = parser.add_argument
    a("--allowed-origins", type=_list_arg, default=None, metavar="LIST",
      help='CORS: origins allowed to call, JSON (\'["https://a.example"]\') or comma-'
           'separated; "*" allows any. Unset: CORS is off, unless another CORS flag is given '
           '(then "*")')
    a("--allowed-methods", type=_list_arg, default=None, metavar="LIST",
      help='CORS: methods allowed cross-origin (unset, with CORS on: "*")')
    a("--allowed-headers", type=_list_arg, default=None, metavar="LIST",
      help='CORS: request headers allowed cross-origin (unset, with CORS on: "*")')
    a("--allow-credentials", action="store_true",
      help="CORS: allow credentials (cookies, Authorization) cross-origin")

def cors_policy_from(args: argparse.Namespace) -> CorsPolicy | None:
    """The policy the CORS flags ask for; None when none was given."""
    given = (args.allowed_origins, args.allowed_methods, args.allowed_headers)
    if all(v is None for v in given) and not args.allow_credentials:
        return None
    return CorsPolicy(allowed_origins=args.allowed_origins or ("*",),
                      allowed_methods=args.allowed_methods or ("*",),
                      allowed_headers=args.allowed_headers or ("*",),
                      allow_credentials=bool(args.allow_credentials))


@dataclass(frozen=True)
class CorsPolicy:
    """What cross-origin callers may do; `*` in a list allows anything."""

    allowed_origins: tuple[str, ...] = ("*",)
    allowed_methods: tuple[str, ...] = ("*",)
    allowed_headers: tuple[str, ...] = ("*",)
    allow_credentials: bool = False

    def origin_allowed(self, origin: str) -> bool:
        return "*" in self.allowed_origins or origin in self.allowed_origins

    def method_allowed(self, method: str) -> bool:
        return "*" in self.allowed_methods or method.upper() in {
            m.upper() for m in self.allowed_methods}

    def headers_allowed(self, headers: list[str]) -> bool:
        if "*" in self.allowed_headers:
            return True
        allowed = {h.lower() for h in self.allowed_headers} | SAFE_HEADERS
        return all(h.lower() in allowed for h in headers)

    def allow_origin_value(self, origin: str) -> str:
        """`*` when any origin may call and no credentials are involved, else the origin."""
        if "*" in self.allowed_origins and not self.allow_credentials:
            return "*"
        return origin


def _requested_headers(request: web.Request) -> list[str]:
    raw = request.headers.get("Access-Control-Request-Headers", "")
    return [h.strip() for h in raw.split(",") if h.strip()]


def _preflight(request: web.Request, policy: CorsPolicy) -> web.Response:
    origin = request.headers["Origin"]
    method = request.headers["Access-Control-Request-Method"]
    wanted = _requested_headers(request)
    refused = [what for what, ok in (
        ("origin", policy.origin_allowed(origin)), ("method", policy.method_allowed(method)),
        ("headers", policy.headers_allowed(wanted))) if not ok]
    if refused:
        return web.Response(status=400, text=f"Disallowed CORS {', '.join(refused)}")
    methods = ALL_METHODS if "*" in policy.allowed_methods else policy.allowed_methods
    headers = {
        "Access-Control-Allow-Origin": policy.allow_origin_value(origin),
        "Access-Control-Allow-Methods": ", ".join(methods),
        "Access-Control-Max-Age": str(MAX_AGE_S),
    }
    if "*" in policy.allowed_headers:
        if wanted:
            headers["Access-Control-Allow-Headers"] = ", ".join(wanted)
    else:
        headers["Access-Control-Allow-Headers"] = ", ".join(policy.allowed_headers)
    if policy.allow_credentials:
        headers["Access-Control-Allow-Credentials"] = "true"
    if headers["Access-Control-Allow-Origin"] != "*":
        headers["Vary"] = "Origin"
    return web.Response(status=200, text="OK", headers=headers)


def install_cors(app: web.Application, policy: CorsPolicy) -> None:
    """Answer preflights and label responses for `policy` (call before the app starts; the
    preflight middleware goes first, so it runs before API-key checks)."""

    @web.middleware
    async def preflight(request: web.Request, handler: Handler) -> web.StreamResponse:
        if (request.method == "OPTIONS" and "Origin" in request.headers
                and "Access-Control-Request-Method" in request.headers):
            return _preflight(request, policy)
        return await handler(request)

    async def label(request: web.Request, response: web.StreamResponse) -> None:
        origin = request.headers.get("Origin")
        if origin is None or not policy.origin_allowed(origin):
            return
        value = policy.allow_origin_value(origin)
        response.headers["Access-Control-Allow-Origin"] = value
        if policy.allow_credentials:
            response.headers["Access-Control-Allow-Credentials"] = "true"
        if value != "*":
            response.headers.add("Vary", "Origin")

    app.middlewares.insert(0, preflight)
    app.on_response_prepare.append(label)
