"""Streaming text out of generated ids: incremental detokenization and stop strings.

Owns `IncrementalDetokenizer` (token ids -> text deltas, never cutting a multi-byte UTF-8
character in half) and `StopStringMatcher` (text deltas -> text safe to emit, holding back any
tail that could still become a stop string). Must not know models, requests or HTTP; it only
needs an object with `decode(ids, skip_special_tokens)` (e.g. `hybridpd.tokenizer.Tokenizer`).

Incremental decoding: the text of the new ids is the difference between decoding a short
window that ends with them and decoding the same window without them; the window starts a few
tokens back so that decoders that depend on the previous token (leading-space rules) see it.
An incomplete UTF-8 sequence decodes to U+FFFD at the end of the text; such a delta is held
back until a later id completes it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

REPLACEMENT_CHAR = "\ufffd"
CONTEXT_TOKENS = 5  # ids of left context decoded with each delta


class Decoder(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    """Turn a growing list of output ids into text deltas, one `push` per engine step."""

    def __init__(self, tokenizer: Decoder, prompt_ids: Sequence[int],
                 skip_special_tokens: bool = True) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = list(prompt_ids)
        self._read = len(self._ids)  # ids before this one have been emitted as text
        self._prefix = max(self._read - CONTEXT_TOKENS, 0)  # start of the decode window
        self._text: list[str] = []

    @property
    def output_text(self) -> str:
        """All text emitted so far."""
        return "".join(self._text)

    @property
    def num_pending_ids(self) -> int:
        """Ids received but not yet emitted (an incomplete character)."""
        return len(self._ids) - self._read

    def push(self, new_ids: Iterable[int]) -> str:
        """Append ids; return the newly completed text ("" while a character is incomplete)."""
        self._ids.extend(int(i) for i in new_ids)
        if self._read == len(self._ids):
            return ""
        before, after = self._window_texts()
        if after.endswith(REPLACEMENT_CHAR) or len(after) < len(before):
            return ""  # an incomplete multi-byte sequence at the end: wait for more ids
        return self._commit(after[len(before):])

    def flush(self) -> str:
        """At the end of a stream: the text of ids still pending ("" when none). A tail that
        never became valid UTF-8 decodes to U+FFFD here."""
        if self._read == len(self._ids):
            return ""
        before, after = self._window_texts()
        return self._commit(after[len(before):])

    def _window_texts(self) -> tuple[str, str]:
        """Decoded window without and with the pending ids."""
        return self._decode(self._prefix, self._read), self._decode(self._prefix, len(self._ids))

    def _commit(self, delta: str) -> str:
        self._read = len(self._ids)
        self._prefix = max(self._read - CONTEXT_TOKENS, 0)
        self._text.append(delta)
        return delta

    def _decode(self, start: int, end: int) -> str:
        return self._tok.decode(self._ids[start:end], skip_special_tokens=self._skip)


class StopStringMatcher:
    """Cut a text stream where a stop string first completes, never emitting the stop itself.

    `push(delta)` returns `(text_to_emit, stopped)`. Text that might be the beginning of a stop
    string is held back until the next deltas decide; `flush()` returns it when the stream
    ends without a stop. After a stop every call returns ("", True); `matched` names the stop.
    """

    def __init__(self, stops: Iterable[str]) -> None:
        self.stops = tuple(dict.fromkeys(stops))
        if any(not isinstance(s, str) or not s for s in self.stops):
            raise ValueError("stop strings must be non-empty strings")
        self._held = ""
        self.matched: str | None = None

    @property
    def stopped(self) -> bool:
        return self.matched is not None

    def push(self, delta: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        buf = self._held + delta
        hit = self._first_stop(buf)
        if hit is not None:
            pos, stop = hit
            self._held, self.matched = "", stop
            return buf[:pos], True
        keep = self._undecided_tail(buf)
        self._held = buf[len(buf) - keep:] if keep else ""
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        """The held-back text, at the end of a stream that did not stop."""
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _first_stop(self, buf: str) -> tuple[int, str] | None:
        """(start, stop) of the stop string that completes first in `buf` (ties: earliest start).

        Choosing by end position makes the result independent of how the text was split into
        deltas: it is where a character-by-character stream would have stopped.
        """
        best: tuple[int, int, str] | None = None
        for stop in self.stops:
            pos = buf.find(stop)
            if pos >= 0 and (best is None or (pos + len(stop), pos) < best[:2]):
                best = (pos + len(stop), pos, stop)
        return None if best is None else (best[1], best[2])

    def _undecided_tail(self, buf: str) -> int:
        """Length of the longest suffix of `buf` that is a proper prefix of some stop."""
        longest = max((len(s) for s in self.stops), default=0)
        for start in range(max(len(buf) - longest + 1, 0), len(buf)):
            tail = buf[start:]
            if any(s.startswith(tail) for s in self.stops):
                return len(tail)
        return 0
