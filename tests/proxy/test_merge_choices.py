"""Merging P's first piece into D's answer when D forked the prompt into n choices."""

from __future__ import annotations

from hybridpd.proxy import merge


def _p_body(text: str = "He", chat: bool = False) -> dict:
    choice = ({"index": 0, "message": {"role": "assistant", "content": text}} if chat
              else {"index": 0, "text": text})
    return {"id": "x", "model": "m", "created": 1, "choices": [{**choice, "logprobs": None,
                                                                 "finish_reason": None}],
            "usage": {"prompt_tokens": 4, "completion_tokens": 1, "total_tokens": 5},
            "kv_transfer_params": {"a": 1}}


def test_merge_final_prefixes_every_choice_and_counts_p_once_per_choice():
    first = merge.first_piece(_p_body(), chat=False)
    d_body = {"choices": [{"index": i, "text": f"llo{i}", "logprobs": None,
                           "finish_reason": "length"} for i in range(3)],
              "usage": {"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14}}
    out = merge.merge_final(first, d_body, chat=False)
    assert [c["text"] for c in out["choices"]] == ["Hello0", "Hello1", "Hello2"]
    assert out["usage"] == {"prompt_tokens": 4, "completion_tokens": 12, "total_tokens": 16}


def test_stream_pieces_for_n_choices():
    first = merge.first_piece(_p_body(chat=True), chat=True)
    chunk = merge.first_chunk("x", "m", 1, first, chat=True, n=3)
    assert [(c["index"], c["delta"]["content"]) for c in chunk["choices"]] == [
        (0, "He"), (1, "He"), (2, "He")]
    roles = {"choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                          "finish_reason": None} for i in range(3)]}
    assert merge.rewrite_d_chunk(roles, first, chat=True, n=3) is None  # D's role chunks
    usage = {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 6}}
    out = merge.rewrite_d_chunk(usage, first, chat=True, n=3)
    assert out is not None and out["usage"]["completion_tokens"] == 9


def test_finished_on_p_repeats_its_choice_for_n():
    body = _p_body()
    body["choices"][0]["finish_reason"] = "length"
    out = merge.finished_on_p(body, 2)
    assert [c["index"] for c in out["choices"]] == [0, 1] and "kv_transfer_params" not in out
    assert out["usage"]["completion_tokens"] == 2
    events = merge.finished_on_p_events(body, chat=False, include_usage=True, n=2)
    assert [c["finish_reason"] for c in events[0]["choices"]] == ["length", "length"]
    assert events[1]["usage"]["completion_tokens"] == 2 and events[-1] == "[DONE]"
