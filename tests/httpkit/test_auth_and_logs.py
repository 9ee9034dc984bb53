"""API-key and internal-token checks; the log rate limiter (bounded lines, no traceback storm)."""

from __future__ import annotations

import io
import logging

from hybridpd.httpkit.auth import (
    WINDOW_S,
    bearer_matches,
    internal_token,
    internal_token_ok,
)
from hybridpd.httpkit.logs import RateLimitFilter


def test_bearer_key():
    assert bearer_matches({"Authorization": "Bearer k1"}, "k1")
    assert bearer_matches({"Authorization": "bearer  k1 "}, "k1")
    assert not bearer_matches({"Authorization": "Bearer k2"}, "k1")
    assert not bearer_matches({"Authorization": "Basic k1"}, "k1")
    assert not bearer_matches({}, "k1")


def test_internal_token_is_bound_to_secret_purpose_subject_and_time():
    tok = internal_token("s", "abort", "req-1", now=1000.0)
    assert internal_token_ok(tok, "s", "abort", "req-1", now=1000.0 + WINDOW_S - 1)
    assert not internal_token_ok(tok, "other", "abort", "req-1", now=1000.0)
    assert not internal_token_ok(tok, "s", "abort", "req-2", now=1000.0)
    assert not internal_token_ok(tok, "s", "renew", "req-1", now=1000.0)
    assert not internal_token_ok(tok, "s", "abort", "req-1", now=1000.0 + WINDOW_S + 1)
    assert not internal_token_ok(None, "s", "abort", "req-1")
    assert not internal_token_ok("garbage", "s", "abort", "req-1")


def _logger(clock):
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.addFilter(RateLimitFilter(burst=3, interval_s=10.0, clock=clock))
    logger = logging.getLogger(f"test.ratelimit.{id(out)}")
    logger.handlers, logger.propagate = [handler], False
    return logger, out


def test_rate_limit_caps_a_flood_and_reports_what_it_dropped():
    now = [0.0]
    logger, out = _logger(lambda: now[0])
    for i in range(1000):
        try:
            raise OSError(24, "Too many open files")
        except OSError:
            logger.exception("accept failed %d", i)
    logger.warning("another kind")  # its own budget
    lines = out.getvalue()
    assert lines.count("accept failed") == 3 and "another kind" in lines
    assert lines.count("Traceback") == 1  # only the first of its kind carries one
    now[0] = 11.0
    logger.error("accept failed %d", 1000)
    assert "[997 similar record(s) suppressed]" in out.getvalue()
