"""Which role hooks an engine runs: co-located, prefill or decode.

Owns the one mapping from `Role` to its hooks class, so `engine/core.py` imports the hooks
without the hooks importing it (they see the engine as a `HookHost`). Knows nothing else.
"""

from __future__ import annotations

from hybridpd.engine.args import Role
from hybridpd.engine.decode_side import DecodeHooks
from hybridpd.engine.disagg_hooks import ColocatedHooks, HookHost
from hybridpd.engine.prefill_side import PrefillHooks


def make_disagg_hooks(engine: HookHost) -> ColocatedHooks:
    role = engine.args.role
    if role == Role.PREFILL:
        return PrefillHooks(engine)
    if role == Role.DECODE:
        return DecodeHooks(engine)
    return ColocatedHooks(engine)
