"""One client request through the P/D pair: prefill leg, first token, decode leg.

Owns the per-request orchestration: choosing P and D, the same X-Request-Id on both legs, P's
`do_remote_decode` call, streaming the first token at once, D's `do_remote_prefill` call and
relaying/merging its answer (the client's body, extensions such as `return_token_ids` and
`ignore_eos` included, goes to both legs; D's `kv_transfer_stats` reach the client), error
pass-through, and cleanup on client disconnect or failure at any point after P was asked
(closing D's connection aborts it there; P is told to drop held blocks via POST /v1/abort, also
when the client leaves while P is still prefilling). A started stream always ends with an
error event and [DONE], whatever D sends. With the deployment secret, every request to P carries
`X-Hybridpd-Handoff-Auth` (HMAC over request id + body + time, `disagg/auth.py`): P hands off
state only to the proxy. Knows nothing of engines or tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
from aiohttp import web

from hybridpd.disagg.auth import HANDOFF_AUTH_HEADER, sign_handoff_request
from hybridpd.proxy import merge, sse
from hybridpd.proxy.proxy_metrics import Outcome, ProxyMetrics
from hybridpd.proxy.routing import Backend, BackendRole, NoBackendError, Router

log = logging.getLogger(__name__)
ABORT_TIMEOUT_S = 5.0


class BackendError(Exception):
    """A backend answered with an error (passed through) or could not be reached (502)."""

    def __init__(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        super().__init__(f"backend answered {status}")
        self.status, self.body, self.content_type = status, body, content_type


class PDFlow:
    def __init__(
        self, session: aiohttp.ClientSession, router: Router, metrics: ProxyMetrics,
        kv_secret: str | None = None,
    ) -> None:
        self.session, self.router, self.metrics = session, router, metrics
        self._secret = kv_secret
        self._background: set[asyncio.Task] = set()

    async def handle(
        self, http: web.Request, path: str, body: dict[str, Any], chat: bool
    ) -> web.StreamResponse:
        rid = http.headers.get("X-Request-Id") or _new_id(chat)
        try:
            return await self._handle(http, path, body, chat, rid)
        except (asyncio.CancelledError, ConnectionResetError):
            self.metrics.requests.inc(labels={"outcome": Outcome.CLIENT_DISCONNECT.value})
            raise

    async def _handle(
        self, http: web.Request, path: str, body: dict[str, Any], chat: bool, rid: str
    ) -> web.StreamResponse:
        start = time.monotonic()
        if not self.router.has_healthy(BackendRole.DECODE):  # fail before spending a prefill
            raise NoBackendError("no healthy decode instance")
        p, p_body = await self._prefill(path, body, rid)
        self.metrics.prefill_s.observe(time.monotonic() - start)
        stream = bool(body.get("stream"))
        if p_body.get("kv_transfer_params") is None:  # the request ended on P
            self.metrics.requests.inc(labels={"outcome": Outcome.FINISHED_ON_PREFILL.value})
            resp = await self._finished_on_prefill(http, p_body, chat, stream, body, rid, start)
            self.metrics.e2e.observe(time.monotonic() - start)
            return resp
        d_body = {**body, "kv_transfer_params": {"do_remote_prefill": True,
                                                 **p_body["kv_transfer_params"]}}
        done = False
        try:
            if stream:
                resp, done = await self._stream(http, path, d_body, p_body, chat, rid, start)
            else:
                resp = await self._non_stream(path, d_body, p_body, chat, rid, start)
                done = True
            return resp
        finally:
            if not done:  # D failed or the client left: P must not hold the state until lease end
                self._release_prefill(p, rid)

    # ---- prefill leg ------------------------------------------------------------------------
    async def _prefill(
        self, path: str, body: dict[str, Any], rid: str
    ) -> tuple[Backend, dict[str, Any]]:
        p_req = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
        p_req["stream"] = False
        p_req["kv_transfer_params"] = {"do_remote_decode": True}
        release = functools.partial(self._release_prefill, rid=rid)
        async with self._post(BackendRole.PREFILL, path, p_req, rid, release) as (p, resp):
            if resp.status != 200:
                raise BackendError(resp.status, await resp.read(), resp.content_type)
            p_body = await resp.json()
            if not isinstance(p_body, dict):
                raise aiohttp.ClientPayloadError("prefill instance answered a non-object")
            return p, p_body

    def _release_prefill(self, p: Backend, rid: str) -> None:
        async def abort() -> None:
            timeout = aiohttp.ClientTimeout(total=ABORT_TIMEOUT_S)
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError, OSError):
                async with self.session.post(f"{p.url}/v1/abort", json={"request_id": rid},
                                             timeout=timeout) as r:
                    await r.read()

        task = asyncio.get_running_loop().create_task(abort())  # survives our cancellation
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ---- decode leg -------------------------------------------------------------------------
    async def _non_stream(
        self, path: str, d_body: dict[str, Any], p_body: dict[str, Any], chat: bool, rid: str,
        start: float,
    ) -> web.Response:
        first = merge.first_piece(p_body, chat)
        async with self._post(BackendRole.DECODE, path, {**d_body, "stream": False}, rid) as (
            _d, resp,
        ):
            if resp.status != 200:
                raise BackendError(resp.status, await resp.read(), resp.content_type)
            out = merge.merge_final(first, await resp.json(), chat)
        self.metrics.e2e.observe(time.monotonic() - start)
        self.metrics.requests.inc(labels={"outcome": Outcome.OK.value})
        return web.json_response(out, headers={"X-Request-Id": rid})

    async def _stream(
        self, http: web.Request, path: str, d_body: dict[str, Any], p_body: dict[str, Any],
        chat: bool, rid: str, start: float,
    ) -> tuple[web.StreamResponse, bool]:
        """Relay D's stream after P's first token; (response, whether D completed)."""
        first = merge.first_piece(p_body, chat)
        created = int(p_body.get("created", time.time()))
        resp = await _start_sse(http, rid)
        await resp.write(sse.encode(merge.first_chunk(rid, p_body.get("model", ""), created,
                                                      first, chat)))
        sent_first = time.monotonic()
        self.metrics.ttft.observe(sent_first - start)
        try:
            ok = await self._relay_decode(resp, path, d_body, first, chat, rid, sent_first)
        except (NoBackendError, aiohttp.ClientError, asyncio.TimeoutError,
                sse.MalformedEventError) as exc:
            log.warning("request %s: decode leg failed: %s", rid, exc)
            await resp.write(sse.encode(_error(f"decode leg failed: {exc}")))
            ok = False
        except Exception as exc:  # noqa: BLE001 - a started stream must still end properly
            log.exception("request %s: relaying the decode leg failed", rid)
            await resp.write(sse.encode(_error(f"decode leg failed: {type(exc).__name__}")))
            ok = False
        await resp.write(sse.encode(sse.DONE))
        await resp.write_eof()
        outcome = Outcome.OK if ok else Outcome.BACKEND_ERROR
        self.metrics.requests.inc(labels={"outcome": outcome.value})
        self.metrics.e2e.observe(time.monotonic() - start)
        return resp, ok

    async def _relay_decode(
        self, resp: web.StreamResponse, path: str, d_body: dict[str, Any],
        first: merge.FirstPiece, chat: bool, rid: str, sent_first: float,
    ) -> bool:
        relayed_any = errored = False
        async with self._post(BackendRole.DECODE, path, d_body, rid) as (_d, d_resp):
            if d_resp.status != 200:
                await resp.write(sse.encode(await _error_payload(d_resp)))
                return False
            async for event in sse.events(d_resp.content):
                if event == sse.DONE:
                    return not errored
                errored = errored or "error" in event
                out = event if "error" in event else merge.rewrite_d_chunk(event, first, chat)
                if out is None:
                    continue
                if not relayed_any:
                    relayed_any = True
                    self.metrics.handover_s.observe(time.monotonic() - sent_first)
                await resp.write(sse.encode(out))
        return False  # the stream ended without [DONE]

    async def _finished_on_prefill(
        self, http: web.Request, p_body: dict[str, Any], chat: bool, stream: bool,
        body: dict[str, Any], rid: str, start: float,
    ) -> web.StreamResponse:
        if not stream:
            return web.json_response(merge.strip_transfer(p_body), headers={"X-Request-Id": rid})
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        resp = await _start_sse(http, rid)
        self.metrics.ttft.observe(time.monotonic() - start)
        for event in merge.finished_on_p_events(p_body, chat, include_usage):
            await resp.write(sse.encode(event))
        await resp.write_eof()
        return resp

    # ---- HTTP to backends -------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def _post(
        self, role: BackendRole, path: str, body: dict[str, Any], rid: str,
        on_failure: Callable[[Backend], None] | None = None,
    ) -> AsyncIterator[tuple[Backend, aiohttp.ClientResponse]]:
        """POST to a healthy backend of `role`; unreachable ones are marked down and skipped.
        Only connection *establishment* failures are retried: once a backend may have seen the
        request (e.g. a decode instance that already read the hand-off), a retry elsewhere
        could read state that was already consumed, so the error goes to the client.
        `on_failure(backend)` runs when anything (cancellation included) interrupts the
        exchange after the backend may have seen the request, except a BackendError."""
        tried: list[Backend] = []
        data = json.dumps(body).encode()
        while True:
            backend = self.router.pick(role, exclude=tried)
            tried.append(backend)
            headers = {"X-Request-Id": rid, "Content-Type": "application/json"}
            if self._secret and role is BackendRole.PREFILL:
                headers[HANDOFF_AUTH_HEADER] = sign_handoff_request(self._secret, rid, data)
            try:
                with self.router.track(backend):
                    resp = await self.session.post(f"{backend.url}{path}", data=data,
                                                   headers=headers)
            except (aiohttp.ClientConnectorError, ConnectionRefusedError) as exc:
                backend.healthy, backend.last_error = False, f"connect failed: {exc!r}"
                self.metrics.backend_errors.inc(labels={"role": role.value})
                continue
            except BaseException:  # e.g. the client left while the backend was working
                if on_failure is not None:
                    on_failure(backend)
                raise
            break
        with self.router.track(backend):
            try:
                if resp.status != 200:
                    self.metrics.backend_errors.inc(labels={"role": role.value})
                yield backend, resp
            except BaseException as exc:
                resp.close()  # closing the connection aborts the request on the backend
                if on_failure is not None and not isinstance(exc, BackendError):
                    on_failure(backend)
                raise
            finally:
                resp.release()


def _new_id(chat: bool) -> str:
    return f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"


async def _error_payload(resp: aiohttp.ClientResponse) -> dict[str, Any]:
    try:
        body = await resp.json(content_type=None)
        if isinstance(body, dict) and "error" in body:
            return body
    except (ValueError, aiohttp.ClientError):
        pass
    return _error(f"decode instance answered {resp.status}")


def _error(message: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": "server_error", "param": None, "code": None}}


async def _start_sse(http: web.Request, rid: str) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                       "Cache-Control": "no-cache", "X-Request-Id": rid})
    await resp.prepare(http)
    return resp
