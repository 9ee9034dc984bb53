"""Temporary stand-in for hybridpd.detokenizer (same API), used only until it exists."""

from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_ids, skip_special_tokens=True):
        self.tok, self.ids, self.text = tokenizer, [], ""

    def push(self, new_ids):
        self.ids.extend(new_ids)
        full = self.tok.decode(self.ids)
        if full.endswith("\ufffd"):
            return ""
        out, self.text = full[len(self.text):], full
        return out


class StopStringMatcher:
    def __init__(self, stops):
        self.stops, self.buf = tuple(stops), ""

    def push(self, text):
        self.buf += text
        for s in self.stops:
            i = self.buf.find(s)
            if i >= 0:
                out, self.buf = self.buf[:i], ""
                return out, True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.buf)), 0, -1):
                if self.buf.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        out = self.buf[: len(self.buf) - hold]
        self.buf = self.buf[len(self.buf) - hold:]
        return out, False

    def flush(self):
        out, self.buf = self.buf, ""
        return out
