"""Children that die with their launcher, however the launcher dies (SIGKILL included).

Owns both halves of the tie between `hybridpd up` (or any `Deployment`) and its children:

* **launcher side** (`Lifeline`): one pipe per deployment. The launcher keeps the write end and
  never writes; every child gets the read end (`pass_fds`) and its number in
  `HYBRIDPD_LIFELINE_FD`. When the launcher dies, however it dies, the kernel closes the write
  end and every child's read returns EOF. On Linux, `preexec()` also sets
  `prctl(PR_SET_PDEATHSIG, SIGTERM)` in the forked child before exec (and exits at once if the
  launcher already died between fork and prctl).
* **child side** (`watch_parent`, called first thing by `hybridpd.cli.main`): a daemon thread
  blocks on the read end; on EOF it sends SIGTERM to the child's process group (the child is its
  group's leader: its engine process and tensor-parallel ranks are in that group), waits
  `GRACE_S`, then SIGKILLs the group. If the child exits cleanly within the grace, an `atexit`
  hook SIGKILLs the group's stragglers. The portable part is the pipe; PDEATHSIG only makes the
  SIGTERM arrive earlier (and covers a child that has not reached `watch_parent` yet).

PDEATHSIG fires when the *thread* that forked the child exits, so `preexec` is only applied when
the spawn runs on the main thread (the pipe covers the other cases). Must not know what the
children run.
"""

from __future__ import annotations

import atexit
import ctypes
import ctypes.util
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable

from hybridpd.env import LIFELINE_FD_VAR, lifeline_fd

GRACE_S = 2.0  # SIGTERM -> SIGKILL of an orphaned child's group; children gone within ~GRACE_S
PR_SET_PDEATHSIG = 1
log = logging.getLogger("hybridpd.launch")


def _load_prctl() -> Callable[..., int] | None:
    """libc's prctl, resolved in the parent (a forked child must not dlopen)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl
    except (OSError, AttributeError):
        return None


class Lifeline:
    """The launcher's end: create once, hand `fds`, `env` and `preexec` to every spawn."""

    def __init__(self) -> None:
        self._read, self._write = os.pipe()  # both non-inheritable; pass_fds opens the read end
        self._prctl = _load_prctl()
        self._parent = os.getpid()

    @property
    def fds(self) -> tuple[int, ...]:
        return (self._read,)

    @property
    def env(self) -> dict[str, str]:
        return {LIFELINE_FD_VAR: str(self._read)}

    def preexec(self) -> Callable[[], None] | None:
        """The child-side PDEATHSIG hook (None where unavailable or off the main thread)."""
        if self._prctl is None or threading.current_thread() is not threading.main_thread():
            return None
        prctl, parent = self._prctl, self._parent

        def _set_pdeathsig() -> None:  # runs in the forked child, before exec
            prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
            if os.getppid() != parent:  # the launcher died before prctl took effect
                os._exit(1)

        return _set_pdeathsig

    def close(self) -> None:
        """Cut the line on purpose (children then exit as if the launcher died); idempotent."""
        for fd in (self._read, self._write):
            try:
                os.close(fd)
            except OSError:
                pass
        self._read = self._write = -1


_fired = threading.Event()


def watch_parent() -> bool:
    """In a child started with a `Lifeline`: exit with the launcher. True when watching."""
    fd = lifeline_fd()
    if fd is None:
        return False
    try:
        os.fstat(fd)
    except OSError:  # inherited the variable but not the descriptor (e.g. a grandchild)
        return False
    threading.Thread(target=_watch, args=(fd,), name="hybridpd-lifeline", daemon=True).start()
    atexit.register(_sweep_at_exit)
    return True


def _watch(fd: int) -> None:
    try:
        while os.read(fd, 64):
            pass  # the launcher never writes; EOF (or an error) means it is gone
    except OSError:
        pass
    _fired.set()
    print("hybridpd: the launcher died; stopping", file=sys.stderr, flush=True)
    _signal_own_group(signal.SIGTERM)
    threading.Event().wait(GRACE_S)  # a grace period for a clean stop, not a synchronisation
    _signal_own_group(signal.SIGKILL)


def _sweep_at_exit() -> None:
    if _fired.is_set():  # a clean exit within the grace: kill what is left of our group
        _signal_own_group(signal.SIGKILL)


def _signal_own_group(sig: int) -> None:
    """Signal our process group when we lead it (engine process, TP ranks), else only us."""
    try:
        if os.getpgrp() == os.getpid():
            os.killpg(os.getpgrp(), sig)
        else:
            os.kill(os.getpid(), sig)
    except (ProcessLookupError, PermissionError):
        pass
