"""Structured output through `LLM`/`Engine` on the random-weight tiny demo model: only the
grammar's mask makes the output valid, so every check here fails without it."""

from __future__ import annotations

import json
import re

import pytest
import torch
from schema_check import violations

from hybridpd.engine.llm import LLM, greedy
from hybridpd.engine.protocol import GenerateRequest
from hybridpd.engine.sampler import AllowedTokens, Sampler, apply_token_masks
from hybridpd.engine.structured import StructuredKind, StructuredOutputs, StructuredSpec
from hybridpd.request import SamplingParams

from .structured_schemas import SCHEMAS

PROMPT = "Answer in JSON:"


@pytest.fixture(scope="module")
def llm(tiny_model: str) -> LLM:
    llm = LLM(tiny_model)
    yield llm
    llm.close()


def test_twenty_schemas_parse_and_validate(llm: LLM) -> None:
    assert len(SCHEMAS) == 20
    texts = []
    for schema in SCHEMAS:
        out = llm.generate(PROMPT, greedy(200, structured=StructuredSpec.json_schema(schema)))[0]
        assert out.finish_reason == "stop", (schema, out.text)
        assert violations(json.loads(out.text), schema) == [], (schema, out.text)
        texts.append(out.text)
    assert len(set(texts)) == 20  # every schema shaped its own answer


def test_without_the_mask_the_model_writes_no_json(llm: LLM) -> None:
    out = llm.generate(PROMPT, greedy(40))[0]
    with pytest.raises(json.JSONDecodeError):
        json.loads(out.text)


def test_properties_come_in_the_schemas_order(llm: LLM) -> None:
    schema = {"type": "object", "properties": {"zeta": {"type": "boolean"},
                                               "alpha": {"type": "boolean"}},
              "required": ["zeta", "alpha"], "additionalProperties": False}
    out = llm.generate(PROMPT, greedy(60, structured=StructuredSpec.json_schema(schema)))[0]
    assert list(json.loads(out.text)) == ["zeta", "alpha"]


def test_json_object_is_an_object(llm: LLM) -> None:
    out = llm.generate(PROMPT, greedy(40, structured=StructuredSpec.json_object()))[0]
    assert out.text.startswith("{")  # a random model rarely closes an open object in 40 tokens
    assert out.token_ids  # ... but every token it wrote was allowed by the grammar


def test_regex_and_choice(llm: LLM) -> None:
    pattern = r"[a-z]{3}-[0-9]{2}"
    out = llm.generate(PROMPT, greedy(30, structured=StructuredSpec.regex(pattern)))[0]
    assert re.fullmatch(pattern, out.text), out.text
    assert out.finish_reason == "stop"
    choices = ["yes", "no", "maybe later"]
    out = llm.generate(PROMPT, greedy(30, structured=StructuredSpec.choice(choices)))[0]
    assert out.text in choices and out.finish_reason == "stop"


def test_lark_grammar(llm: LLM) -> None:
    spec = StructuredSpec.grammar('start: "(" num ("," num)* ")"\nnum: /[0-9]/')
    out = llm.generate(PROMPT, greedy(30, structured=spec))[0]
    assert re.fullmatch(r"\([0-9](,[0-9])*\)", out.text), out.text


def test_sampled_outputs_validate_too(llm: LLM) -> None:
    schema = SCHEMAS[1]
    for seed in range(3):
        params = SamplingParams(max_tokens=200, temperature=1.0, seed=seed,
                                structured=StructuredSpec.json_schema(schema))
        out = llm.generate(PROMPT, params)[0]
        assert violations(json.loads(out.text), schema) == [], out.text


def test_forked_samples_each_follow_the_grammar(llm: LLM) -> None:
    """n = 3: the prompt is computed once and forked; every sample gets its own matcher (a
    shared one would see three tokens per step and reject), and its first token is drawn
    under the mask too."""
    schema = SCHEMAS[1]
    spec = StructuredSpec.json_schema(schema)
    sampled = llm.generate(PROMPT, SamplingParams(max_tokens=200, temperature=1.0, seed=7,
                                                  n=3, structured=spec))
    assert sorted(o.index for o in sampled) == [0, 1, 2]
    for out in sampled:
        assert violations(json.loads(out.text), schema) == [], out.text
    # sample i is the single request with seed + i (as without a grammar)
    single = llm.generate(PROMPT, SamplingParams(max_tokens=200, temperature=1.0, seed=8,
                                                 structured=spec))[0]
    assert next(o for o in sampled if o.index == 1).token_ids == single.token_ids
    one = llm.generate(PROMPT, greedy(200, structured=spec))[0]
    many = llm.generate(PROMPT, greedy(200, structured=spec, n=3))
    assert [o.token_ids for o in many] == [one.token_ids] * 3


def test_a_batch_mixes_structured_and_free_rows(llm: LLM) -> None:
    free = llm.generate("hello", greedy(12))[0].token_ids
    prompts = ["hello", PROMPT, "hello"]
    outs = {}
    for i, p in enumerate(prompts):  # one engine batch: three requests, one structured
        spec = StructuredSpec.json_schema(SCHEMAS[0]) if i == 1 else None
        rid = f"mix-{i}"
        llm.engine.add_request(GenerateRequest(rid, tuple(llm.tokenizer.encode(p)),
                                               greedy(12, structured=spec)))
        outs[rid] = []
    done: set[str] = set()
    while len(done) < 3:
        for o in llm.engine.step():
            outs[o.request_id].extend(o.new_token_ids)
            if o.finished:
                done.add(o.request_id)
    assert outs["mix-0"] == free and outs["mix-2"] == free  # the mask stayed in its row
    assert json.loads(llm.tokenizer.decode(outs["mix-1"])) is not None


def test_equal_specs_compile_once(llm: LLM) -> None:
    so = llm.engine.structured
    spec = StructuredSpec.json_schema({"type": "boolean"})
    before = dict(so.stats)
    for _ in range(3):
        out = llm.generate(PROMPT, greedy(10, structured=spec))[0]
        assert out.text in ("true", "false")
    assert so.stats["grammars_compiled"] == before["grammars_compiled"] + 1
    assert so.stats["grammar_cache_hits"] == before["grammar_cache_hits"] + 2


def test_a_bad_grammar_is_refused_and_the_engine_goes_on(llm: LLM) -> None:
    for spec in (StructuredSpec.regex("(unclosed"), StructuredSpec.grammar("start: nothere"),
                 StructuredSpec.json_schema({"type": "no-such-type"})):
        with pytest.raises(ValueError, match=f"invalid {spec.kind.value}"):
            llm.engine.add_request(GenerateRequest("bad", (1, 2, 3),
                                                   greedy(5, structured=spec)))
        assert "bad" not in llm.engine.scheduler.requests
    assert llm.generate("hello", greedy(3))[0].token_ids  # still serving


@pytest.mark.parametrize("make, message", [
    (lambda: StructuredSpec.json_schema("{not json"), "not valid JSON"),
    (lambda: StructuredSpec.json_schema("[1, 2]"), "must be a JSON object"),
    (lambda: StructuredSpec.choice([]), "non-empty list"),
    (lambda: StructuredSpec.choice("yes"), "not one string"),
    (lambda: StructuredSpec.choice(["a", 3]), "non-empty strings"),  # type: ignore[list-item]
    (lambda: StructuredSpec.regex(""), "must not be empty"),
    (lambda: StructuredSpec("nonsense"), "nonsense"),
])
def test_spec_validation(make, message: str) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match=message):
        make()


def test_sampling_params_round_trip_the_spec() -> None:
    for spec in (StructuredSpec.json_schema(SCHEMAS[3]), StructuredSpec.choice(["a", "b"]),
                 StructuredSpec.regex("x+"), StructuredSpec.json_object(), None):
        p = SamplingParams(max_tokens=5, structured=spec)
        back = SamplingParams.from_dict(json.loads(json.dumps(p.to_dict())))
        assert back == p and back.structured == spec
    assert StructuredSpec.json_schema({"a": 1}).kind == StructuredKind.JSON_SCHEMA


def test_missing_tokenizer_is_a_clear_error(tmp_path) -> None:  # noqa: ANN001
    so = StructuredOutputs(str(tmp_path), 384, [2])
    with pytest.raises(ValueError, match="tokenizer.json"):
        so.matcher(StructuredSpec.regex("a"))


def test_apply_token_masks_masks_only_its_rows() -> None:
    logits = torch.arange(3 * 40, dtype=torch.float32).reshape(3, 40)
    bits = torch.zeros((1, 2), dtype=torch.int32)
    bits[0, 0] = (1 << 3) | (1 << 5)  # tokens 3 and 5
    bits[0, 1] = 1 << 1  # token 33
    out = apply_token_masks(logits, AllowedTokens((1,), bits))
    assert torch.equal(out[0], logits[0]) and torch.equal(out[2], logits[2])
    assert torch.isfinite(out[1]).nonzero().flatten().tolist() == [3, 5, 33]
    assert torch.isfinite(logits).all()  # the input is left alone
    res = Sampler().sample(logits, [greedy(1)] * 3, [0, 0, 0], allowed=AllowedTokens((1,), bits))
    assert res.token_ids.tolist() == [39, 33, 39]
    assert res.logprobs is None


def test_apply_token_masks_every_row_and_ids_past_the_mask() -> None:
    logits = torch.zeros((2, 70))  # 70 ids, a mask of 2 words covers only 64
    bits = torch.tensor([[-1, -1], [-(2**31), 0]], dtype=torch.int32)  # all 64; token 31
    out = apply_token_masks(logits, AllowedTokens((0, 1), bits))
    assert torch.isfinite(out[0]).nonzero().flatten().tolist() == list(range(64))
    assert torch.isfinite(out[1]).nonzero().flatten().tolist() == [31]
    logp = Sampler().sample(logits, [greedy(1, logprobs=0)] * 2, [0, 0],
                            allowed=AllowedTokens((0, 1), bits))
    assert logp.token_ids.tolist()[1] == 31
    assert logp.logprobs is not None  # logprobs stay those of the raw logits: log(1/70)
    assert torch.allclose(logp.logprobs, torch.full((2,), -torch.log(torch.tensor(70.0))))


def test_the_grammar_has_the_last_word_over_logit_processing(llm: LLM) -> None:
    forced = llm.tokenizer.encode("z", add_special_tokens=False)[0]
    biased = greedy(8, logit_bias=((forced, 100.0),))
    assert llm.generate(PROMPT, biased)[0].token_ids[0] == forced  # the bias alone wins
    out = llm.generate(PROMPT, greedy(8, logit_bias=((forced, 100.0),), repetition_penalty=1.5,
                                      structured=StructuredSpec.choice(["yes", "no"])))[0]
    assert out.text in ("yes", "no") and forced not in out.token_ids
