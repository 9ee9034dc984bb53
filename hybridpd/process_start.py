"""Starting hybridpd's own Python child processes: the engine process (`server/engine_proc.py`)
and tensor-parallel ranks 1..N-1 (`engine/tp_executor.py`).

Owns one `multiprocessing` forkserver per starting process, preloaded once with the engine's
modules (`PRELOAD`: torch, the model, the worker), from which every child is forked, instead of
a fresh interpreter per child importing them again ("spawn"): an engine process or a rank starts
in a fraction of a second once the server is up. The forkserver is itself a fresh interpreter
(no threads, no CUDA: importing `PRELOAD` asks torch about no device), so a child sets up its
device, torch.distributed and NIXL itself, exactly as a spawned one did. What spawn gave a child
and a fork from an older server would not, the child takes from its starter at its start: the
whole environment (`env.snapshot` / `env.adopt`) and the file descriptors of stdout and stderr
(so its logs go where the starter's go now, not where the server's went when it started).

Must not import torch or anything of the engine: the API process imports this before its
socket is bound, and the preload is named, never imported, here.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from collections.abc import Callable
from multiprocessing import reduction
from typing import Any

from hybridpd.env import adopt, snapshot

# What the forkserver imports before it forks anything: the engine process's entry point and
# engine, the TP executor (torch.distributed) and the worker (model, cache, kernels). None of it
# may initialise CUDA at import (tests/engine/test_rank_start.py checks).
PRELOAD = ("hybridpd.server.engine_loop", "hybridpd.engine.core", "hybridpd.engine.tp_executor",
           "hybridpd.engine.worker")
STD_FDS = (1, 2)


class _StdStreams:
    """The starter's stdout and stderr, passed to the child as it is forked (pickled while the
    child starts, when `reduction.DupFd` can hand descriptors to the forkserver)."""

    def __reduce__(self) -> tuple[Any, ...]:
        fds = [fd for fd in STD_FDS if _is_open(fd)]
        return (_Received, (fds, [reduction.DupFd(fd) for fd in fds]))


class _Received:
    def __init__(self, targets: list[int], fds: list[Any]) -> None:
        self.targets = targets
        self.fds = fds

    def install(self) -> None:
        for target, dup in zip(self.targets, self.fds):
            fd = dup.detach()
            if fd != target:
                os.dup2(fd, target)
                os.close(fd)


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def start_process(target: Callable[..., None], args: tuple[Any, ...], name: str,
                  daemon: bool) -> mp.process.BaseProcess:
    """`target(*args)` in a process forked from this process's forkserver (started with
    `PRELOAD` on first use), under this process's environment and stdout / stderr as they are
    now."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(list(PRELOAD))  # no effect once the server runs
    proc = ctx.Process(target=_child_main, args=(snapshot(), _StdStreams(), target, args),
                       name=name, daemon=daemon)
    proc.start()
    return proc


def _child_main(environment: dict[str, str], streams: _Received, target: Callable[..., None],
                args: tuple[Any, ...]) -> None:
    adopt(environment)  # before anything reads it (CUDA_VISIBLE_DEVICES, UCX_*, secrets)
    streams.install()
    target(*args)
