"""Incremental detokenization and stop strings, with the demo model's real tokenizer."""

from __future__ import annotations

import os
import random
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from hybridpd.demo.tokenizer_files import BYTE_OFFSET  # noqa: E402
from hybridpd.demo.writer import write_demo_model  # noqa: E402
from hybridpd.detokenizer import IncrementalDetokenizer, StopStringMatcher  # noqa: E402
from hybridpd.text_pipeline import RequestText, StopAction, TextOptions, stop_action  # noqa: E402
from hybridpd.tokenizer import Tokenizer  # noqa: E402

torch.set_num_threads(1)

TEXTS = ["hello world", " the state of the model\n\n", "日本語 😀 café", "👩‍👩‍👧 ok",
         "naïve e\u0301 ✓", "a" * 50, "  spaced   out  "]


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    path: Path = write_demo_model(tmp_path_factory.mktemp("detok") / "tiny", "tiny").path
    return Tokenizer.from_dir(path)


def _byte_ids(text: str) -> list[int]:
    """One id per UTF-8 byte: multi-byte characters are split across ids."""
    return [BYTE_OFFSET + b for b in text.encode("utf-8")]


def _stream(tok: Tokenizer, prompt: list[int], ids: list[int], step: int) -> list[str]:
    detok = IncrementalDetokenizer(tok, prompt)
    return [detok.push(ids[i:i + step]) for i in range(0, len(ids), step)]


@pytest.mark.parametrize("step", [1, 2, 3, 7])
def test_deltas_concatenate_to_the_full_decode(tok: Tokenizer, step: int) -> None:
    prompt = tok.encode("Prompt: ")
    for text in TEXTS:
        for ids in (tok.encode(text, add_special_tokens=False), _byte_ids(text)):
            deltas = _stream(tok, prompt, ids, step)
            assert "".join(deltas) == tok.decode(ids) == text
            assert all("\ufffd" not in d for d in deltas)


def test_multibyte_character_waits_until_complete(tok: Tokenizer) -> None:
    detok = IncrementalDetokenizer(tok, tok.encode("x"))
    ids = _byte_ids("😀")  # 4 bytes
    assert [detok.push([i]) for i in ids] == ["", "", "", "😀"]
    assert detok.push(_byte_ids("é")[:1]) == "" and detok.num_pending_ids == 1
    assert detok.push(_byte_ids("é")[1:] + _byte_ids("!")) == "é!"
    assert detok.output_text == "😀é!" and detok.num_pending_ids == 0


def test_special_tokens_skipped_or_kept(tok: Tokenizer) -> None:
    ids = tok.encode("hi", add_special_tokens=False) + [tok.eos_token_id]
    assert "".join(_stream(tok, [1], ids, 1)) == "hi"
    keep = IncrementalDetokenizer(tok, [1], skip_special_tokens=False)
    assert "".join(keep.push([i]) for i in ids) == "hi</s>"


def test_flush_emits_a_never_completed_tail(tok: Tokenizer) -> None:
    detok = IncrementalDetokenizer(tok, [1])
    assert detok.push(_byte_ids("ok") + _byte_ids("😀")[:2]) == ""  # incomplete at the end
    assert detok.flush() == tok.decode(_byte_ids("ok") + _byte_ids("😀")[:2])
    assert detok.flush() == ""
    assert detok.push([]) == ""


def test_random_ids_never_lose_text(tok: Tokenizer) -> None:
    rng = random.Random(0)
    for _ in range(50):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 30))]
        detok = IncrementalDetokenizer(tok, [1])
        out = "".join(detok.push([i]) for i in ids) + detok.flush()
        assert out == tok.decode(ids)


def _run_stop(stops: list[str], deltas: list[str]) -> tuple[str, bool, StopStringMatcher]:
    m = StopStringMatcher(stops)
    out = []
    for d in deltas:
        text, stopped = m.push(d)
        out.append(text)
        if stopped:
            return "".join(out), True, m
    return "".join(out) + m.flush(), False, m


def test_stop_string_across_deltas_is_cut_and_never_emitted() -> None:
    m = StopStringMatcher(["STOP"])
    assert m.push("abc ST") == ("abc ", False)  # "ST" held back
    assert m.push("O") == ("", False)
    assert m.push("P and more") == ("", True)
    assert m.matched == "STOP" and m.push("x") == ("", True) and m.flush() == ""


def test_held_text_is_released_when_disambiguated() -> None:
    m = StopStringMatcher(["</answer>"])
    assert m.push("x </an") == ("x ", False)
    assert m.push("gle") == ("</angle", False)
    assert m.push("<") == ("", False)
    assert m.flush() == "<"


def test_first_completed_stop_wins_whatever_the_split() -> None:
    for deltas in (["xab", "cd"], ["xabc", "d"], ["xabcd"], list("xabcd")):
        assert _run_stop(["abcd", "bc"], deltas)[:2] == ("xa", True)
    assert _run_stop(["abc", "bc"], ["xabc"])[2].matched == "abc"  # same end: earliest start
    text, stopped, m = _run_stop(["aab"], ["a", "a", "a", "b", "z"])
    assert (text, stopped, m.matched) == ("a", True, "aab")
    assert _run_stop(["\n\n"], ["line\n", "next\n", "\n", "after"])[:2] == ("line\nnext", True)


def test_stop_matcher_random_agrees_with_a_direct_search() -> None:
    rng = random.Random(1)
    for _ in range(400):
        text = "".join(rng.choice("ab😀\n") for _ in range(rng.randint(0, 25)))
        stops = ["".join(rng.choice("ab😀\n") for _ in range(rng.randint(1, 4)))]
        for _ in range(rng.randint(0, 2)):  # substrings of the text: nested / overlapping hits
            a = rng.randrange(len(text) + 1)
            stops.append(text[a:a + rng.randint(1, 5)] or "b")
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, 4)))
        splits = ([text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])], [text], list(text))
        # where a character-by-character stream stops: the first stop to complete
        hits = [(text.find(s) + len(s), text.find(s)) for s in stops if s in text]
        expected = text[:min(hits)[1]] if hits else text
        for deltas in splits:
            out, stopped, _ = _run_stop(stops, deltas)
            assert (out, stopped) == (expected, bool(hits)), (text, stops, deltas)
            assert not any(s in out for s in stops)


def test_stop_matcher_rejects_empty_stops() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        StopStringMatcher(["ok", ""])
    assert _run_stop([], ["abc", "def"])[:2] == ("abcdef", False)


def test_detokenizer_and_stop_matcher_together(tok: Tokenizer) -> None:
    ids = _byte_ids("answer: 42 😀<END> trailing")
    detok, stop = IncrementalDetokenizer(tok, tok.encode("Q")), StopStringMatcher(["<END>", "😀<"])
    out = []
    for i in ids:
        text, stopped = stop.push(detok.push([i]))
        out.append(text)
        if stopped:
            break
    assert "".join(out) == "answer: 42 " and stop.matched == "😀<"


# ---- the shared text pipeline (hybridpd/text_pipeline.py) ---------------------------------


def test_stop_action_decides_what_a_fired_stop_aborts() -> None:
    assert stop_action(False, 1, False) is StopAction.CONTINUE
    assert stop_action(False, 3, True) is StopAction.CONTINUE
    assert stop_action(True, 1, False) is StopAction.ABORT_REQUEST
    assert stop_action(True, 1, True) is StopAction.ABORT_REQUEST  # P may still hold the state
    assert stop_action(True, 3, False) is StopAction.ABORT_CHOICE
    assert stop_action(True, 3, True) is StopAction.FINISHED


def test_request_text_choices_stop_independently(tok: Tokenizer) -> None:
    texts = RequestText(tok, [], stops=("b",), n=2)
    a0 = texts.feed(0, _byte_ids("xa"), choice_finished=False)
    b0 = texts.feed(1, _byte_ids("yb"), choice_finished=False)
    assert a0 is not None and (a0.text, a0.action) == ("xa", StopAction.CONTINUE)
    assert b0 is not None and (b0.text, b0.action) == ("y", StopAction.ABORT_CHOICE)
    assert texts.ended(1) and not texts.ended(0)
    assert texts.feed(1, _byte_ids("zz"), choice_finished=True) is None  # after its stop
    a1 = texts.feed(0, _byte_ids("c"), choice_finished=True)
    assert a1 is not None and (a1.text, a1.action) == ("c", StopAction.CONTINUE)


def test_request_text_include_stop_and_flush_at_the_end(tok: Tokenizer) -> None:
    kept = RequestText(tok, [], stops=("lo w",), options=TextOptions(
        include_stop_str_in_output=True))
    # "l" may begin the stop: held until the next piece decides
    steps = [kept.feed(0, _byte_ids(p), choice_finished=False) for p in ("hel", "lo ", "wor")]
    assert [s.text for s in steps if s is not None] == ["he", "l", "lo w"]
    held = RequestText(tok, [], stops=("lo w",))
    first = held.feed(0, _byte_ids("hello"), choice_finished=False)
    last = held.feed(0, _byte_ids(" "), choice_finished=True)  # "lo " was undecided: flushed
    assert first is not None and last is not None and first.text + last.text == "hello "
    assert last.action is StopAction.CONTINUE


def test_request_text_replay_drops_the_first_token_text(tok: Tokenizer) -> None:
    """A decode instance replays P's first token: its text is not emitted again, but a stop
    string that it begins still completes."""
    ids = _byte_ids("ab")
    texts = RequestText(tok, [], stops=("ab",), replay=ids[:1])
    step = texts.feed(0, ids[1:], choice_finished=False)
    assert step is not None and (step.text, step.action) == ("", StopAction.ABORT_REQUEST)
    plain = RequestText(tok, [], replay=_byte_ids("é")[:1])  # half a character on P
    done = plain.feed(0, _byte_ids("é")[1:], choice_finished=True)
    assert done is not None and done.text == "é"
