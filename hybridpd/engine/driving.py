"""Driving an in-process engine: one iteration, blocking only as long as the engine allows.

Owns the idle wait of loops that drive an `EngineCore` without a pipe to block on (`LLM`,
in-process tests): `Engine.step()` never sleeps, it says through `idle_wait_s()` how long its
driver may block (0: a step would compute; a short poll interval: only transfers or leases are
outstanding; None: nothing at all). The engine process's loop blocks on its pipe for that long
instead (`server/engine_loop.py`). Knows nothing of requests or P/D.
"""

from __future__ import annotations

import time

from hybridpd.engine.protocol import EngineCore, GenerateOutput


def step_when_due(engine: EngineCore) -> list[GenerateOutput]:
    """Wait out the engine's idle time (when it has only transfers or leases to watch), then
    run one step; returns its outputs."""
    wait = engine.idle_wait_s()
    if wait:
        time.sleep(wait)  # a poll interval the engine asked for: it has nothing to compute
    return engine.step()

