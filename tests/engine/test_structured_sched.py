"""Structured output under the scheduler's pressure and with tensor parallelism: a request
preempted and recomputed keeps its grammar's place (outputs equal the request run alone, and
validate); TP = 2 gives TP = 1's constrained tokens."""

from __future__ import annotations

import json

import numpy as np
from schema_check import violations

from hybridpd.engine.args import EngineArgs
from hybridpd.engine.core import Engine
from hybridpd.engine.protocol import GenerateRequest
from hybridpd.engine.structured import StructuredSpec
from hybridpd.request import SamplingParams
from hybridpd.tokenizer import Tokenizer

from .pd_helpers import run_all, tokens
from .structured_schemas import SCHEMAS


def _params(schema: dict) -> SamplingParams:
    return SamplingParams(max_tokens=60, temperature=0.0,
                          structured=StructuredSpec.json_schema(schema))


def _prompt(n: int, i: int) -> tuple[int, ...]:
    return tuple((11 * j + 3 * i) % 300 + 6 for j in range(n))


def test_preempted_structured_requests_keep_their_place(tiny_model: str) -> None:
    lengths = [int(x) for x in np.linspace(1, 600, 10)]
    schemas = [SCHEMAS[16], SCHEMAS[1], SCHEMAS[13], SCHEMAS[17], SCHEMAS[19]]
    reqs = [GenerateRequest(f"r{i}", _prompt(n, i), _params(schemas[i % len(schemas)]))
            for i, n in enumerate(lengths)]
    probe = Engine(EngineArgs(model_dir=tiny_model, device="cpu"))
    need_one = probe.blocks.blocks_for(max(lengths) + 60)
    block_bytes = probe.executor.geometry.block_bytes
    eng = Engine(EngineArgs(model_dir=tiny_model, device="cpu",
                            cache_memory=(need_one + 3) * block_bytes,
                            max_num_batched_tokens=256))
    tok = Tokenizer.from_dir(tiny_model)
    try:
        together = run_all(eng, reqs)
        assert eng.scheduler.num_preemptions > 0, "the small pool should force preemption"
        assert eng.blocks.num_free == eng.blocks.num_usable
        for i, r in enumerate(reqs):
            got = tokens(together[r.request_id])
            assert got == tokens(run_all(probe, [r])[r.request_id]), r.request_id
            schema = schemas[i % len(schemas)]
            assert violations(json.loads(tok.decode(got)), schema) == []
    finally:
        eng.shutdown()
        probe.shutdown()


def test_tp2_gives_tp1_constrained_tokens(tiny_model: str) -> None:
    outs = []
    for tp in (1, 2):
        eng = Engine(EngineArgs(model_dir=tiny_model, device="cpu", tp_size=tp,
                                cache_memory=8 << 20))
        try:
            reqs = [GenerateRequest(f"t{i}", _prompt(9 + i, i), _params(SCHEMAS[i]))
                    for i in (1, 9, 12)]
            got = run_all(eng, reqs)
            outs.append([tokens(got[r.request_id]) for r in reqs])
        finally:
            eng.shutdown()
    assert outs[0] == outs[1]
