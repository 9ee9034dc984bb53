"""Helpers for driving in-process engines in tests (no HTTP): run to completion, P/D relay."""

from __future__ import annotations

import time

from hybridpd.engine.core import Engine
from hybridpd.engine.protocol import GenerateOutput, GenerateRequest
from hybridpd.request import SamplingParams


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
        for o in engine.step():
            outs[o.request_id].append(o)
            if o.finished:
                done.add(o.request_id)
    return outs


def tokens(outs: list[GenerateOutput]) -> list[int]:
    return [t for o in outs for t in o.new_token_ids]


def pd_generate(p: Engine, d: Engine, rid: str, prompt: list[int], params: SamplingParams,
                timeout_s: float = 120) -> tuple[list[int], list[GenerateOutput]]:
    """Prefill on p, hand off to d, decode there; returns (all tokens, d's outputs)."""
    p_outs = run_all(p, [GenerateRequest(rid, tuple(prompt), params,
                                         {"do_remote_decode": True})])[rid]
    first = tokens(p_outs)
    kv = p_outs[-1].kv_transfer_params
    if kv is None:
        return first, []
    d.add_request(GenerateRequest(rid, tuple(prompt), params, {"do_remote_prefill": True, **kv}))
    d_outs: list[GenerateOutput] = []
    deadline = time.monotonic() + timeout_s
    while not (d_outs and d_outs[-1].finished):
        assert time.monotonic() < deadline, "P/D relay did not finish in time"
        d_outs.extend(d.step())
        p.step()  # P learns of the READ's completion and frees its blocks
    return first + tokens(d_outs), d_outs


def settle(engine: Engine, timeout_s: float = 10) -> None:
    """Step until the engine has nothing left (leases released, transfers done)."""
    deadline = time.monotonic() + timeout_s
    while engine.has_work() and time.monotonic() < deadline:
        engine.step()
