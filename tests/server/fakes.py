"""Test doubles: a byte-level fake tokenizer and a scripted fake EngineCore.

The fake engine runs inside a real engine process (it is built there by `make_fake_engine`).
It emits REPLY byte by byte, one token per request per step, and emulates the P/D fields:
a `RemoteDecode` request stops after its first token and returns `TransferParams` (which the
API serialises and signs); a `RemotePrefill` request (parsed by D's API) checks those params,
first emits a token-less output with TRANSFER_STATS (as the real decode engine does), then
continues from the second token.
Prompts containing b"REJECT" are refused by add_request, and so are ids still running or held
(with the real engine's message); b"CRASH" makes step() raise; b"UTF8" switches the reply to
REPLY_UTF8 (multi-byte characters split across tokens).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Any

from hybridpd.disagg.handoff import RemoteDecode, RemotePrefill
from hybridpd.disagg.params import HandoffMode, TransferParams
from hybridpd.engine.protocol import (
    DuplicateRequestError,
    EngineStats,
    GenerateOutput,
    GenerateRequest,
    TokenLogprob,
)
from hybridpd.request import FinishReason

BOS, EOS = 256, 257
REPLY = b"Hello world! The quick brown fox jumps over the lazy dog. "
REPLY_UTF8 = "é日本 ok ".encode()  # used for prompts containing b"UTF8": multi-byte characters
POOL_BLOCKS = 100
# what a fake decode instance reports, on a token-less output, before its first token
TRANSFER_STATS = {"bytes": 1 << 20, "descriptors": 4, "seconds": 0.002, "outcome": "ok",
                  "gbps": 0.524288, "ranks": 1}


def fake_params(request_id: str, num_tokens: int, first_token: int = REPLY[0]) -> TransferParams:
    """What a fake prefill instance hands off: well-formed params pointing nowhere real."""
    return TransferParams(request_id=request_id, engine_id="fake", side_channel="127.0.0.1:1",
                          tp_size=1, block_ids=((1,),), num_tokens=num_tokens,
                          handoff=HandoffMode.FIRST_TOKEN, first_token=first_token,
                          transfer_id=f"fake-{request_id}")


def fake_handoff(request_id: str, num_tokens: int) -> dict[str, Any]:
    """A decode leg's `kv_transfer_params` for a fake decode instance (no deployment secret)."""
    return {"do_remote_prefill": True, **fake_params(request_id, num_tokens).to_dict()}


class FakeTokenizer:
    """Bytes are tokens 0..255; BOS = 256, EOS = 257."""

    vocab_size = 258
    eos_token_ids = (EOS,)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return ([BOS] if add_special_tokens else []) + list(text.encode())

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        body = "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        return body + ("<assistant>" if add_generation_prompt else "")


@dataclass
class _Running:
    req: GenerateRequest
    pos: int  # index into REPLY of the next token
    emitted: int  # tokens of this request already produced (by P and here)
    first_output: bool = True


def _prompt_bytes(req: GenerateRequest) -> bytes:
    return bytes(t for t in req.prompt_token_ids if t < 256)


class FakeEngine:
    def __init__(self, delay_s: float = 0.0, engine_id: str = "fake") -> None:
        self.delay_s, self.engine_id = delay_s, engine_id
        self.running: dict[str, _Running] = {}
        self.held: set[str] = set()  # P side: finished requests whose blocks D has not pulled
        self.counters = {"added": 0, "aborts": 0, "held_released": 0, "remote_prefills": 0}

    def add_request(self, req: GenerateRequest) -> None:
        if b"REJECT" in _prompt_bytes(req):
            raise ValueError("fake engine refuses prompts containing REJECT")
        if req.request_id in self.running or req.request_id in self.held:  # as the real engine
            raise DuplicateRequestError(f"request id {req.request_id!r} is already in use")
        start = 0
        if isinstance(req.handoff, RemotePrefill):
            kv = req.handoff.params
            if kv.request_id != req.request_id:
                raise ValueError(f"kv params of {kv.request_id!r} on {req.request_id!r}")
            if kv.num_tokens != len(req.prompt_token_ids):
                raise ValueError("kv params prompt length mismatch")
            start = 1
            self.counters["remote_prefills"] += 1
        self.counters["added"] += 1
        self.running[req.request_id] = _Running(req, pos=start, emitted=start)

    def abort_request(self, request_id: str) -> bool:
        known = False
        if self.running.pop(request_id, None) is not None:
            self.counters["aborts"] += 1
            known = True
        if request_id in self.held:
            self.held.discard(request_id)
            self.counters["held_released"] += 1
            known = True
        return known

    def has_work(self) -> bool:
        return bool(self.running)

    def idle_wait_s(self) -> float | None:
        return 0.0 if self.running else None

    def step(self) -> list[GenerateOutput]:
        if self.delay_s:
            time.sleep(self.delay_s)
        outs = []
        for rid, st in list(self.running.items()):
            if b"CRASH" in _prompt_bytes(st.req):
                raise RuntimeError("fake engine crashed on purpose")
            if st.first_output and isinstance(st.req.handoff, RemotePrefill):
                outs.append(self._transfer_done(st))  # like the real engine: token-less
                continue
            outs.append(self._advance(st))
            if outs[-1].finished:
                del self.running[rid]
        return outs

    @staticmethod
    def _transfer_done(st: _Running) -> GenerateOutput:
        st.first_output = False
        return GenerateOutput(st.req.request_id, (), transfer_stats=dict(TRANSFER_STATS),
                              num_prompt_tokens=len(st.req.prompt_token_ids), queued_s=0.0)

    def _advance(self, st: _Running) -> GenerateOutput:
        req, params = st.req, st.req.params
        reply = REPLY_UTF8 if b"UTF8" in _prompt_bytes(req) else REPLY
        tok = reply[st.pos % len(reply)]
        st.pos += 1
        st.emitted += 1
        reason = None
        if tok in params.stop_token_ids:
            reason = FinishReason.STOP
        elif st.emitted >= params.max_tokens:
            reason = FinishReason.LENGTH
        kv_params = None
        remote_decode = isinstance(req.handoff, RemoteDecode)
        if remote_decode and reason is None:
            reason = FinishReason.LENGTH  # P's part is done after the first token
            kv_params = replace(fake_params(req.request_id, len(req.prompt_token_ids), tok),
                                engine_id=self.engine_id)
            self.held.add(req.request_id)
        first, st.first_output = st.first_output, False
        return GenerateOutput(
            queued_s=0.0 if first else None,  # the fake never queues
            request_id=req.request_id,
            new_token_ids=(tok,),
            finished=reason is not None,
            finish_reason=reason,
            new_logprobs=_logprobs(tok, params.logprobs),
            num_prompt_tokens=len(req.prompt_token_ids),
            kv_transfer_params=kv_params,
        )

    def stats(self) -> EngineStats:
        used = len(self.running) + len(self.held)
        return EngineStats(len(self.running), 0, POOL_BLOCKS, POOL_BLOCKS - used,
                           dict(self.counters))

    def shutdown(self) -> None:
        self.running.clear()


def _logprobs(tok: int, n: int | None) -> tuple[TokenLogprob, ...] | None:
    if n is None:
        return None
    top = tuple((t, -0.25 - i) for i, t in enumerate((tok, 33, 34, 35, 36)[: max(n, 0)]))
    return (TokenLogprob(tok, -0.25, top[:n]),)


def make_fake_engine(delay_s: float = 0.0, engine_id: str = "fake") -> FakeEngine:
    """Picklable factory target (use functools.partial)."""
    return FakeEngine(delay_s, engine_id)


def failing_factory() -> FakeEngine:
    raise RuntimeError("no model here: factory failed on purpose")


def logging_factory(message: str) -> FakeEngine:
    """A factory that logs `message` at INFO on "hybridpd.transfer" inside the engine process."""
    logging.getLogger("hybridpd.transfer").info(message)
    return FakeEngine()
