"""Fixtures for the server tests: a background event loop and fake instances (always torn down).

Until hybridpd/detokenizer.py lands, a minimal stand-in is installed so these tests can run.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402

try:
    import hybridpd.detokenizer  # noqa: F401
except ImportError:  # pragma: no cover - temporary
    import _detok_stub

    sys.modules["hybridpd.detokenizer"] = _detok_stub

from harness import LoopThread  # noqa: E402


@pytest.fixture(scope="module")
def loop_thread():
    lt = LoopThread()
    try:
        yield lt
    finally:
        lt.close()
