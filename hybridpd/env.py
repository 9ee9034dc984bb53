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
    HYBRIDPD_API_KEY: the API key (`Authorization: Bearer <key>`) of `serve` and `proxy` when
        `--api-key` is not given (vLLM reads `VLLM_API_KEY` the same way); the proxy also sends
        it to its backends.
    HYBRIDPD_LIFELINE_FD: set by `hybridpd up` in its children: the read end of a pipe whose
        EOF means the launcher died (`launch/lifeline.py`); unset: not a child of `up`.
    CUDA_VISIBLE_DEVICES: read by `hybridpd up` to map `--gpus` indices to its children's
        device lists.
    HYBRIDPD_ALLOW_LONG_MAX_MODEL_LEN: 1 lets `--max-model-len` exceed the model's
        `max_position_embeddings` (NoPE attention + Mamba have no positional limit; quality
        past the trained length is the user's risk), as vLLM's VLLM_ALLOW_LONG_MAX_MODEL_LEN;
        default: refused.
    UCX_TLS, UCX_NET_DEVICES: read (never set) here to report the configured UCX transports of
        a P/D pair (`disagg/transport.py`); `disagg/ucx_env.py` sets their CPU defaults.
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


def api_key(flag: str | None = None) -> str | None:
    """The API key: `flag` (the `--api-key` value) when given, else `HYBRIDPD_API_KEY`, else
    None (no key: the /v1 routes are open)."""
    return flag or os.environ.get("HYBRIDPD_API_KEY") or None


LIFELINE_FD_VAR = "HYBRIDPD_LIFELINE_FD"


def allow_long_max_model_len() -> bool:
    return os.environ.get("HYBRIDPD_ALLOW_LONG_MAX_MODEL_LEN", "").lower() in ("1", "true", "yes")


def lifeline_fd() -> int | None:
    """The launcher's lifeline descriptor in a child of `hybridpd up`, else None."""
    raw = os.environ.get(LIFELINE_FD_VAR, "")
    return int(raw) if raw.isdigit() else None


def ucx_setting(name: str) -> str | None:
    """A UCX variable as configured (`UCX_TLS`, `UCX_NET_DEVICES`), None when unset."""
    return os.environ.get(name) or None


def cuda_visible_devices() -> str | None:
    """The CUDA_VISIBLE_DEVICES this process runs under, None when unset."""
    return os.environ.get("CUDA_VISIBLE_DEVICES")


def snapshot() -> dict[str, str]:
    """A copy of this process's whole environment, for a process that must run under it (a
    tensor-parallel rank forked from a server started earlier, `engine/tp_executor.py`)."""
    return dict(os.environ)


def adopt(environment: dict[str, str]) -> None:
    """Replace this process's environment with `environment` (a parent's `snapshot()`)."""
    os.environ.clear()
    os.environ.update(environment)
