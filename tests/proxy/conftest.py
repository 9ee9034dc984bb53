"""Proxy test setup: reuse the server tests' fakes and harness (tests/server on sys.path)."""

from __future__ import annotations

import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "server"))
