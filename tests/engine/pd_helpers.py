"""Helpers for driving in-process engines in tests (no HTTP): run to completion, P/D relay.

Engines take the typed hand-off; `p_answer` / `to_decode` do what P's and D's API do at the
HTTP edge (`server/handoff_edge.py`): serialise and sign P's params under the deployment
secret (the engine's `kv_secret`), and verify and parse them for D."""

from __future__ import annotations

import time
from typing import Any

from hybridpd.disagg.handoff import Handoff, RemoteDecode
from hybridpd.engine.core import Engine
from hybridpd.engine.driving import step_when_due
from hybridpd.engine.protocol import GenerateOutput, GenerateRequest
from hybridpd.request import SamplingParams
from hybridpd.server import handoff_edge

REMOTE_DECODE = RemoteDecode()  # what P's API makes of {"do_remote_decode": true}


def p_answer(p: Engine, out: GenerateOutput) -> dict[str, Any] | None:
    """P's final output's `kv_transfer_params` as P's API answers them (signed with a secret)."""
    return handoff_edge.to_answer(out.kv_transfer_params, p.args.kv_secret)


def to_decode(d: Engine, kv: dict[str, Any]) -> Handoff | None:
    """What D's API makes of P's answer relayed by the proxy: verified (with a secret), parsed.
    Raises ValueError as the edge does (D's API answers 400)."""
    return handoff_edge.from_request(handoff_edge.decode_request(kv), d.args.kv_secret)


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def run_all(engine: Engine, reqs: list[GenerateRequest], timeout_s: float = 300) -> dict:
    """Add every request, step until all finished; returns id -> list of outputs."""
    outs: dict[str, list[GenerateOutput]] = {r.request_id: [] for r in reqs}
    for r in reqs:
        engine.add_request(r)
    done: set[str] = set()
    deadline = time.monotonic() + timeout_s
    while len(done) < len(reqs):
        assert time.monotonic() < deadline, "engine did not finish in time"
        for o in step_when_due(engine):
            outs[o.request_id].append(o)
            if o.finished:
                done.add(o.request_id)
    return outs


def tokens(outs: list[GenerateOutput]) -> list[int]:
    return [t for o in outs for t in o.new_token_ids]


def pd_generate(p: Engine, d: Engine, rid: str, prompt: list[int], params: SamplingParams,
                timeout_s: float = 120) -> tuple[list[int], list[GenerateOutput]]:
    """Prefill on p, hand off to d, decode there; returns (all tokens, d's outputs)."""
    p_outs = run_all(p, [GenerateRequest(rid, tuple(prompt), params, REMOTE_DECODE)])[rid]
    first = tokens(p_outs)
    kv = p_answer(p, p_outs[-1])
    if kv is None:
        return first, []
    d.add_request(GenerateRequest(rid, tuple(prompt), params, to_decode(d, kv)))
    d_outs: list[GenerateOutput] = []
    deadline = time.monotonic() + timeout_s
    while not (d_outs and d_outs[-1].finished):
        assert time.monotonic() < deadline, "P/D relay did not finish in time"
        d_outs.extend(step_when_due(d))
        step_when_due(p)  # P learns of the READ's completion and frees its blocks
    return first + tokens(d_outs), d_outs


def settle(engine: Engine, timeout_s: float = 10) -> None:
    """Step until the engine has nothing left (leases released, transfers done)."""
    deadline = time.monotonic() + timeout_s
    while engine.has_work() and time.monotonic() < deadline:
        step_when_due(engine)


def assert_pools_free(*engines: Engine) -> None:
    """Settle each engine, then every block of every pool is free again (freeing is exact)."""
    for e in engines:
        settle(e)
    for e in engines:
        assert e.blocks.num_free == e.blocks.num_usable
