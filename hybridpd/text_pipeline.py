"""One text pipeline for generated ids, shared by the API server and the offline `LLM`.

Owns, per request: the incremental detokenizer, the stop-string matcher after it,
`skip_special_tokens` / `include_stop_str_in_output` (vLLM's request fields of the same names),
one pipeline per choice when n > 1 (a stop string ends that choice only), and the decision what
a fired stop string asks of the engine (`StopAction`). The caller does the aborting: the server
through its engine client, `LLM` on its in-process engine.

Must not know HTTP, the engine, P/D or internal sample ids; it needs only an object with
`decode(ids, skip_special_tokens)`. Sits below both `hybridpd.server` and `hybridpd.engine.llm`.

P/D continuity: a prefill instance that hands off does not flush either stage (a split UTF-8
character, or text that may begin a stop string, is left pending); the decode instance replays
P's first token (`replay`) through both stages, dropping what P already emitted, so the pending
part comes out of D exactly once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from hybridpd.detokenizer import Decoder, IncrementalDetokenizer, StopStringMatcher


@dataclass(frozen=True)
class TextOptions:
    """How token ids become text (vLLM's request fields of the same names)."""

    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False


DEFAULT_TEXT = TextOptions()


class StopAction(Enum):
    """What a step's stop-string outcome asks of the engine."""

    CONTINUE = "continue"  # no stop string fired
    FINISHED = "finished"  # a stop fired on a choice the engine had finished: nothing to abort
    ABORT_CHOICE = "abort_choice"  # n > 1: abort this choice's sample; the others go on
    ABORT_REQUEST = "abort_request"  # the request's only choice stopped: abort the request


def stop_action(stopped: bool, n: int, choice_finished: bool) -> StopAction:
    """The decision for one step of one choice of a request with `n` choices.

    With one choice the request is aborted even when the engine reports the choice finished:
    a prefill instance that hands off still holds the state for the decode instance.
    """
    if not stopped:
        return StopAction.CONTINUE
    if n <= 1:
        return StopAction.ABORT_REQUEST
    return StopAction.FINISHED if choice_finished else StopAction.ABORT_CHOICE


class TextTracker:
    """Incremental text of one choice: detokenizer, then the stop-string matcher."""

    def __init__(self, tokenizer: Decoder, prompt_ids: Sequence[int],
                 stops: Sequence[str] = (), options: TextOptions = DEFAULT_TEXT,
                 replay: Sequence[int] = ()) -> None:
        self.options = options
        self._stop_shown = False
        self.detok = IncrementalDetokenizer(tokenizer, list(prompt_ids),
                                            skip_special_tokens=options.skip_special_tokens)
        self.matcher = StopStringMatcher(stops) if stops else None
        if replay:
            self.feed(tuple(replay), finished=False, hands_off=False)  # P's text: dropped

    def feed(
        self, token_ids: Sequence[int], finished: bool, hands_off: bool = False
    ) -> tuple[str, bool]:
        """(text to emit, whether a stop string fired). `finished` flushes both stages unless
        the request `hands_off` to a decode instance."""
        flush = finished and not hands_off
        text = self.detok.push(list(token_ids))
        if flush:
            text += self.detok.flush()
        if self.matcher is None:
            return text, False
        text, stopped = self.matcher.push(text)
        if stopped and self.options.include_stop_str_in_output and not self._stop_shown:
            text += self.matcher.matched or ""
            self._stop_shown = True  # once: later pushes say ("", True)
        if flush and not stopped:
            text += self.matcher.flush()
        return text, stopped


@dataclass(frozen=True)
class TextStep:
    """One step of one choice: the text to emit and what the stop outcome asks."""

    text: str
    action: StopAction

    @property
    def stopped(self) -> bool:
        return self.action is not StopAction.CONTINUE


class RequestText:
    """The text of every choice of one request (n >= 1), each with its own `TextTracker`."""

    def __init__(self, tokenizer: Decoder, prompt_ids: Sequence[int],
                 stops: Sequence[str] = (), n: int = 1,
                 options: TextOptions = DEFAULT_TEXT, replay: Sequence[int] = ()) -> None:
        self._args = (tokenizer, tuple(prompt_ids), tuple(stops), options, tuple(replay))
        self.n = n
        self._trackers: dict[int, TextTracker] = {}
        self._ended: set[int] = set()  # choices a stop string ended (the engine may still send)

    def ended(self, index: int) -> bool:
        """Whether a stop string ended choice `index` (later outputs of it are dropped)."""
        return index in self._ended

    def feed(self, index: int, token_ids: Sequence[int], choice_finished: bool,
             hands_off: bool = False) -> TextStep | None:
        """The step of choice `index`; None when a stop string ended that choice before."""
        if index in self._ended:
            return None
        if index not in self._trackers:
            tok, prompt, stops, options, replay = self._args
            self._trackers[index] = TextTracker(tok, prompt, stops, options, replay)
        text, stopped = self._trackers[index].feed(token_ids, choice_finished, hands_off)
        if stopped:
            self._ended.add(index)
        return TextStep(text, stop_action(stopped, self.n, choice_finished))
