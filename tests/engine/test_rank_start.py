"""How the engine process and tensor-parallel ranks start (hybridpd/process_start.py): forked
from a forkserver that imported the engine's modules once, under the environment and the
stdout / stderr of the process that starts them at that moment, with no CUDA touched by what the
forkserver imports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from hybridpd.process_start import PRELOAD, start_process

from .rank_probe import report, speak

JOIN_S = 120.0  # a hang guard, not a bound: starting the forkserver imports torch


def _run(target, *args) -> None:
    proc = start_process(target, args, "probe", daemon=True)
    proc.join(JOIN_S)
    assert proc.exitcode == 0, f"probe exit code {proc.exitcode}"


def _probe(path: str, variable: str) -> dict:
    _run(report, path, variable)
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
        assert got["torch"] and set(PRELOAD) <= set(got["preloaded"]), got
        assert got["pid"] != os.getpid()
    assert len({first["pid"], second["pid"], third["pid"]}) == 3


def test_children_write_to_the_stdout_and_stderr_of_their_start(tmp_path):
    _run(speak, "warm")  # the forkserver runs now, with the descriptors it started with
    saved = [os.dup(1), os.dup(2)]
    try:
        for fd in (1, 2):
            with open(tmp_path / f"fd{fd}", "wb") as f:
                os.dup2(f.fileno(), fd)
        _run(speak, "now")
    finally:
        for fd, old in zip((1, 2), saved):
            os.dup2(old, fd)
            os.close(old)
    # lines only: a C library's thread in this process may write to fd 2 meanwhile too
    assert "out:now" in (tmp_path / "fd1").read_text().splitlines()
    assert "err:now" in (tmp_path / "fd2").read_text().splitlines()


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
        for module in {list(PRELOAD)!r}:
            importlib.import_module(module)
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=JOIN_S, cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
