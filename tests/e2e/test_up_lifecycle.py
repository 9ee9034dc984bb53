"""`hybridpd up` as a user runs it: healthy endpoint, then SIGTERM / Ctrl-C stops everything —
no orphan processes, no port left listening."""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import time

import pytest

from .cluster import get


def _descendants(pid: int) -> set[int]:
    """Every live process whose ancestry leads to `pid` (reads /proc)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    out, frontier = set(), {pid}
    while frontier:
        frontier = {c for c, p in parents.items() if p in frontier} - out
        out |= frontier
    return out


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "zombie" not in f.read()
    except OSError:  # gone
        return False


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_up_starts_serves_and_stops_without_orphans(e2e_models, sig):
    proc = subprocess.Popen(  # --port 0: the proxy binds a port itself and `up` prints it
        [sys.executable, "-m", "hybridpd.cli", "up", "--model", e2e_models["tiny"],
         "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        deadline = time.monotonic() + 240
        lines = [""]
        while time.monotonic() < deadline and proc.poll() is None:
            ready, _, _ = select.select([proc.stdout], [], [], 1.0)
            if ready:
                lines.append(proc.stdout.readline())
                if "is up" in lines[-1]:
                    break
        assert "is up" in lines[-1], "".join(lines)
        port = int(lines[-1].split("http://127.0.0.1:", 1)[1].split("/", 1)[0])
        children = _descendants(proc.pid)
        assert len(children) >= 3  # prefill, decode, proxy (and their engine processes)
        ports = [port] + [int(x.rsplit(":", 1)[1]) for x in "".join(lines).split()
                          if x.startswith("http://127.0.0.1:") and x.rsplit(":", 1)[1].isdigit()]
        assert get(f"http://127.0.0.1:{port}/health") is not None
        proc.send_signal(sig)
        assert proc.wait(timeout=60) == 0
        time.sleep(0.5)
        alive = [p for p in children if _running(p)]
        assert not alive, f"orphans left: {alive}"
        assert not [p for p in ports if _listening(p)], "ports still listening"
    finally:
        if proc.poll() is None:
            proc.kill()
