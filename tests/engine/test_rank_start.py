"""How tensor-parallel ranks 1..N-1 start (engine/tp_executor.py: start_rank_process): forked
from a forkserver that imported the worker's modules once, under the environment of the process
that starts them at that moment, and with no CUDA touched by what the forkserver imports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from hybridpd.engine.tp_executor import RANK_PRELOAD, start_rank_process

from .rank_probe import report

JOIN_S = 120.0  # a hang guard, not a bound: starting the forkserver imports torch


def _probe(path: str, variable: str) -> dict:
    proc = start_rank_process(report, (path, variable), "probe")
    proc.join(JOIN_S)
    assert proc.exitcode == 0, f"probe exit code {proc.exitcode}"
    with open(path) as f:
        return json.load(f)


def test_ranks_are_forked_with_the_preload_and_the_current_environment(tmp_path, monkeypatch):
    var = "HYBRIDPD_TEST_RANK_PROBE"
    monkeypatch.setenv(var, "first")
    first = _probe(str(tmp_path / "a.json"), var)
    monkeypatch.setenv(var, "second")  # the forkserver is running now, started under "first"
    second = _probe(str(tmp_path / "b.json"), var)
    monkeypatch.delenv(var)
    third = _probe(str(tmp_path / "c.json"), var)
    assert (first["variable"], second["variable"], third["variable"]) == ("first", "second", None)
    for got in (first, second, third):
        # the probe imports neither: they were there before it ran (forked, not spawned)
        assert got["torch"] and set(RANK_PRELOAD) <= set(got["preloaded"]), got
        assert got["pid"] != os.getpid()
    assert len({first["pid"], second["pid"], third["pid"]}) == 3


def test_the_preload_initialises_no_cuda(tmp_path):
    """A forked child can use CUDA only if its parent never initialised it: importing the
    preload must not ask torch about devices (each entry point below raises if called)."""
    script = textwrap.dedent(f"""
        import importlib, torch, torch.cuda
        def refuse(*a, **k):
            raise SystemExit("CUDA touched at import")
        for name in ("is_available", "device_count", "init", "_lazy_init", "current_device",
                     "set_device", "get_device_properties", "get_device_capability",
                     "is_bf16_supported", "mem_get_info"):
            setattr(torch.cuda, name, refuse)
        for module in {list(RANK_PRELOAD)!r}:
            importlib.import_module(module)
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=JOIN_S, cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
