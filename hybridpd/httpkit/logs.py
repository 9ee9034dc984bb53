"""Process-wide logging setup for hybridpd processes (API server, engine process, proxy).

Owns the "hybridpd" logger's level, its one stderr handler and the compact line format.
Knows nothing of what is logged; modules log through `logging.getLogger("hybridpd...")`.
"""

from __future__ import annotations

import logging
import sys

ROOT_LOGGER = "hybridpd"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LEVELS = ("debug", "info", "warning", "error", "critical")
_MARK = "_hybridpd_handler"


def parse_level(level: int | str) -> int:
    """'info' / 'INFO' / 20 -> 20; raises ValueError for an unknown name."""
    if isinstance(level, int):
        return level
    value = logging.getLevelName(level.upper())
    if not isinstance(value, int):
        raise ValueError(f"unknown log level {level!r} (one of {', '.join(LEVELS)})")
    return value


def configure_logging(level: int | str = logging.INFO) -> logging.Logger:
    """Send "hybridpd" and its children to stderr at `level`; idempotent (one handler)."""
    logger = logging.getLogger(ROOT_LOGGER)
    logger.setLevel(parse_level(level))
    if not any(getattr(h, _MARK, False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        setattr(handler, _MARK, True)
        logger.addHandler(handler)
    logger.propagate = False  # one line per record, whatever the root logger does
    return logger
