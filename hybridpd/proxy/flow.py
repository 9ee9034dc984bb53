"""One client request through the P/D pair: prefill leg, first token, decode leg.

Owns the per-request orchestration: choosing P and D, the same X-Request-Id on both legs, P's
`do_remote_decode` call, streaming the first token at once, D's `do_remote_prefill` call and
relaying/merging its answer (the client's body, extensions such as `return_token_ids` and
`ignore_eos` included, goes to both legs; D's `kv_transfer_stats` reach the client, with the
proxy's `pd_timing` beside them: prefill_s, handover_s or decode_s, transfer_s), error
pass-through, and cleanup on client disconnect or failure at any point after P was asked
(closing D's connection aborts it there; P is told to drop held blocks via POST /v1/abort, also
when the client leaves while P is still prefilling). A started stream always ends with an
error event and [DONE], whatever D sends. A backend that answers 503 `queue_timeout` (its
queue deadline passed: it never started the request) is the one answer after which a leg is
tried on another instance of the same role. With n > 1, P runs n = 1 and D forks the
transferred state into the n choices (P's first piece starts each); a list of prompts runs
one P/D flow per prompt, concurrently, and merges their choices in prompt order (index = prompt
index x n + choice): one answer, or one stream with every prompt's chunks as they come (every
prefill first, so a refused prompt is the request's HTTP error). Chat tools: both legs answer
raw text and each choice's merged text is parsed for its own calls here. The client's
`Authorization` header goes to both
legs. With the deployment secret, every request to P carries `X-Hybridpd-Handoff-Auth` (HMAC
over request id + body + time, `disagg/auth.py`): P hands off state only to the proxy; the
proxy's own calls to P's /v1/abort carry an internal token made with the same secret
(`httpkit/auth.py`). Knows nothing of engines or tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
from aiohttp import web

from hybridpd.disagg.auth import HANDOFF_AUTH_HEADER, sign_handoff_request
from hybridpd.httpkit.auth import INTERNAL_AUTH_HEADER, internal_token
from hybridpd.openai import responses as R
from hybridpd.openai.errors import QUEUE_TIMEOUT_CODE, error_body
from hybridpd.openai.responses import new_request_id
from hybridpd.openai.structured import (
    TOOL_PARSER_FIELD,
    AutoCallStreams,
    ToolChoice,
    ToolParser,
    ToolPlan,
    answer_as_events,
    auto_call_chunk,
    calling_plan,
    with_tool_calls,
)
from hybridpd.proxy import merge, sse
from hybridpd.proxy.proxy_metrics import Outcome, ProxyMetrics
from hybridpd.proxy.routing import Backend, BackendRole, NoBackendError, Router
from hybridpd.server import handoff_edge
from hybridpd.server.protocol import chat_echo_of, is_prompt_list

log = logging.getLogger(__name__)
ABORT_TIMEOUT_S = 5.0
ABORT_PURPOSE = "abort"  # must match the instance's (server/api.py)
FORWARDED_HEADERS = ("Authorization",)
REQUEST_ID_KEY = web.RequestKey("request_id", str)  # the id both legs get (echoed by app.py)


class BackendError(Exception):
    """A backend answered with an error (passed through) or could not be reached (502)."""

    def __init__(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        super().__init__(f"backend answered {status}")
        self.status, self.body, self.content_type = status, body, content_type


class PDFlow:
    def __init__(
        self, session: aiohttp.ClientSession, router: Router, metrics: ProxyMetrics,
        secret: str | None = None,
    ) -> None:
        self.session, self.router, self.metrics = session, router, metrics
        self.secret = secret  # the deployment secret: authenticates our /v1/abort calls
        self._background: set[asyncio.Task] = set()

    async def handle(
        self, http: web.Request, path: str, body: dict[str, Any], chat: bool
    ) -> web.StreamResponse:
        rid = http.headers.get("X-Request-Id") or _new_id(chat)
        http[REQUEST_ID_KEY] = rid
        fwd = {k: http.headers[k] for k in FORWARDED_HEADERS if k in http.headers}
        try:
            return await self._handle(http, path, body, chat, rid, fwd)
        except (asyncio.CancelledError, ConnectionResetError):
            self.metrics.requests.inc(labels={"outcome": Outcome.CLIENT_DISCONNECT.value})
            raise

    async def _handle(
        self, http: web.Request, path: str, body: dict[str, Any], chat: bool, rid: str,
        fwd: dict[str, str],
    ) -> web.StreamResponse:
        start = time.monotonic()
        n = int(body.get("n") or 1)  # validated by the app; P is sent n = 1
        if not chat and is_prompt_list(body):
            return await self._prompt_list(http, path, body, rid, fwd, n, start)
        if not self.router.has_healthy(BackendRole.DECODE):  # fail before spending a prefill
            raise NoBackendError("no healthy decode instance")
        p, p_body = await self._prefill(path, body, rid, fwd)
        prefill_s = time.monotonic() - start
        stream = bool(body.get("stream"))
        self.metrics.observe_prefill(prefill_s, stream)
        plan = calling_plan(body) if chat else None
        calls: AutoCallStreams | None = None
        if plan is not None:
            plan = dataclasses.replace(plan, parser=ToolParser(  # the model's format, as P says
                p_body.pop(TOOL_PARSER_FIELD, ToolParser.HERMES.value)))
            if stream and plan.choice == ToolChoice.AUTO \
                    and handoff_edge.hands_off(p_body.get("kv_transfer_params")):
                calls = AutoCallStreams(plan)  # the text streams; a call is held and parsed
            else:  # tool calls parsed from the whole text, so answered whole
                return await self._tool_answer(http, path, body, p, p_body, plan, rid, start,
                                               fwd, prefill_s, n)
        if not handoff_edge.hands_off(p_body.get("kv_transfer_params")):  # the request ended on P
            self.metrics.requests.inc(labels={"outcome": Outcome.FINISHED_ON_PREFILL.value})
            resp = await self._finished_on_prefill(http, p_body, chat, stream, body, rid, start,
                                                   n)
            self.metrics.e2e.observe(time.monotonic() - start)
            return resp
        d_body = {**merge.decode_leg_body(body),
                  "kv_transfer_params": handoff_edge.decode_request(p_body["kv_transfer_params"])}
        done = False
        try:
            if stream:
                resp, done = await self._stream(http, path, d_body, p_body, chat, rid, start,
                                                fwd, prefill_s, calls, n,
                                                chat_echo_of(body) if chat else "")
            else:
                resp = await self._non_stream(path, d_body, p_body, chat, rid, start, fwd,
                                              prefill_s)
                done = True
            return resp
        finally:
            if not done:  # D failed or the client left: P must not hold the state until lease end
                self._release_prefill(p, rid, fwd)

    async def _prompt_list(
        self, http: web.Request, path: str, body: dict[str, Any], rid: str,
        fwd: dict[str, str], n: int, start: float,
    ) -> web.StreamResponse:
        """A completions list of prompts: one P/D flow per prompt (`{rid}-{i}`), concurrent;
        one answer with every choice in prompt order (streamed: `_stream_prompt_list`)."""
        prompts = body["prompt"]
        if not self.router.has_healthy(BackendRole.DECODE):
            raise NoBackendError("no healthy decode instance")
        if bool(body.get("stream")):
            return await self._stream_prompt_list(http, path, body, rid, fwd, n, start)
        tasks = [asyncio.ensure_future(self._answer(path, {**body, "prompt": p}, f"{rid}-{i}",
                                                    fwd, n)) for i, p in enumerate(prompts)]
        try:
            answers = await asyncio.gather(*tasks)
        except BaseException:  # one prompt failed (or the client left): stop the others
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        out = dict(answers[0])
        out["id"] = rid
        out["choices"] = [{**c, "index": i * n + int(c.get("index", 0))}
                          for i, a in enumerate(answers) for c in a["choices"]]
        uses = [a.get("usage") or {} for a in answers]
        prompt_tokens = sum(int(u.get("prompt_tokens", 0)) for u in uses)
        completion = sum(int(u.get("completion_tokens", 0)) for u in uses)
        out["usage"] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                        "total_tokens": prompt_tokens + completion}
        for key in ("pd_timing", "kv_transfer_stats"):
            out.pop(key, None)  # per prompt only: not one request's phases
        self.metrics.e2e.observe(time.monotonic() - start)
        self.metrics.requests.inc(labels={"outcome": Outcome.OK.value})
        return web.json_response(out, headers={"X-Request-Id": rid})

    async def _stream_prompt_list(
        self, http: web.Request, path: str, body: dict[str, Any], rid: str,
        fwd: dict[str, str], n: int, start: float,
    ) -> web.StreamResponse:
        """A streamed list of prompts: every prompt's prefill first, concurrently (a prompt P
        refuses is the request's HTTP error, nothing streamed, every other prompt's state
        released), then one stream with every prompt's first piece and its decode leg's
        chunks as they come, choice index = prompt index x n + choice (as vLLM), one usage
        chunk if asked, [DONE] once. A failed decode leg ends the stream with one error event
        and stops the others (each leg's P is told to drop what it holds)."""
        prompts = body["prompt"]
        rids = [f"{rid}-{i}" for i in range(len(prompts))]
        bodies = [{**body, "prompt": p} for p in prompts]
        prefills = [asyncio.ensure_future(self._prefill(path, b, r, fwd))
                    for b, r in zip(bodies, rids, strict=True)]
        try:
            legs = await asyncio.gather(*prefills)
        except BaseException:  # one prompt refused (or the client left): release the others
            for t in prefills:
                t.cancel()
            done = await asyncio.gather(*prefills, return_exceptions=True)
            for r, leg in zip(rids, done, strict=True):
                if isinstance(leg, tuple):
                    self._release_prefill(leg[0], r, fwd)
            raise
        self.metrics.observe_prefill(time.monotonic() - start, True)
        q: asyncio.Queue[_ListEvent] = asyncio.Queue()
        ctx = _ListStream(rid, str(legs[0][1].get("model", "")), int(time.time()), n,
                          _continuous_usage(body))

        async def run(i: int) -> None:
            try:
                use = await self._list_leg(path, bodies[i], rids[i], fwd, legs[i], i, ctx,
                                           q.put_nowait)
                q.put_nowait(_ListEvent(i, usage=use))
            except (BackendError, _LegFailedError, NoBackendError, aiohttp.ClientError,
                    asyncio.TimeoutError, sse.MalformedEventError) as exc:
                log.warning("request %s: decode leg of prompt %d failed: %s", rid, i, exc)
                q.put_nowait(_ListEvent(i, failure=_leg_error(exc)))
            except Exception as exc:  # noqa: BLE001 - a started stream must still end properly
                log.exception("request %s: relaying prompt %d failed", rid, i)
                q.put_nowait(_ListEvent(i, failure=_error(
                    f"decode leg failed: {type(exc).__name__}")))

        flows = [asyncio.ensure_future(run(i)) for i in range(len(prompts))]
        uses: list[dict[str, Any]] = []
        ok, sent_any = True, False
        try:
            resp = await _start_sse(http, rid)
            while len(uses) < len(flows):
                ev = await q.get()  # each leg ends with usage or a failure (its own deadlines)
                if ev.failure is not None:
                    await resp.write(sse.encode(ev.failure))
                    ok = False
                    break
                if ev.usage is not None:
                    uses.append(ev.usage)
                    continue
                assert ev.chunk is not None
                await resp.write(sse.encode(ev.chunk))
                if not sent_any:
                    sent_any = True
                    self.metrics.ttft.observe(time.monotonic() - start)
        finally:
            for flow in flows:  # the client left or a leg failed: the others stop, release
                flow.cancel()
            await asyncio.gather(*flows, return_exceptions=True)
        if ok and body.get("stream_options") and body["stream_options"].get("include_usage"):
            prompt_tokens = sum(int(u.get("prompt_tokens", 0)) for u in uses)
            completion = sum(int(u.get("completion_tokens", 0)) for u in uses)
            await resp.write(sse.encode(R.usage_chunk(rid, ctx.model, ctx.created,
                                                      R.chunk_object(False),
                                                      R.usage(prompt_tokens, completion))))
        await resp.write(sse.encode(sse.DONE))
        await resp.write_eof()
        outcome = Outcome.OK if ok else Outcome.BACKEND_ERROR
        self.metrics.requests.inc(labels={"outcome": outcome.value})
        self.metrics.e2e.observe(time.monotonic() - start)
        return resp

    async def _list_leg(
        self, path: str, body: dict[str, Any], rid: str, fwd: dict[str, str],
        leg: tuple[Backend, dict[str, Any]], i: int, ctx: _ListStream,
        emit: Callable[[_ListEvent], None],
    ) -> dict[str, Any]:
        """Prompt i of a streamed list after its prefill: its first piece, then its decode
        leg's chunks (as the client's, choices re-indexed) through `emit`; returns the
        prompt's usage (P's first piece counted once per choice). P is released unless D
        finished."""
        p, p_body = leg
        first = merge.first_piece(p_body, False)
        p_use = R.usage(first.prompt_tokens, ctx.n * first.completion_tokens)
        if not handoff_edge.hands_off(p_body.get("kv_transfer_params")):  # it ended on P
            for event in merge.finished_on_p_events(p_body, False, False, ctx.continuous,
                                                     ctx.n):
                if isinstance(event, dict):
                    emit(_ListEvent(i, chunk=ctx.client_chunk(event, i)))
            return p_use
        emit(_ListEvent(i, chunk=ctx.client_chunk(merge.first_chunk(
            rid, ctx.model, ctx.created, first, False, ctx.continuous, ctx.n), i)))
        d_body = {**merge.decode_leg_body(body),
                  "stream_options": {"include_usage": True,
                                     "continuous_usage_stats": ctx.continuous},
                  "kv_transfer_params": handoff_edge.decode_request(p_body["kv_transfer_params"])}
        use, done = p_use, False
        try:
            async with self._post(BackendRole.DECODE, path, d_body, rid, fwd) as (_d, d_resp):
                if d_resp.status != 200:
                    raise _LegFailedError(await _error_payload(d_resp))
                async for event in sse.events(d_resp.content):
                    if isinstance(event, str):  # the one string event is sse.DONE
                        done = True
                        return use
                    if "error" in event:
                        raise _LegFailedError(event)
                    out = merge.rewrite_d_chunk(event, first, False, ctx.n)
                    if out is None:
                        continue
                    if not out.get("choices"):  # D's usage chunk: P's piece already counted
                        use = out.get("usage") or use
                        continue
                    out.pop("kv_transfer_stats", None)  # per prompt: not the request's
                    emit(_ListEvent(i, chunk=ctx.client_chunk(out, i)))
            raise _LegFailedError(_error("decode leg ended its stream without [DONE]"))
        finally:
            if not done:  # D failed, a sibling failed, or the client left
                self._release_prefill(p, rid, fwd)

    async def _answer(self, path: str, body: dict[str, Any], rid: str, fwd: dict[str, str],
                      n: int) -> dict[str, Any]:
        """One prompt's whole non-streaming P/D answer (P released if D does not finish)."""
        p, p_body = await self._prefill(path, body, rid, fwd)
        if p_body.get("kv_transfer_params") is None:
            return merge.finished_on_p(p_body, n)
        d_body = {**body, "stream": False,
                  "kv_transfer_params": {"do_remote_prefill": True,
                                         **p_body["kv_transfer_params"]}}
        done = False
        try:
            async with self._post(BackendRole.DECODE, path, d_body, rid, fwd) as (_d, resp):
                if resp.status != 200:
                    raise BackendError(resp.status, await resp.read(), resp.content_type)
                out = merge.merge_final(merge.first_piece(p_body, False), await resp.json(),
                                        False)
            done = True
            return out
        finally:
            if not done:  # D failed, or a sibling prompt failed and cancelled this one
                self._release_prefill(p, rid, fwd)

    # ---- prefill leg ------------------------------------------------------------------------
    async def _prefill(
        self, path: str, body: dict[str, Any], rid: str, fwd: dict[str, str]
    ) -> tuple[Backend, dict[str, Any]]:
        p_req = {k: v for k, v in body.items()
                 if k not in ("stream", "stream_options", "n", "best_of")}
        p_req["stream"] = False  # and n = 1: D forks the prompt's state into the n choices
        p_req["kv_transfer_params"] = handoff_edge.prefill_request()
        release = functools.partial(self._release_prefill, rid=rid, fwd=fwd)
        async with self._post(BackendRole.PREFILL, path, p_req, rid, fwd, release) as (
            p, resp,
        ):
            if resp.status != 200:
                raise BackendError(resp.status, await resp.read(), resp.content_type)
            p_body = await resp.json()
            if not isinstance(p_body, dict):
                raise aiohttp.ClientPayloadError("prefill instance answered a non-object")
            return p, p_body

    def _release_prefill(self, p: Backend, rid: str, fwd: dict[str, str] | None = None) -> None:
        headers = dict(fwd or {})
        if self.secret:
            headers[INTERNAL_AUTH_HEADER] = internal_token(self.secret, ABORT_PURPOSE, rid)

        async def abort() -> None:
            timeout = aiohttp.ClientTimeout(total=ABORT_TIMEOUT_S)
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError, OSError):
                async with self.session.post(f"{p.url}/v1/abort", json={"request_id": rid},
                                             headers=headers, timeout=timeout) as r:
                    await r.read()

        task = asyncio.get_running_loop().create_task(abort())  # survives our cancellation
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ---- decode leg -------------------------------------------------------------------------
    async def _tool_answer(
        self, http: web.Request, path: str, body: dict[str, Any], p: Backend,
        p_body: dict[str, Any], plan: ToolPlan, rid: str, start: float, fwd: dict[str, str],
        prefill_s: float, n: int = 1,
    ) -> web.StreamResponse:
        """A chat request that may call tools: both legs answer raw text; each choice's merged
        text becomes its own tool_calls here; a stream gets each choice whole, one chunk each."""
        echo = chat_echo_of(body)
        if not handoff_edge.hands_off(p_body.get("kv_transfer_params")):  # the request ended on P
            self.metrics.requests.inc(labels={"outcome": Outcome.FINISHED_ON_PREFILL.value})
            out = merge.finished_on_p(p_body, n)
        else:
            d_body = {**merge.decode_leg_body(body), "stream": False,  # P echoed and scored
                      "kv_transfer_params": handoff_edge.decode_request(
                          p_body["kv_transfer_params"])}
            d_body.pop("stream_options", None)
            try:
                out = await self._decode_merged(path, d_body, p_body, True, rid, start, fwd,
                                                prefill_s)
            except BaseException:  # D failed or the client left: P must not hold the state
                self._release_prefill(p, rid, fwd)
                raise
        out.pop(TOOL_PARSER_FIELD, None)
        out = merge.with_chat_echo(with_tool_calls(merge.without_chat_echo(out, echo), plan),
                                   echo)  # as the instance: the echo is never parsed
        if not body.get("stream"):
            return web.json_response(out, headers={"X-Request-Id": rid})
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        sse_resp = await _start_sse(http, rid)
        for event in answer_as_events(out, include_usage):
            await sse_resp.write(sse.encode(event))
        await sse_resp.write(sse.encode(sse.DONE))
        await sse_resp.write_eof()
        return sse_resp

    async def _non_stream(
        self, path: str, d_body: dict[str, Any], p_body: dict[str, Any], chat: bool, rid: str,
        start: float, fwd: dict[str, str], prefill_s: float = 0.0,
    ) -> web.Response:
        out = await self._decode_merged(path, d_body, p_body, chat, rid, start, fwd, prefill_s)
        return web.json_response(out, headers={"X-Request-Id": rid})

    async def _decode_merged(
        self, path: str, d_body: dict[str, Any], p_body: dict[str, Any], chat: bool, rid: str,
        start: float, fwd: dict[str, str], prefill_s: float = 0.0,
    ) -> dict[str, Any]:
        """D's whole answer merged with P's first piece."""
        first = merge.first_piece(p_body, chat)
        d_start = time.monotonic()
        async with self._post(BackendRole.DECODE, path, {**d_body, "stream": False}, rid,
                              fwd) as (
            _d, resp,
        ):
            if resp.status != 200:
                raise BackendError(resp.status, await resp.read(), resp.content_type)
            out = merge.merge_final(first, await resp.json(), chat)
        out["pd_timing"] = _timing(out, prefill_s=prefill_s, decode_s=time.monotonic() - d_start)
        self.metrics.e2e.observe(time.monotonic() - start)
        self.metrics.requests.inc(labels={"outcome": Outcome.OK.value})
        return out

    async def _stream(
        self, http: web.Request, path: str, d_body: dict[str, Any], p_body: dict[str, Any],
        chat: bool, rid: str, start: float, fwd: dict[str, str], prefill_s: float = 0.0,
        calls: AutoCallStreams | None = None, n: int = 1, echo: str = "",
    ) -> tuple[web.StreamResponse, bool]:
        """Relay D's stream after P's first token; (response, whether D completed). `calls`:
        tools in auto mode, whose possible calls are held back and parsed at the end; `echo`:
        chat echo (P's piece starts with it; it goes out in its own chunks, as vLLM)."""
        model, continuous = p_body.get("model", ""), _continuous_usage(d_body)
        created = int(p_body.get("created", time.time()))
        echoed, first = merge.echo_chunks(rid, model, created, merge.first_piece(p_body, chat),
                                          echo, continuous, n)
        resp = await _start_sse(http, rid)
        for chunk in echoed:
            await resp.write(sse.encode(chunk))
        head = merge.first_chunk(rid, model, created, first, chat, continuous, n,
                                 role=not echoed)
        if calls is not None:  # each choice starts with P's piece
            head["choices"] = [{**c, "delta": {**c["delta"], "content": calls.of(
                int(c["index"])).push(first.text)}} for c in head["choices"]]
        await resp.write(sse.encode(head))
        sent_first = time.monotonic()
        self.metrics.ttft.observe(sent_first - start)
        try:
            ok = await self._relay_decode(resp, path, d_body, first, chat, rid, sent_first,
                                          fwd, prefill_s, calls, n)
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
        first: merge.FirstPiece, chat: bool, rid: str, sent_first: float, fwd: dict[str, str],
        prefill_s: float = 0.0, calls: AutoCallStreams | None = None, n: int = 1,
    ) -> bool:
        relayed_any = errored = False
        handover: float | None = None
        async with self._post(BackendRole.DECODE, path, d_body, rid, fwd) as (_d, d_resp):
            if d_resp.status != 200:
                await resp.write(sse.encode(await _error_payload(d_resp)))
                return False
            async for event in sse.events(d_resp.content):
                if isinstance(event, str):  # the one string event is sse.DONE
                    return not errored
                errored = errored or "error" in event
                out = event if "error" in event else merge.rewrite_d_chunk(event, first, chat, n)
                if out is not None and calls is not None and "error" not in out:
                    out = auto_call_chunk(out, calls)
                if out is None:
                    continue
                if not relayed_any:
                    relayed_any = True
                    handover = time.monotonic() - sent_first
                    self.metrics.handover_s.observe(handover)
                if "kv_transfer_stats" in out:  # D's final chunk: the request's P/D phases
                    out["pd_timing"] = _timing(out, prefill_s=prefill_s, handover_s=handover)
                    self._observe_handover(out["pd_timing"])
                await resp.write(sse.encode(out))
        return False  # the stream ended without [DONE]

    async def _finished_on_prefill(
        self, http: web.Request, p_body: dict[str, Any], chat: bool, stream: bool,
        body: dict[str, Any], rid: str, start: float, n: int = 1,
    ) -> web.StreamResponse:
        if not stream:
            return web.json_response(merge.finished_on_p(p_body, n),
                                     headers={"X-Request-Id": rid})
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        continuous = _continuous_usage(body)
        resp = await _start_sse(http, rid)
        self.metrics.ttft.observe(time.monotonic() - start)
        for event in merge.finished_on_p_events(p_body, chat, include_usage, continuous, n):
            await resp.write(sse.encode(event))
        await resp.write_eof()
        return resp

    def _observe_handover(self, timing: dict[str, float]) -> None:
        """The handover split: the transfer D measured, and everything else."""
        if "handover_s" in timing and "transfer_s" in timing:
            self.metrics.handover_transfer_s.observe(timing["transfer_s"])
            self.metrics.handover_rest_s.observe(max(0.0, timing["handover_s"]
                                                     - timing["transfer_s"]))

    # ---- HTTP to backends -------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def _post(
        self, role: BackendRole, path: str, body: dict[str, Any], rid: str,
        fwd: dict[str, str], on_failure: Callable[[Backend], None] | None = None,
    ) -> AsyncIterator[tuple[Backend, aiohttp.ClientResponse]]:
        """POST to a healthy backend of `role`; unreachable ones are marked down and skipped.
        Only connection *establishment* failures and a 503 `queue_timeout` (the backend says
        it never started the request) are retried elsewhere: once a backend may have seen
        the request (e.g. a decode instance that already read the hand-off), a retry
        elsewhere could read state that was already consumed, so the error goes to the
        client. `on_failure(backend)` runs when anything (cancellation included) interrupts
        the exchange after the backend may have seen the request, except a BackendError."""
        tried: list[Backend] = []
        data = json.dumps(body).encode()
        base_headers = {**fwd, "X-Request-Id": rid, "Content-Type": "application/json"}
        while True:
            backend = self.router.pick(role, exclude=tried)
            tried.append(backend)
            headers = dict(base_headers)
            if self.secret and role is BackendRole.PREFILL:
                headers[HANDOFF_AUTH_HEADER] = sign_handoff_request(self.secret, rid, data)
            try:
                with self.router.track(backend):
                    resp = await self.session.post(f"{backend.url}{path}", data=data,
                                                   headers=headers)
                    if await self._never_started(resp) and self.router.has_other(role, tried):
                        resp.release()
                        self.metrics.backend_errors.inc(labels={"role": role.value})
                        log.info("request %s: %s %s never started it (queue deadline); "
                                 "trying another instance", rid, role.value, backend.url)
                        continue
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
                    self.metrics.observe_backend_status(role.value, resp.status)
                yield backend, resp
            except BaseException as exc:
                resp.close()  # closing the connection aborts the request on the backend
                if on_failure is not None and not isinstance(exc, BackendError):
                    on_failure(backend)
                raise
            finally:
                resp.release()


    @staticmethod
    async def _never_started(resp: aiohttp.ClientResponse) -> bool:
        """A 503 whose OpenAI-shaped error has code `queue_timeout` (its body stays readable)."""
        if resp.status != 503:
            return False
        try:
            body = await resp.json(content_type=None)
        except (ValueError, aiohttp.ClientError):
            return False
        err = body.get("error") if isinstance(body, dict) else None
        return isinstance(err, dict) and err.get("code") == QUEUE_TIMEOUT_CODE


class _LegFailedError(Exception):
    """A decode leg of a streamed prompt list answered an error (its OpenAI error body)."""

    def __init__(self, payload: dict[str, Any]) -> None:
        super().__init__(str(payload.get("error", payload)))
        self.payload = payload


@dataclasses.dataclass(frozen=True)
class _ListEvent:
    """What one prompt's flow of a streamed list reports: a client chunk, its usage (it
    ended) or a failure (the error event the client gets)."""

    prompt: int
    chunk: dict[str, Any] | None = None
    usage: dict[str, Any] | None = None
    failure: dict[str, Any] | None = None


@dataclasses.dataclass(frozen=True)
class _ListStream:
    """What every chunk of a streamed prompt list shares: id, model, created, n."""

    rid: str
    model: str
    created: int
    n: int
    continuous: bool

    def client_chunk(self, chunk: dict[str, Any], prompt: int) -> dict[str, Any]:
        """A prompt's chunk as the client's: the request's id, choice index = prompt x n +
        choice."""
        base = prompt * self.n
        return {**chunk, "id": self.rid, "created": self.created, "choices": [
            {**c, "index": base + int(c.get("index", 0))} for c in chunk.get("choices") or ()]}


def _leg_error(exc: Exception) -> dict[str, Any]:
    """The error event a failed decode leg of a prompt list ends the stream with."""
    if isinstance(exc, _LegFailedError):
        return exc.payload
    if isinstance(exc, BackendError):
        try:
            body = json.loads(exc.body)
            if isinstance(body, dict) and "error" in body:
                return body
        except ValueError:
            pass
        return _error(f"decode instance answered {exc.status}")
    return _error(f"decode leg failed: {exc}")


def _timing(body: dict[str, Any], **phases: float | None) -> dict[str, float]:
    """`pd_timing`: the proxy's phases of one request (seconds) plus D's transfer time."""
    out = {k: v for k, v in phases.items() if v is not None}
    stats = body.get("kv_transfer_stats")
    if isinstance(stats, dict) and isinstance(stats.get("seconds"), int | float):
        out["transfer_s"] = float(stats["seconds"])
    return out


def _continuous_usage(body: dict[str, Any]) -> bool:
    """`stream_options.continuous_usage_stats` with include_usage (validated by the app)."""
    opts = body.get("stream_options") or {}
    return bool(opts.get("include_usage") and opts.get("continuous_usage_stats"))


def _new_id(chat: bool) -> str:
    return new_request_id("chatcmpl" if chat else "cmpl")


async def _error_payload(resp: aiohttp.ClientResponse) -> dict[str, Any]:
    try:
        body = await resp.json(content_type=None)
        if isinstance(body, dict) and "error" in body:
            return body
    except (ValueError, aiohttp.ClientError):
        pass
    return _error(f"decode instance answered {resp.status}")


def _error(message: str) -> dict[str, Any]:
    return error_body(message, "server_error")


async def _start_sse(http: web.Request, rid: str) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                       "Cache-Control": "no-cache", "X-Request-Id": rid})
    await resp.prepare(http)
    return resp
