"""A target for processes the tensor-parallel executor starts: reports what it runs under.
Imports nothing of hybridpd or torch itself, so what it finds imported came from its parent."""

from __future__ import annotations

import json
import os
import sys


def report(path: str, variable: str) -> None:
    """Write this process's view of `variable` and of what its parent had imported."""
    with open(path, "w") as f:
        json.dump({"variable": os.environ.get(variable),
                   "preloaded": sorted(m for m in sys.modules if m.startswith("hybridpd.engine")),
                   "torch": "torch" in sys.modules, "pid": os.getpid()}, f)
