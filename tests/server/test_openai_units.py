"""The protocol package without HTTP: builders against the models, the support table, the
request -> SamplingParams mapping."""

from __future__ import annotations

import pytest

from hybridpd.engine.protocol import TokenLogprob
from hybridpd.openai import responses as R
from hybridpd.openai.errors import ApiError
from hybridpd.openai.parse import validate_request
from hybridpd.openai.requests import ChatCompletionRequest, CompletionRequest
from hybridpd.openai.sampling import sampling_kwargs
from hybridpd.openai.support import NOT_SUPPORTED_YET
from hybridpd.request import SamplingParams

LPS = [TokenLogprob(104, -0.5, ((104, -0.5), (105, -1.0))), TokenLogprob(105, -0.25)]


def text(token_id: int) -> str:
    return chr(token_id)


def test_builders_produce_what_the_models_declare():
    use = R.usage(3, 2)
    assert R.Usage.model_validate(use).total_tokens == 5
    body = R.completion_body("cmpl-1", "m", "hi", "length",
                             R.completion_logprobs(LPS, text, 4), use, 7)
    out = R.CompletionResponse.model_validate(body)
    assert out.choices[0].logprobs is not None and out.choices[0].logprobs.text_offset == [4, 5]
    chunk = R.completion_body("cmpl-1", "m", "h", None, None, None, 7)
    assert "usage" not in chunk and R.CompletionResponse.model_validate(chunk).usage is None
    chat = R.chat_body("c-1", "m", "hi", "stop", R.chat_logprobs(LPS, text), use, 7)
    lp = R.ChatCompletionResponse.model_validate(chat).choices[0].logprobs
    assert lp is not None and [t.token for t in lp.content or []] == ["h", "i"]
    for delta in ({"role": "assistant", "content": ""}, {"content": "x"}, {}):
        R.ChatCompletionChunk.model_validate(R.chat_chunk("c-1", "m", 7, delta, None))
    final = R.usage_chunk("c-1", "m", 7, R.chunk_object(chat=True), use)
    assert R.ChatCompletionChunk.model_validate(final).choices == []
    R.CompletionResponse.model_validate(R.usage_chunk("c", "m", 7, R.chunk_object(False), use))


def test_builders_output_breaks_the_models_when_wrong():
    """The models are not vacuous: a body missing a field or of the wrong object fails."""
    body = R.completion_body("cmpl-1", "m", "hi", "length", None, R.usage(1, 1))
    with pytest.raises(ValueError):
        R.ChatCompletionResponse.model_validate(body)
    del body["choices"][0]["text"]
    with pytest.raises(ValueError):
        R.CompletionResponse.model_validate(body)


def test_every_unsupported_entry_is_a_declared_field():
    declared = set(CompletionRequest.model_fields) | set(ChatCompletionRequest.model_fields)
    assert set(NOT_SUPPORTED_YET) <= declared


def test_the_default_request_uses_no_unsupported_field():
    for name, is_noop in NOT_SUPPORTED_YET.items():
        for cls in (CompletionRequest, ChatCompletionRequest):
            field = cls.model_fields.get(name)
            if field is not None and not field.is_required():
                assert is_noop(field.get_default()), (cls.__name__, name)


def test_sampling_kwargs_build_sampling_params():
    req = validate_request({"prompt": "x", "temperature": 0, "top_p": 0.5, "top_k": 3,
                            "seed": 7, "stop": "END", "stop_token_ids": [2],
                            "ignore_eos": True, "min_tokens": 1}, chat=False)
    params = SamplingParams(max_tokens=4, **sampling_kwargs(req))
    assert (params.temperature, params.top_p, params.top_k, params.seed) == (0.0, 0.5, 3, 7)
    assert params.stop == ("END",) and params.stop_token_ids == (2,) and params.ignore_eos
    assert params.min_tokens == 1
    plain = SamplingParams(max_tokens=4, **sampling_kwargs(validate_request({"prompt": "x"},
                                                                           chat=False)))
    assert plain == SamplingParams(max_tokens=4)


def test_integral_numbers_are_integers():
    req = validate_request({"prompt": "x", "max_tokens": 10.0, "stop_token_ids": [2.0]}, False)
    assert req.max_tokens == 10 and isinstance(req.max_tokens, int)
    assert req.stop_token_ids == [2] and isinstance(req.stop_token_ids[0], int)


@pytest.mark.parametrize("body,param", [
    ({"prompt": "x", "max_tokens": "10"}, "max_tokens"),  # strict: no "10" for 10
    ({"prompt": "x", "max_tokens": 2.5}, "max_tokens"),
    ({"prompt": "x", "max_tokens": True}, "max_tokens"),
    ({"prompt": "x", "ignore_eos": 1}, "ignore_eos"),
    ({"prompt": "x", "stop": 5}, "stop"),
    ({"prompt": "x", "frequency_penalty": -2.5}, "frequency_penalty"),
    ({"prompt": "x", "logprobs": 21}, "logprobs"),
])
def test_type_and_range_errors_name_the_field(body, param):
    with pytest.raises(ApiError) as info:
        validate_request(body, chat=False)
    assert info.value.param == param and info.value.message.startswith(param)
