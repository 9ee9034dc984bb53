"""Serving one completion or chat request: prompt -> engine request -> OpenAI response.

Owns tokenization (off the event loop: a multi-megabyte prompt must not stall /health or other
streams; text longer than the context could ever hold is refused before it) and length checks,
the request id, the non-streaming and SSE-streaming response flows, the P/D hand-off (the
request's `kv_transfer_params` made typed, P's answer signed: `handoff_edge.py`), the
`return_token_ids` and `kv_transfer_stats` extensions (which chunk carries
what), several choices (n > 1 and lists of prompts: one engine request per prompt, run
concurrently, choices prompt-major; with chat tools each choice parses its own calls, with chat
echo every choice starts with it), and latency observations. Knows nothing of routing or app
lifecycle (see `api.py`) nor of the engine's internals.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

from aiohttp import web

from hybridpd.disagg.handoff import Handoff
from hybridpd.disagg.params import TransferParams
from hybridpd.engine.protocol import ErrorKind, GenerateRequest, TokenLogprob
from hybridpd.httpkit.bodies import DEFAULT_TIMEOUT_S as DEFAULT_BODY_TIMEOUT_S
from hybridpd.httpkit.cors import CorsPolicy
from hybridpd.openai import responses as R
from hybridpd.openai.structured import (
    TOOL_PARSER_FIELD,
    AutoCallStream,
    ToolChoice,
    ToolParser,
    tool_parser_for,
)
from hybridpd.request import SamplingParams
from hybridpd.server import handoff_edge
from hybridpd.server.engine_client import EngineClient, EngineDeadError
from hybridpd.server.generation import Delta, GenerationError, TextOptions, text_deltas
from hybridpd.server.protocol import QUEUE_TIMEOUT_CODE, ApiError, ApiRequest, Endpoint
from hybridpd.server.server_metrics import RequestObserver, ServerMetrics

DEFAULT_COMPLETION_MAX_TOKENS = 16


@dataclass(frozen=True)
class ServerConfig:
    model_name: str
    max_model_len: int
    role: str = "both"
    vocab_size: int | None = None  # the model's (may exceed the tokenizer's: padded vocab)
    api_key: str | None = field(default=None, repr=False)  # guards /v1/* (Bearer) when set
    deployment_secret: str | None = field(default=None, repr=False)  # the proxy's /v1/abort
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S
    max_body_bytes: int | None = None  # None: sized from the context (`server/limits.py`)
    cors: CorsPolicy | None = None  # None: no CORS headers, preflights get 405
    model_aliases: tuple[str, ...] = ()  # more names accepted as `model` (--served-model-name)

    @property
    def model_names(self) -> tuple[str, ...]:
        return (self.model_name, *self.model_aliases)



class CompletionService:
    def __init__(
        self, client: EngineClient, tokenizer: Any, config: ServerConfig, metrics: ServerMetrics,
        max_prompt_bytes: int | None = None,
    ) -> None:
        self.client, self.tokenizer, self.config, self.metrics = client, tokenizer, config, metrics
        self.max_prompt_bytes = max_prompt_bytes  # text longer than this cannot fit the context
        self.tool_parser = tool_parser_for(getattr(tokenizer, "chat_template", None))

    # ---- request preparation --------------------------------------------------------------
    async def prepare_all(self, api: ApiRequest, request_id: str) -> list[GenerateRequest]:
        """One engine request per prompt: `request_id` for one prompt, `{request_id}-{i}` for
        prompt i of a list."""
        if not api.prompts:
            return [await self.prepare(api, request_id)]
        return [await self.prepare(replace(api, prompt=p, prompts=()), f"{request_id}-{i}")
                for i, p in enumerate(api.prompts)]

    async def prepare(self, api: ApiRequest, request_id: str) -> GenerateRequest:
        if api.model is not None and api.model not in self.config.model_names:
            raise ApiError(
                f"model {api.model!r} does not exist; this server serves "
                f"{self.config.model_name!r}", "model", status=404, code="model_not_found"
            )
        if isinstance(api.prompt, str) or api.endpoint is Endpoint.CHAT:
            self._check_text_size(api)  # before any tokenising: cheap, bounded memory
            ids = await asyncio.to_thread(self._prompt_ids, api)  # CPU-heavy on long text
        else:
            ids = self._prompt_ids(api)
        limit = self.config.max_model_len
        scoring_only = api.max_tokens == 0  # the prompt alone (scored) must fit
        if len(ids) > limit or (len(ids) == limit and not scoring_only):
            raise ApiError(
                f"prompt has {len(ids)} tokens; max-model-len is {limit} "
                "(prompt plus at least one generated token must fit, unless max_tokens=0)",
                "prompt", code="context_length_exceeded",
            )
        max_tokens = api.max_tokens
        if max_tokens is None:
            room = limit - len(ids)
            is_chat = api.endpoint is Endpoint.CHAT
            max_tokens = room if is_chat else min(DEFAULT_COMPLETION_MAX_TOKENS, room)
        if len(ids) + max_tokens > limit:
            raise ApiError(
                f"prompt ({len(ids)} tokens) plus max_tokens ({max_tokens}) exceeds "
                f"max-model-len {limit}", "max_tokens", code="context_length_exceeded",
            )
        return GenerateRequest(
            request_id=request_id,
            prompt_token_ids=tuple(ids),
            params=self._params(api, max_tokens),
            handoff=self._handoff(api),
        )

    def _handoff(self, api: ApiRequest) -> Handoff | None:
        """The typed hand-off (a D leg's params verified under the deployment secret first);
        a 400 naming `kv_transfer_params` before anything is queued."""
        try:
            return handoff_edge.from_request(api.kv_transfer_params,
                                             self.config.deployment_secret)
        except ValueError as exc:
            raise ApiError(str(exc), "kv_transfer_params") from None

    def _handoff_answer(self, params: TransferParams | None) -> dict[str, Any] | None:
        """P's hand-off as it answers it: JSON, signed under the deployment secret."""
        return handoff_edge.to_answer(params, self.config.deployment_secret)

    def _params(self, api: ApiRequest, max_tokens: int) -> SamplingParams:
        """The engine's params: `bad_words` tokenized as vLLM does, every token id the params
        name checked against the vocabulary (a 400 naming the field)."""
        words: tuple[tuple[int, ...], ...] = ()
        if api.bad_words:
            try:
                words = self.tokenizer.encode_bad_words(api.bad_words)
            except ValueError as exc:
                raise ApiError(str(exc), "bad_words") from None
        vocab = self.config.vocab_size or getattr(self.tokenizer, "vocab_size", None)
        return api.sampling_params(max_tokens, words, vocab)

    def _check_text_size(self, api: ApiRequest, rendered: str | None = None) -> None:
        """400 for text that cannot fit the context: more UTF-8 bytes than max-model-len times
        the most bytes one token stands for."""
        limit = self.max_prompt_bytes
        if limit is None:
            return
        if rendered is not None:
            texts, param = [rendered], "messages"
        elif api.endpoint is Endpoint.CHAT:
            texts, param = [m["content"] for m in api.messages or ()], "messages"
        else:
            texts, param = [str(api.prompt)], "prompt"
        size = 0
        for t in texts:  # len(t) <= its UTF-8 size: stop before encoding a hopeless text
            size += len(t) if len(t) > limit else len(t.encode("utf-8"))
            if size > limit:
                raise ApiError(
                    f"{param} text of {size}+ bytes cannot fit max-model-len "
                    f"{self.config.max_model_len} (at most {limit} bytes: max-model-len x the "
                    "most bytes per token of this tokenizer)", param,
                    code="context_length_exceeded",
                )

    def _prompt_ids(self, api: ApiRequest) -> list[int]:
        if api.endpoint is Endpoint.CHAT:
            text = self._render_chat(api)
            self._check_text_size(api, rendered=text)
            return list(self.tokenizer.encode(text, add_special_tokens=False))
        if isinstance(api.prompt, str):
            return list(self.tokenizer.encode(api.prompt))
        vocab = self.config.vocab_size or getattr(self.tokenizer, "vocab_size", None)
        ids = list(api.prompt or ())
        if vocab is not None and any(t >= vocab for t in ids):
            raise ApiError(f"prompt token ids must be < vocab size {vocab}", "prompt")
        return ids

    def _render_chat(self, api: ApiRequest) -> str:
        """The chat template's text; with `continue_final_message` the text ends where the
        final message's content ends (no end-of-turn), so the model continues it."""
        msgs = list(api.messages or ())
        opts = dict(api.template_options)
        if api.tools is not None:
            opts["tools"] = api.tools.template_tools()
        cont = bool(opts.pop("continue_final_message", False))
        if cont:
            opts["add_generation_prompt"] = False
        try:
            text = str(self.tokenizer.apply_chat_template(msgs, **opts) if opts
                       else self.tokenizer.apply_chat_template(msgs))
        except (ValueError, TypeError) as exc:
            raise ApiError(f"invalid messages: {exc}", "messages") from None
        if cont:
            final = msgs[-1]["content"]
            end = text.rfind(final) if final else -1
            if end < 0:
                raise ApiError("continue_final_message: the chat template does not contain the "
                               "final message's content", "continue_final_message")
            text = text[: end + len(final)]
        return text

    # ---- responses --------------------------------------------------------------------------
    async def respond(
        self, http: web.Request, api: ApiRequest, reqs: GenerateRequest | list[GenerateRequest],
        public_id: str | None = None,
    ) -> web.StreamResponse:
        """Serve `reqs` (one per prompt); the client sees `public_id` (its own X-Request-Id,
        also when the engine runs the request under a different, unique id)."""
        reqs = reqs if isinstance(reqs, list) else [reqs]
        req = reqs[0]
        rid = public_id or req.request_id
        start = time.monotonic()
        text_opts = TextOptions(api.skip_special_tokens, api.include_stop_str_in_output)
        try:
            if api.multi:
                if api.stream:
                    return await self._stream_many(http, api, reqs, rid, start, text_opts)
                return web.json_response(
                    await self._collect_many(api, reqs, rid, start, text_opts),
                    headers={"X-Request-Id": rid})
            deltas = self._observed(text_deltas(self.client, req, self.tokenizer, text_opts),
                                    self.metrics.observer(req.handoff, start))
            async with contextlib.aclosing(deltas):  # leaving early aborts the engine request
                if api.stream:
                    return await self._stream(http, api, req, deltas, rid)
                return web.json_response(await self._collect(api, req, deltas, rid),
                                         headers={"X-Request-Id": rid})
        except (asyncio.CancelledError, ConnectionResetError):
            self.metrics.observe_client_abort()  # the client went away; the engine aborts it
            raise
        except EngineDeadError as exc:  # dead before the request started: try again later
            msg = f"engine unavailable: {exc}"
            raise ApiError(msg, status=503, err_type="server_error") from None
        except GenerationError as exc:
            err_type = "invalid_request_error" if exc.status < 500 else "server_error"
            code = QUEUE_TIMEOUT_CODE if exc.kind is ErrorKind.QUEUE_TIMEOUT else None
            raise ApiError(exc.message, status=exc.status, err_type=err_type,
                           code=code) from None

    async def _observed(
        self, deltas: AsyncGenerator[Delta, None], obs: RequestObserver
    ) -> AsyncGenerator[Delta, None]:
        fresh = replace(obs, count_prompt=False)  # choices 1.. (n > 1): the prompt counts once
        observers: dict[int, RequestObserver] = {0: obs}
        async with contextlib.aclosing(deltas):
            async for d in deltas:
                o = observers.get(d.index)
                if o is None:
                    o = observers[d.index] = replace(fresh)
                o.observe(d.at, len(d.token_ids), d.finish_reason, d.num_prompt_tokens,
                          d.transfer_stats, d.queued_s)
                yield d

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def _logprobs(self, api: ApiRequest, lps: list[TokenLogprob], offset: int) -> Any:
        if api.logprobs is None:
            return None
        if api.endpoint is Endpoint.CHAT:
            return R.chat_logprobs(lps, self._token_text)
        return R.completion_logprobs(lps, self._token_text, offset)

    async def _collect(
        self, api: ApiRequest, req: GenerateRequest, deltas: AsyncIterator[Delta], rid: str
    ) -> dict[str, Any]:
        texts: list[str] = []
        lps: list[TokenLogprob] = []
        ids: list[int] = []
        last, stats, prompt_lps = None, None, None
        async for d in deltas:
            texts.append(d.text)
            lps.extend(d.logprobs)
            ids.extend(d.token_ids)
            stats = d.transfer_stats or stats
            prompt_lps = d.prompt_logprobs if d.prompt_logprobs is not None else prompt_lps
            last = d
        assert last is not None  # text_deltas ends with a finished delta or raises
        use = R.usage(last.num_prompt_tokens, len(ids))
        echo = self._echo_text(api, req)
        text, logprobs = echo + "".join(texts), self._logprobs(api, lps, len(echo))
        if api.echo and logprobs is not None:
            logprobs = R.join_completion_logprobs(self._echo_logprobs(api, req, prompt_lps),
                                                  logprobs)
        if api.endpoint is Endpoint.CHAT:
            content, calls, finish = self._tool_calls(api, text, last.finish_reason)
            content = _with_chat_echo(api, content)
            body = R.chat_body(rid, self.config.model_name, content,
                               finish, logprobs, use, tool_calls=calls)
            if api.tools is not None and api.kv_transfer_params is not None:
                body[TOOL_PARSER_FIELD] = self.tool_parser.value  # the proxy parses the calls
        else:
            body = R.completion_body(rid, self.config.model_name, text,
                                     last.finish_reason, logprobs, use)
        if req.handoff is not None:
            body["kv_transfer_params"] = self._handoff_answer(last.kv_transfer_params)
        if api.return_token_ids:
            R.add_token_ids(body, ids, req.prompt_token_ids)
        self._add_prompt_logprobs(api, body, prompt_lps)
        return R.add_transfer_stats(body, stats)

    def _tool_calls(self, api: ApiRequest, text: str, finish: str | None
                    ) -> tuple[str | None, list[dict[str, Any]] | None, str | None]:
        """(content, OpenAI tool_calls, finish_reason) of a finished chat output. A P/D leg
        answers its raw text: only the proxy sees the whole output (P's token + D's)."""
        if api.tools is None or api.kv_transfer_params is not None:
            return text, None, finish
        content, calls = replace(api.tools, parser=self.tool_parser).parse(text)
        if not calls:
            return content, None, finish
        return content, [c.to_openai() for c in calls], "tool_calls" if finish == "stop" \
            else finish

    async def _stream_tool_calls(
        self, http: web.Request, api: ApiRequest, req: GenerateRequest,
        deltas: AsyncIterator[Delta], rid: str,
    ) -> web.StreamResponse:
        """Streamed chat with tools that may be called: the calls are known once the output
        is, so the answer comes as one chunk (role, content and/or tool_calls) at the end."""
        created, model = int(time.time()), self.config.model_name
        texts: list[str] = []
        n_out, n_prompt, last = 0, len(req.prompt_token_ids), None
        async for d in deltas:
            texts.append(d.text)
            n_out += len(d.token_ids)
            n_prompt, last = d.num_prompt_tokens, d
        assert last is not None  # text_deltas ends with a finished delta or raises
        content, calls, finish = self._tool_calls(api, "".join(texts), last.finish_reason)
        content = _with_chat_echo(api, content)
        resp = await self._start_sse(http, rid)
        delta: dict[str, Any] = {"role": "assistant", "content": content}
        if calls:
            delta["tool_calls"] = [{"index": i, **c} for i, c in enumerate(calls)]
        await resp.write(R.sse(R.chat_chunk(rid, model, created, delta, finish)))
        if api.include_usage:
            await resp.write(R.sse(R.usage_chunk(rid, model, created,
                                                 "chat.completion.chunk",
                                                 R.usage(n_prompt, n_out))))
        await resp.write(R.sse("[DONE]"))
        await resp.write_eof()
        return resp
    def _echo_text(self, api: ApiRequest, req: GenerateRequest) -> str:
        """With `echo` (completions): the prompt as sent, or its token ids decoded."""
        if not api.echo:
            return ""
        if isinstance(api.prompt, str):
            return api.prompt
        return self.tokenizer.decode(list(req.prompt_token_ids), skip_special_tokens=False)

    def _echo_logprobs(self, api: ApiRequest, req: GenerateRequest,
                       prompt_lps: tuple[TokenLogprob | None, ...] | None) -> dict[str, Any]:
        """The echoed prompt's logprobs; offsets index the echoed text, so a BOS the tokenizer
        added to a text prompt (it is not in that text) takes no room."""
        ids = req.prompt_token_ids
        bos = getattr(self.tokenizer, "bos_token_id", None)
        added = (isinstance(api.prompt, str) and bos is not None and bool(ids) and ids[0] == bos
                 and not api.prompt.startswith(self._token_text(bos)))
        return R.echo_logprobs(ids, prompt_lps, self._token_text, added_bos=added)

    def _add_prompt_logprobs(self, api: ApiRequest, body: dict[str, Any],
                             prompt_lps: tuple[TokenLogprob | None, ...] | None) -> None:
        """vLLM's `prompt_logprobs` when asked for: in the completions choice, at top level
        of a chat answer (each on the first chunk of a stream)."""
        if api.prompt_logprobs is None or prompt_lps is None:
            return
        value = R.prompt_logprobs_json(prompt_lps, self._token_text)
        if api.endpoint is Endpoint.CHAT:
            body["prompt_logprobs"] = value
        else:
            body["choices"][0]["prompt_logprobs"] = value

    def _prompt_chunk(self, api: ApiRequest, req: GenerateRequest, d: Delta,
                      created: int, rid: str) -> dict[str, Any]:
        """A completions stream's first chunk with echo / prompt_logprobs: the echoed prompt
        (text, its logprobs) and the prompt logprobs, before any generated text."""
        echo = self._echo_text(api, req)
        logprobs = (self._echo_logprobs(api, req, d.prompt_logprobs)
                    if api.echo and api.logprobs is not None else None)
        body = R.completion_body(rid, self.config.model_name, echo, None, logprobs, None,
                                 created)
        self._add_prompt_logprobs(api, body, d.prompt_logprobs)
        return body

    async def _stream(
        self, http: web.Request, api: ApiRequest, req: GenerateRequest,
        deltas: AsyncIterator[Delta], rid: str,
    ) -> web.StreamResponse:
        calls: AutoCallStream | None = None
        if api.tools is not None and api.kv_transfer_params is None:
            if api.tools.choice in (ToolChoice.NAMED, ToolChoice.REQUIRED):
                return await self._stream_tool_calls(http, api, req, deltas, rid)
            if api.tools.choice == ToolChoice.AUTO:
                calls = AutoCallStream(replace(api.tools, parser=self.tool_parser))
        created, model = int(time.time()), self.config.model_name
        resp: web.StreamResponse | None = None
        n_out, n_prompt, offset = 0, len(req.prompt_token_ids), 0
        # the first chunk carries prompt_token_ids; the final one the transfer stats
        prompt_ids = req.prompt_token_ids if api.return_token_ids else None
        stats: dict[str, Any] | None = None
        try:
            async for d in deltas:
                if resp is None:  # headers wait for the first output: early errors keep a status
                    resp = await self._start_sse(http, rid)
                    if api.endpoint is Endpoint.CHAT:
                        first = R.chat_chunk(rid, model, created,
                                             {"role": "assistant", "content": ""}, None)
                        if api.continuous_usage:
                            first["usage"] = R.usage(n_prompt, 0)
                        self._add_prompt_logprobs(api, first, d.prompt_logprobs)
                        await resp.write(R.sse(self._extended(api, first, (), prompt_ids,
                                                              None)))
                        prompt_ids = None
                        if api.chat_echo:  # vLLM: the echoed content in its own chunk
                            echoed = R.chat_chunk(rid, model, created,
                                                  {"content": api.chat_echo}, None)
                            if api.continuous_usage:
                                echoed["usage"] = R.usage(n_prompt, 0)
                            await resp.write(R.sse(echoed))
                    elif api.echo or api.prompt_logprobs is not None:
                        first = self._prompt_chunk(api, req, d, created, rid)
                        if api.continuous_usage:
                            first["usage"] = R.usage(n_prompt, 0)
                        await resp.write(R.sse(self._extended(api, first, (), prompt_ids, None)))
                        prompt_ids = None
                        offset = len(first["choices"][0]["text"])
                n_out += len(d.token_ids)
                n_prompt = d.num_prompt_tokens
                stats = d.transfer_stats or stats
                found: list[dict[str, Any]] = []
                if calls is not None:  # text that may start a tool call is held back
                    d, found = self._auto_calls(calls, d)
                if not self._has_news(api, d):
                    continue  # nothing to say yet (half a UTF-8 character, transfer stats)
                chunk = self._chunk(api, req, d, created, offset, rid)
                if found:
                    chunk["choices"][0]["delta"]["tool_calls"] = found
                if api.continuous_usage:
                    chunk["usage"] = R.usage(n_prompt, n_out)
                final_stats = stats if d.finish_reason is not None else None
                await resp.write(R.sse(self._extended(api, chunk, d.token_ids, prompt_ids,
                                                      final_stats)))
                prompt_ids = None
                offset += len(d.text)
        except (GenerationError, EngineDeadError) as exc:
            if resp is None:
                raise
            msg = exc.message if isinstance(exc, GenerationError) else str(exc)
            err = ApiError(msg, status=500, err_type="server_error")
            await resp.write(R.sse(err.body()))
        assert resp is not None
        if api.include_usage:
            obj = "chat.completion.chunk" if api.endpoint is Endpoint.CHAT else "text_completion"
            await resp.write(R.sse(R.usage_chunk(
                rid, model, created, obj, R.usage(n_prompt, n_out))))
        await resp.write(R.sse("[DONE]"))
        await resp.write_eof()
        return resp

    # ---- several choices (n > 1, lists of prompts) -------------------------------------------
    async def _merged(
        self, reqs: list[GenerateRequest], start: float, opts: TextOptions
    ) -> AsyncGenerator[tuple[int, Delta], None]:
        """(choice index, delta) of every request as they come; choice index = prompt index x
        n + sample. Leaving early (or an error) stops every request."""
        n = max(1, reqs[0].params.n)
        q: asyncio.Queue[tuple[int, Delta] | BaseException | None] = asyncio.Queue()

        async def pump(p: int, req: GenerateRequest) -> None:
            deltas = self._observed(text_deltas(self.client, req, self.tokenizer, opts),
                                    self.metrics.observer(req.handoff, start))
            try:
                async with contextlib.aclosing(deltas):
                    async for d in deltas:
                        q.put_nowait((p * n + d.index, d))
                q.put_nowait(None)
            except Exception as exc:  # noqa: BLE001 - handed to the consumer, which raises it
                q.put_nowait(exc)

        tasks = [asyncio.create_task(pump(p, r)) for p, r in enumerate(reqs)]
        try:
            running = len(tasks)
            while running:
                item = await q.get()
                if item is None:
                    running -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield item
        finally:
            for t in tasks:
                t.cancel()  # closes each request's deltas: unfinished engine requests abort
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _collect_many(
        self, api: ApiRequest, reqs: list[GenerateRequest], rid: str, start: float,
        opts: TextOptions,
    ) -> dict[str, Any]:
        num = len(reqs) * max(1, api.n)
        texts: list[list[str]] = [[] for _ in range(num)]
        lps: list[list[TokenLogprob]] = [[] for _ in range(num)]
        n_out = 0
        reasons: list[str | None] = [None] * num
        prompt_tokens = {p: len(r.prompt_token_ids) for p, r in enumerate(reqs)}
        stats = None
        merged = self._merged(reqs, start, opts)
        async with contextlib.aclosing(merged):
            async for i, d in merged:
                stats = d.transfer_stats or stats
                texts[i].append(d.text)
                lps[i].extend(d.logprobs)
                n_out += len(d.token_ids)
                reasons[i] = d.finish_reason or reasons[i]
        model, choices = self.config.model_name, []
        for i in range(num):
            text, logprobs = "".join(texts[i]), self._logprobs(api, lps[i], 0)
            if api.endpoint is Endpoint.CHAT:  # each choice its own tool calls, echo in front
                content, calls, finish = self._tool_calls(api, text, reasons[i])
                body = R.chat_body(rid, model, _with_chat_echo(api, content), finish,
                                   logprobs, {}, tool_calls=calls)
            else:
                body = R.completion_body(rid, model, text, reasons[i], logprobs, None)
            choices.append({**body["choices"][0], "index": i})
        body["choices"] = choices
        if api.tools is not None and api.kv_transfer_params is not None:
            body[TOOL_PARSER_FIELD] = self.tool_parser.value  # the proxy parses the calls
        body["usage"] = R.usage(sum(prompt_tokens.values()), n_out)
        return R.add_transfer_stats(body, stats)

    async def _stream_many(
        self, http: web.Request, api: ApiRequest, reqs: list[GenerateRequest], rid: str,
        start: float, opts: TextOptions,
    ) -> web.StreamResponse:
        created, model = int(time.time()), self.config.model_name
        num = len(reqs) * max(1, api.n)
        offsets = [0] * num
        n_out = 0
        resp: web.StreamResponse | None = None
        tools = _ChoiceTools(api, self.tool_parser, num)
        merged = self._merged(reqs, start, opts)
        try:
            async with contextlib.aclosing(merged):
                async for i, d in merged:
                    if resp is None:  # headers wait for the first output (early errors: status)
                        resp = await self._start_sse(http, rid)
                        if api.endpoint is Endpoint.CHAT:
                            for chunk in self._chat_heads(api, rid, created, num):
                                await resp.write(R.sse(chunk))
                    n_out += len(d.token_ids)
                    if tools.whole:  # named / required: each choice whole at its end
                        whole = self._whole_tool_choice(api, tools, i, d, created, rid)
                        if whole is not None:
                            await resp.write(R.sse(whole))
                        continue
                    found: list[dict[str, Any]] = []
                    auto = tools.auto(i)
                    if auto is not None:  # text that may start a tool call is held back
                        d, found = self._auto_calls(auto, d)
                    if not self._has_news(api, d):
                        continue
                    logprobs = self._logprobs(api, list(d.logprobs), offsets[i])
                    if api.endpoint is Endpoint.CHAT:
                        delta: dict[str, Any] = ({"content": d.text}
                                                 if d.text or d.finish_reason is None else {})
                        if found:
                            delta["tool_calls"] = found
                        chunk = R.chat_chunk(rid, model, created, delta, d.finish_reason,
                                             logprobs)
                    else:
                        chunk = R.completion_body(rid, model, d.text, d.finish_reason, logprobs,
                                                  None, created)
                    chunk["choices"][0]["index"] = i
                    await resp.write(R.sse(chunk))
                    offsets[i] += len(d.text)
        except (GenerationError, EngineDeadError) as exc:
            if resp is None:
                raise
            msg = exc.message if isinstance(exc, GenerationError) else str(exc)
            await resp.write(R.sse(ApiError(msg, status=500, err_type="server_error").body()))
        assert resp is not None
        if api.include_usage:
            obj = "chat.completion.chunk" if api.endpoint is Endpoint.CHAT else "text_completion"
            use = R.usage(sum(len(r.prompt_token_ids) for r in reqs), n_out)
            await resp.write(R.sse(R.usage_chunk(rid, model, created, obj, use)))
        await resp.write(R.sse("[DONE]"))
        await resp.write_eof()
        return resp

    def _chat_heads(self, api: ApiRequest, rid: str, created: int, num: int
                    ) -> list[dict[str, Any]]:
        """The first chunks of a chat stream with several choices, as vLLM sends them: the
        role for every choice, then with `echo` the echoed content for every choice."""
        deltas: list[dict[str, Any]] = [{"role": "assistant", "content": ""}]
        if api.chat_echo:
            deltas.append({"content": api.chat_echo})
        chunks = []
        for delta in deltas:
            for k in range(num):
                chunk = R.chat_chunk(rid, self.config.model_name, created, delta, None)
                chunk["choices"][0]["index"] = k
                chunks.append(chunk)
        return chunks

    def _whole_tool_choice(self, api: ApiRequest, tools: _ChoiceTools, i: int, d: Delta,
                           created: int, rid: str) -> dict[str, Any] | None:
        """Named / required tools with several choices: choice i's text is held until it ends,
        then goes out as one chunk with its own calls (None before that)."""
        tools.hold(i, d.text)
        if d.finish_reason is None:
            return None
        content, calls, finish = self._tool_calls(api, tools.take(i), d.finish_reason)
        delta: dict[str, Any] = {"content": content}
        if calls:
            delta["tool_calls"] = [{"index": k, **c} for k, c in enumerate(calls)]
        chunk = R.chat_chunk(rid, self.config.model_name, created, delta, finish)
        chunk["choices"][0]["index"] = i
        return chunk

    @staticmethod
    def _auto_calls(calls: AutoCallStream, d: Delta) -> tuple[Delta, list[dict[str, Any]]]:
        """A delta's text as an auto-mode tool stream lets it out; on the last delta, the held
        rest and the calls found in it (OpenAI stream shape, finish_reason "tool_calls")."""
        text = calls.push(d.text)
        if d.finish_reason is None:
            return replace(d, text=text), []
        rest, found = calls.finish()
        finish = "tool_calls" if found and d.finish_reason == "stop" else d.finish_reason
        return (replace(d, text=text + rest, finish_reason=finish),
                [{"index": i, **c.to_openai()} for i, c in enumerate(found)])

    @staticmethod
    def _has_news(api: ApiRequest, d: Delta) -> bool:
        """Whether a delta deserves a chunk: text, the end, wanted logprobs or token ids."""
        wanted_lps = api.logprobs is not None and bool(d.logprobs)
        wanted_ids = api.return_token_ids and bool(d.token_ids)
        return bool(d.text) or d.finish_reason is not None or wanted_lps or wanted_ids

    @staticmethod
    def _extended(
        api: ApiRequest, chunk: dict[str, Any], token_ids: tuple[int, ...],
        prompt_ids: tuple[int, ...] | None, stats: dict[str, Any] | None,
    ) -> dict[str, Any]:
        if api.return_token_ids:
            R.add_token_ids(chunk, token_ids, prompt_ids)
        return R.add_transfer_stats(chunk, stats)

    def _chunk(
        self, api: ApiRequest, req: GenerateRequest, d: Delta, created: int, offset: int,
        rid: str,
    ) -> dict[str, Any]:
        logprobs = self._logprobs(api, list(d.logprobs), offset)
        model = self.config.model_name
        if api.endpoint is Endpoint.CHAT:
            delta = {"content": d.text} if d.text or d.finish_reason is None else {}
            return R.chat_chunk(rid, model, created, delta, d.finish_reason, logprobs)
        body = R.completion_body(rid, model, d.text, d.finish_reason, logprobs, None,
                                 created)
        if d.finish_reason is not None and req.handoff is not None:
            body["kv_transfer_params"] = self._handoff_answer(d.kv_transfer_params)
        return body

    @staticmethod
    async def _start_sse(http: web.Request, request_id: str) -> web.StreamResponse:
        resp = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Request-Id": request_id,
            }
        )
        await resp.prepare(http)
        return resp


class _ChoiceTools:
    """Tool calls of a stream with several choices, each choice on its own: named / required
    (`whole`) hold each choice's text to its end; auto keeps one `AutoCallStream` per choice.
    Nothing for a P/D leg (the proxy parses the merged text) or a request without tools."""

    def __init__(self, api: ApiRequest, parser: ToolParser, num: int) -> None:
        plan = api.tools if api.kv_transfer_params is None else None
        self.whole = plan is not None and plan.choice in (ToolChoice.NAMED, ToolChoice.REQUIRED)
        self._held: list[list[str]] = [[] for _ in range(num)] if self.whole else []
        self._auto = ([AutoCallStream(replace(plan, parser=parser)) for _ in range(num)]
                      if plan is not None and plan.choice == ToolChoice.AUTO else [])

    def hold(self, i: int, text: str) -> None:
        self._held[i].append(text)

    def take(self, i: int) -> str:
        """Choice i's whole text (once it has ended)."""
        text, self._held[i] = "".join(self._held[i]), []
        return text

    def auto(self, i: int) -> AutoCallStream | None:
        return self._auto[i] if self._auto else None


def _with_chat_echo(api: ApiRequest, content: str | None) -> str | None:
    """A chat answer's content with vLLM's chat `echo` in front (the last message's)."""
    if not api.chat_echo:
        return content
    return api.chat_echo + (content or "")
