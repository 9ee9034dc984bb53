"""A progress line on stderr for long start-up work (loading weights, writing demo models).

Owns drawing it: redrawn in place on a terminal; on a pipe or a log file one line per tenth of
the work and one at the end, so logs stay short. No dependency (tqdm is not one of ours).
Knows nothing of what is being done.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def _size(n: float, unit: str) -> str:
    if unit == "B":
        for scale, name in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
            if n >= scale:
                return f"{n / scale:.1f} {name}"
        return f"{int(n)} B"
    return f"{int(n)}{(' ' + unit) if unit else ''}"


class Progress:
    """`with Progress("Loading weights", total=52, unit="layers") as p: ... p.update()`."""

    def __init__(self, desc: str, total: float, unit: str = "", stream: TextIO | None = None,
                 enabled: bool = True) -> None:
        self.desc, self.total, self.unit = desc, max(float(total), 0.0), unit
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.done = 0.0
        self._start = time.monotonic()
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._tenth = 0  # a line at each further tenth
        self._closed = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(ok=exc[0] is None)

    def fraction(self) -> float:
        return 1.0 if self.total <= 0 else min(self.done / self.total, 1.0)

    def line(self) -> str:
        pct = int(100.0 * self.fraction())  # floored: 100% only when done
        return (f"{self.desc}: {pct:3d}% ({_size(self.done, self.unit)} / "
                f"{_size(self.total, self.unit)}, {time.monotonic() - self._start:.1f} s)")

    def update(self, n: float = 1.0) -> None:
        self.done += n
        if not self.enabled:
            return
        tenth = int(10 * self.fraction())
        if self._tty:
            self.stream.write("\r" + self.line())
            self.stream.flush()
        elif tenth != self._tenth and tenth < 10:
            self._tenth = tenth
            self.stream.write(self.line() + "\n")
            self.stream.flush()

    def close(self, ok: bool = True) -> None:
        if self._closed or not self.enabled:
            return
        self._closed = True
        if ok:
            self.done = max(self.done, self.total)
        end = "" if not ok else " done"
        self.stream.write(("\r" if self._tty else "") + self.line() + end + "\n")
        self.stream.flush()
