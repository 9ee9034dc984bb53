"""Environment variables: the only module that reads `os.environ`.

Owns one accessor per variable hybridpd honours, each with its default. Must not know what the
values are used for beyond their type; callers import the accessor, never `os.environ`.

Variables:
    HYBRIDPD_CACHE: directory for generated artefacts (embedded demo model, ...);
        default `~/.cache/hybridpd`.
    OMP_NUM_THREADS: torch threads of tensor-parallel rank processes; default 1.
    HYBRIDPD_KV_SECRET: the deployment secret that signs P/D hand-offs (`disagg/signing.py`),
        authenticates the side channel and the proxy's hand-off requests (`disagg/auth.py`);
        P/D roles refuse to start without it unless `--insecure-dev` (`hybridpd up` always
        sets one).
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_CACHE_DIR = "~/.cache/hybridpd"


def cache_dir() -> Path:
    """Root of hybridpd's on-disk cache (not created here)."""
    raw = os.environ.get("HYBRIDPD_CACHE") or DEFAULT_CACHE_DIR
    return Path(raw).expanduser()


def omp_num_threads() -> int:
    """Threads a worker process should give torch (>= 1)."""
    try:
        return max(1, int(os.environ.get("OMP_NUM_THREADS", "1")))
    except ValueError:
        return 1


def kv_secret() -> str | None:
    """The deployment's hand-off signing secret, or None."""
    return os.environ.get("HYBRIDPD_KV_SECRET") or None
