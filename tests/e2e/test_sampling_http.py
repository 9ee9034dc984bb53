"""Penalties, logit_bias, min_p, bad_words and allowed_token_ids over real HTTP: on a co-located
instance and through a 1P1D proxy (first-token hand-off: P samples the first token, D the rest)
each field changes the output as its definition says, and P/D equals co-located."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from .cluster import completion

PROMPT = [(13 * j) % 200 + 5 for j in range(30)]


@pytest.fixture(scope="module")
def both_and_pd(e2e_models, references, pool):
    dep = pool.deployment(e2e_models["tiny"], handoff="first-token")
    return references["tiny"].url, dep.url, Path(e2e_models["tiny"]).name


def _ids(base: str, name: str, **kw) -> list[int]:
    status, body = completion(base, name, PROMPT, kw.pop("max_tokens", 10), **kw)
    assert status == 200, body
    return body["choices"][0]["token_ids"]


def test_each_field_changes_the_output_as_defined(both_and_pd) -> None:
    ref, pd, name = both_and_pd
    plain = _ids(ref, name)
    long_plain = _ids(ref, name, max_tokens=40)
    assert len(set(long_plain)) < len(long_plain)  # the demo model repeats itself greedily
    forced = next(t for t in range(3, 100) if t not in plain)
    for base in (ref, pd):
        assert _ids(base, name, logit_bias={str(forced): 100}) == [forced] * 10
        assert _ids(base, name, allowed_token_ids=[forced]) == [forced] * 10
        sampled = _ids(base, name, temperature=1.5, seed=4, max_tokens=20,
                       allowed_token_ids=[forced, 42])
        assert set(sampled) <= {forced, 42}
        assert _ids(base, name, bad_words=[]) == plain  # an empty list asks for nothing
        pen = _ids(base, name, frequency_penalty=2.0, presence_penalty=2.0, max_tokens=40)
        assert max(Counter(pen).values()) < max(Counter(long_plain).values())
    for kw in ({"frequency_penalty": 1.0, "repetition_penalty": 1.8},
               {"presence_penalty": 1.5, "min_p": 0.2},
               {"logit_bias": {str(plain[0]): -100}}):
        got = _ids(pd, name, max_tokens=40, **kw)
        assert got == _ids(ref, name, max_tokens=40, **kw), kw  # P/D equals co-located
        assert got != long_plain, kw


def _contains(ids: list[int], seq: tuple[int, ...]) -> bool:
    return any(tuple(ids[i:i + len(seq)]) == seq for i in range(len(ids) - len(seq) + 1))


def test_bad_words_are_tokenized_and_never_generated(both_and_pd, e2e_models) -> None:
    from hybridpd.tokenizer import Tokenizer

    ref, pd, name = both_and_pd
    tok = Tokenizer.from_dir(e2e_models["tiny"])
    plain = _ids(ref, name, max_tokens=40)
    texts = (tok.decode(plain[i:i + k]) for k in (2, 1, 3) for i in range(len(plain) - k))
    word = next(w for w in texts  # a word whose tokens the plain output contains
                if w.strip() and any(_contains(plain, s) for s in tok.encode_bad_words([w])))
    seqs = tok.encode_bad_words([word])
    for base in (ref, pd):
        got = _ids(base, name, bad_words=[word], max_tokens=40)
        assert got != plain
        assert not any(_contains(got, s) for s in seqs), (word, seqs, got)


@pytest.mark.parametrize("field,value,param", [
    ("presence_penalty", 3, "presence_penalty"),
    ("min_p", 2, "min_p"),
    ("logit_bias", {"999999": 1}, "logit_bias"),
    ("allowed_token_ids", [], "allowed_token_ids"),
])
def test_out_of_range_values_are_a_400_naming_the_field(both_and_pd, field, value, param
                                                       ) -> None:
    ref, pd, name = both_and_pd
    for base in (ref, pd):
        status, body = completion(base, name, PROMPT, 4, **{field: value})
        assert status == 400, body
        assert body["error"]["param"] == param, body
