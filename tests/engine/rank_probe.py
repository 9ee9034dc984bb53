"""A target for processes started by `hybridpd/process_start.py`: reports what it runs under.
Imports nothing of hybridpd or torch itself, so what it finds imported came from its parent."""

from __future__ import annotations

import json
import os
import sys


def report(path: str, variable: str) -> None:
    """Write this process's view of `variable` and of what its parent had imported."""
    with open(path, "w") as f:
        json.dump({"variable": os.environ.get(variable),
                   "preloaded": sorted(m for m in sys.modules if m.startswith("hybridpd.")),
                   "torch": "torch" in sys.modules, "pid": os.getpid()}, f)


def speak(line: str) -> None:
    """Write `line` to this process's stdout and stderr (file descriptors 1 and 2)."""
    os.write(1, f"out:{line}\n".encode())
    os.write(2, f"err:{line}\n".encode())
