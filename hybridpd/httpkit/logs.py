"""Process-wide logging setup for hybridpd processes (API server, engine process, proxy).

Owns the "hybridpd" logger's level, its one stderr handler, the compact line format, and log
rate limiting: the handler (also given to the "asyncio" and "aiohttp" loggers, at WARNING)
lets through at most `RATE_BURST` records of one kind (logger, level, message template) per
`RATE_INTERVAL_S`, then one line saying how many were suppressed, and prints a traceback only
for the first record of a kind in an interval — so a flood of hostile connections cannot turn
into megabytes of tracebacks. Knows nothing of what is logged; modules log through
`logging.getLogger("hybridpd...")`.
"""

from __future__ import annotations

import logging
import sys
import threading
import time

ROOT_LOGGER = "hybridpd"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LEVELS = ("debug", "info", "warning", "error", "critical")
_MARK = "_hybridpd_handler"
RATE_INTERVAL_S = 10.0
RATE_BURST = 20
THIRD_PARTY_LOGGERS = ("asyncio", "aiohttp")  # their errors go through the same limiter


def parse_level(level: int | str) -> int:
    """'info' / 'INFO' / 20 -> 20; raises ValueError for an unknown name."""
    if isinstance(level, int):
        return level
    value = logging.getLevelName(level.upper())
    if not isinstance(value, int):
        raise ValueError(f"unknown log level {level!r} (one of {', '.join(LEVELS)})")
    return value


class RateLimitFilter(logging.Filter):
    """At most `burst` records per kind per `interval_s`; later ones are counted, and the next
    record let through says how many were dropped. Tracebacks only on a kind's first record
    of an interval. Thread-safe."""

    def __init__(self, burst: int = RATE_BURST, interval_s: float = RATE_INTERVAL_S,
                 clock: object = time.monotonic) -> None:
        super().__init__()
        self.burst, self.interval_s, self._clock = burst, interval_s, clock
        self._lock = threading.Lock()
        self._kinds: dict[tuple[str, int, str], list[float]] = {}  # start, passed, dropped

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, str(record.msg))
        now = self._clock()  # type: ignore[operator]
        with self._lock:
            state = self._kinds.get(key)
            if state is None or now - state[0] >= self.interval_s:
                dropped = 0 if state is None else int(state[2])
                if len(self._kinds) > 1024:  # bounded: forget old kinds
                    self._kinds.clear()
                self._kinds[key] = state = [now, 0, 0]
                if dropped:
                    record.msg = f"{record.msg} [{dropped} similar record(s) suppressed]"
            elif state[1] >= self.burst:
                state[2] += 1
                return False
            first = state[1] == 0
            state[1] += 1
        if not first and record.exc_info:
            record.exc_info, record.exc_text = None, None
            record.msg = f"{record.msg} (traceback suppressed: repeated)"
        return True


def configure_logging(level: int | str = logging.INFO) -> logging.Logger:
    """Send "hybridpd" and its children to stderr at `level`, and "asyncio"/"aiohttp" warnings
    too, through one rate-limited handler; idempotent (one handler)."""
    logger = logging.getLogger(ROOT_LOGGER)
    logger.setLevel(parse_level(level))
    handler = next((h for h in logger.handlers if getattr(h, _MARK, False)), None)
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        handler.addFilter(RateLimitFilter())
        setattr(handler, _MARK, True)
        logger.addHandler(handler)
    logger.propagate = False  # one line per record, whatever the root logger does
    for name in THIRD_PARTY_LOGGERS:
        other = logging.getLogger(name)
        if handler not in other.handlers:
            other.addHandler(handler)
        other.setLevel(max(logging.WARNING, logger.level))
        other.propagate = False
    return logger
