"""Fixtures for the server tests: a background event loop (always torn down)."""

from __future__ import annotations

import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402
from harness import LoopThread  # noqa: E402


@pytest.fixture(scope="module")
def loop_thread():
    lt = LoopThread()
    try:
        yield lt
    finally:
        lt.close()
