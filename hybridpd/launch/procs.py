"""Child processes of a local deployment: start, learn their port, wait healthy, stop.

Owns spawning `hybridpd` subcommands as process-group leaders tied to the launcher by a
`Lifeline` (they exit when it dies, however it dies), reading the port each child bound and
reported in its ready file (`--ready-file`: the child binds port 0 or its pinned port itself,
so there is no free-port race), health polling with deadlines, and teardown (SIGTERM to the
group, then SIGKILL). Knows nothing of what the children serve.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import BinaryIO

from hybridpd.launch.lifeline import Lifeline


def free_port(host: str = "127.0.0.1") -> int:
    """A port free *now* (racy: another process may take it before it is bound). Children of
    a deployment do not use it: they bind port 0 and report the port in their ready file."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class Child:
    """One `hybridpd` subcommand. `url` is known up front, or — with `ready_file` (the child's
    argv then carries `--ready-file PATH`) — once the child reported the port it bound."""

    name: str
    argv: list[str]
    url: str = ""
    proc: subprocess.Popen | None = None
    log_path: str | None = None
    extra: dict = field(default_factory=dict)
    ready_file: str | None = None
    lifeline: Lifeline | None = None

    def start(self, env: dict[str, str], log_dir: str | None) -> None:
        """Spawn the child; its output goes to `<log_dir>/<name>.log` when a log_dir is given.

        The parent closes its handle of the log file right after the spawn: the child holds its
        own descriptor, so nothing of ours stays open for the child's lifetime.
        """
        if self.ready_file is not None:
            try:
                os.unlink(self.ready_file)  # a stale report must not be mistaken for this one
            except FileNotFoundError:
                pass
        if not log_dir:
            self.proc = self._spawn(env, None)
            return
        os.makedirs(log_dir, exist_ok=True)
        self.log_path = os.path.join(log_dir, f"{self.name}.log")
        with open(self.log_path, "ab") as out:
            self.proc = self._spawn(env, out)

    def _spawn(self, env: dict[str, str], out: BinaryIO | None) -> subprocess.Popen:
        line = self.lifeline
        return subprocess.Popen(
            [sys.executable, "-m", "hybridpd.cli", *self.argv],
            env={**env, **(line.env if line else {})},
            stdout=out,
            stderr=subprocess.STDOUT if out else None,
            start_new_session=True,  # its own process group: we can kill it and its children
            pass_fds=line.fds if line else (),
            preexec_fn=line.preexec() if line else None,
        )

    def poll_ready(self) -> bool:
        """True once the child's URL is known (read from its ready file when it has one)."""
        if self.url:
            return True
        if self.ready_file is None:
            return False
        try:
            with open(self.ready_file) as f:
                self.url = str(json.load(f)["url"])
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return False  # not written yet (the child writes it atomically)
        return True

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def healthy(self, timeout_s: float = 1.0) -> bool:
        if not self.poll_ready():
            return False
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=timeout_s) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError, TimeoutError):
            return False

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM the child's process group, SIGKILL what is left after `grace_s`. The group
        is signalled even when the leader already exited (its engine / TP ranks may not have)."""
        if self.proc is None:
            return
        if self.proc.poll() is not None:
            _signal_group(self.proc, signal.SIGKILL)
            return
        _signal_group(self.proc, signal.SIGTERM)
        try:
            self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            _signal_group(self.proc, signal.SIGKILL)
            self.proc.wait(timeout=5)
        finally:
            _signal_group(self.proc, signal.SIGKILL)  # stragglers in the group


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def wait_healthy(children: list[Child], timeout_s: float) -> None:
    """Block until every child answers /health 200; raise with the failing child's log tail."""
    deadline = time.monotonic() + timeout_s
    pending = list(children)
    while pending:
        for c in list(pending):
            if not c.alive():
                assert c.proc is not None  # every child is started before it is waited on
                raise RuntimeError(f"{c.name} exited with code {c.proc.returncode}{_tail(c)}")
            if c.healthy():
                pending.remove(c)
        if pending and time.monotonic() > deadline:
            names = ", ".join(c.name for c in pending)
            raise TimeoutError(f"not healthy after {timeout_s:.0f}s: {names}{_tail(pending[0])}")
        if pending:
            time.sleep(0.2)


def _tail(c: Child, n: int = 30) -> str:
    if not c.log_path or not os.path.exists(c.log_path):
        return ""
    with open(c.log_path, "rb") as f:
        lines = f.read().decode(errors="replace").splitlines()[-n:]
    return f"\n--- last lines of {c.log_path} ---\n" + "\n".join(lines)
