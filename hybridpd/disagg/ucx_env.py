"""UCX environment defaults for NIXL agents.

Owns the choice of UCX transports when the user set none: on a host without CUDA devices the
only supported deployment is a local one, so UCX is pinned to loopback TCP plus cross-memory
attach (`UCX_TLS=tcp,cma`, `UCX_NET_DEVICES=lo`); with GPUs UCX picks its own transports
(cuda_ipc, cuda_copy, rc, ...). Values the user already exported always win
(`os.environ.setdefault`), so a CPU-only multi-host setup must export `UCX_NET_DEVICES` itself.

Must not know: NIXL, torch tensors, anything of the engine. It only *sets* defaults; reading
configuration from the environment belongs to `hybridpd/env.py`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

CPU_LOOPBACK_DEFAULTS: Mapping[str, str] = {
    "UCX_TLS": "tcp,cma",
    "UCX_NET_DEVICES": "lo",
}


def default_ucx_env(has_cuda: bool) -> dict[str, str]:
    """The UCX defaults for this host: CPU loopback settings without CUDA, none with CUDA."""
    return {} if has_cuda else dict(CPU_LOOPBACK_DEFAULTS)


def apply_ucx_defaults(defaults: Mapping[str, str]) -> dict[str, str]:
    """Set each default that is not already in the environment; returns the values in effect.

    Must run before the UCX backend is created: UCX reads its configuration at that moment.
    """
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    return {key: os.environ[key] for key in defaults}
