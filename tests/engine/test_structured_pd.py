"""Structured output across P/D (two in-process engines, NIXL over UCX loopback): in
first-token mode P samples the first token under the grammar and D's grammar takes it before
decoding on; in n-1 mode D samples every token. Either way the answer equals the co-located
one and validates against the schema."""

from __future__ import annotations

import json

import pytest
from schema_check import violations

from hybridpd.engine.args import EngineArgs
from hybridpd.engine.core import Engine
from hybridpd.engine.protocol import GenerateRequest
from hybridpd.engine.structured import StructuredSpec
from hybridpd.request import SamplingParams
from hybridpd.tokenizer import Tokenizer

from .pd_helpers import (
    REMOTE_DECODE,
    assert_pools_free,
    p_answer,
    pd_generate,
    run_all,
    settle,
    to_decode,
    tokens,
)
from .structured_schemas import SCHEMAS


@pytest.mark.parametrize("handoff", ["first-token", "n-1"])
def test_pd_structured_matches_colocated(tiny_model: str, handoff: str) -> None:
    common = dict(model_dir=tiny_model, device="cpu", kernel_block_size=4,
                  cache_memory=8 << 20, handoff=handoff)
    both, p, d = (Engine(EngineArgs(role=r, **common)) for r in ("both", "prefill", "decode"))
    tok = Tokenizer.from_dir(tiny_model)
    try:
        prompt = tok.encode("Answer in JSON:")
        for i in (1, 9, 16):
            schema = SCHEMAS[i]
            params = SamplingParams(max_tokens=120, temperature=0.0,
                                    structured=StructuredSpec.json_schema(schema))
            ref = tokens(run_all(both, [GenerateRequest(f"c{i}", tuple(prompt), params)])[f"c{i}"])
            got, _ = pd_generate(p, d, f"r{i}", prompt, params)
            assert got == ref
            assert violations(json.loads(tok.decode(got)), schema) == []
        assert_pools_free(both, p, d)
    finally:
        for e in (both, p, d):
            e.shutdown()


def test_a_first_token_outside_the_grammar_is_refused(tiny_model: str) -> None:
    common = dict(model_dir=tiny_model, device="cpu", kernel_block_size=4,
                  cache_memory=8 << 20, handoff="first-token")
    p, d = (Engine(EngineArgs(role=r, **common)) for r in ("prefill", "decode"))
    tok = Tokenizer.from_dir(tiny_model)
    try:
        prompt = tuple(tok.encode("Answer in JSON:"))
        free = SamplingParams(max_tokens=8, temperature=0.0)
        p_outs = run_all(p, [GenerateRequest("x", prompt, free, REMOTE_DECODE)])["x"]
        first = tokens(p_outs)[0]
        assert tok.decode([first]) != "{"  # P sampled without the grammar
        kv = p_answer(p, p_outs[-1])
        structured = SamplingParams(max_tokens=8, temperature=0.0,
                                    structured=StructuredSpec.json_object())
        with pytest.raises(ValueError, match="does not fit the structured-output grammar"):
            d.add_request(GenerateRequest("x", prompt, structured,
                                          to_decode(d, kv)))
        assert not d.has_work()
        settle(p)
    finally:
        for e in (p, d):
            e.shutdown()
