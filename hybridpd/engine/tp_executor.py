"""Tensor-parallel executor: one process per rank, rank 0 inside the engine process.

Owns starting ranks 1..N-1, `torch.distributed` set-up (gloo on CPU, NCCL for the model's
collectives on GPU, plus a gloo group for control messages), sending each step / transfer
command to every rank as one typed message (`engine/step_messages.py`: one broadcast per step,
running requests as deltas) and gathering what comes back, agreeing on one pool size, and
shutting the ranks down. Knows nothing of scheduling policy.

Ranks 1..N-1 are forked from this process's forkserver (`hybridpd/process_start.py`: torch and
the worker's modules imported once, the environment and stdout / stderr taken from this process
at each start), not spawned: a TP-4 start imports torch twice, not four times.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from hybridpd.cache.geometry import CacheGeometry
from hybridpd.config import ModelConfig
from hybridpd.disagg.commands import RankTransferReport, TransferCommand, TransferReport
from hybridpd.disagg.endpoint import RankAdvert
from hybridpd.engine.args import EngineArgs, Role
from hybridpd.engine.runner import StepResult
from hybridpd.engine.scheduler import SchedulerOutput
from hybridpd.engine.step_messages import (
    AttachMessage,
    RankMessage,
    Shutdown,
    StepDecoder,
    StepEncoder,
    StepMessage,
    TransferMessage,
)
from hybridpd.env import omp_num_threads
from hybridpd.process_start import start_process

DIST_TIMEOUT = timedelta(seconds=120)  # no step's collective takes this long; a dead peer does
JOIN_TIMEOUT_S = 10.0

T = TypeVar("T")


def _rendezvous(world_size: int, port: int = 0) -> dist.TCPStore:
    """The ranks' rendezvous store: rank 0 hosts it on a port it binds itself (port 0: no
    pick-then-bind race), the others connect to that port."""
    return dist.TCPStore("127.0.0.1", port, world_size=world_size, is_master=port == 0,
                         timeout=DIST_TIMEOUT, wait_for_workers=False)


def _uses_cuda(args: EngineArgs) -> bool:
    return args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())


class _Rank:
    """What every rank (0 included) runs: dist set-up and its worker."""

    def __init__(self, args: EngineArgs, rank: int, store: dist.TCPStore) -> None:
        from hybridpd.engine.worker import Worker
        from hybridpd.model.parallel import TPGroup

        cuda = _uses_cuda(args)
        if cuda:
            torch.cuda.set_device(rank % torch.cuda.device_count())
        dist.init_process_group(
            "nccl" if cuda else "gloo", store=store, rank=rank, world_size=args.tp_size,
            timeout=DIST_TIMEOUT,
        )
        self.ctrl = dist.new_group(backend="gloo", timeout=DIST_TIMEOUT) if cuda else None
        self.rank = rank
        tp = TPGroup(rank=rank, size=args.tp_size, group=None)
        self.worker = Worker(args, rank, tp, agree=self._min_over_ranks)

    def _min_over_ranks(self, n: int) -> int:
        t = torch.tensor([n], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.ctrl)
        return int(t.item())

    def broadcast(self, msg: RankMessage | None) -> RankMessage:
        """Rank 0 sends `msg`; the others pass None and get rank 0's message."""
        box: list[Any] = [msg]
        dist.broadcast_object_list(box, src=0, group=self.ctrl)
        return box[0]

    def gather(self, obj: T) -> list[T] | None:
        out: list[Any] | None = [None] * dist.get_world_size() if self.rank == 0 else None
        dist.gather_object(obj, out, dst=0, group=self.ctrl)
        return out

    def serve(self) -> None:
        """Ranks 1..N-1: run rank 0's messages until it says `Shutdown`."""
        steps = StepDecoder()
        while True:
            msg = self.broadcast(None)
            if isinstance(msg, Shutdown):
                return
            if isinstance(msg, StepMessage):
                self.worker.execute(steps.decode(msg))
                if msg.transfer is not None:
                    self.gather(self.worker.transfer(msg.transfer))
            elif isinstance(msg, TransferMessage):
                self.gather(self.worker.transfer(msg.command))
            elif isinstance(msg, AttachMessage):
                self.gather(self.worker.attach_endpoint())
            else:
                raise TypeError(f"unknown rank message {type(msg).__name__}")

    def close(self) -> None:
        self.worker.close()
        dist.destroy_process_group()


def _rank_main(args: EngineArgs, rank: int, port: int) -> None:
    torch.set_num_threads(omp_num_threads())
    r = _Rank(args, rank, _rendezvous(args.tp_size, port))
    try:
        r.serve()
    finally:
        r.close()


class TPExecutor:
    recoverable = False  # a rank that raised may leave the others inside a collective

    def __init__(self, args: EngineArgs) -> None:
        cfg = ModelConfig.from_dir(args.model_dir)
        if _uses_cuda(args) and args.tp_size > torch.cuda.device_count():
            raise ValueError(
                f"--tp {args.tp_size} needs {args.tp_size} GPUs (one per rank); this host has "
                f"{torch.cuda.device_count()}"
            )
        for rank in range(args.tp_size):  # refuse impossible splits before spawning anything
            CacheGeometry.build(cfg, tp_size=args.tp_size, tp_rank=rank,
                                kernel_block_size=args.kernel_block_size)
        self.store = _rendezvous(args.tp_size)  # rank 0's; kept alive with the executor
        port = self.store.port
        self.procs = [start_process(_rank_main, (args, r, port), f"hybridpd-rank{r}", daemon=True)
                      for r in range(1, args.tp_size)]
        self.rank0 = _Rank(args, 0, self.store)
        w = self.rank0.worker
        self.geometry = w.geometry
        self.model_config = w.model_config
        self.num_blocks = w.num_blocks
        self.adverts: tuple[RankAdvert, ...] = ()
        self.steps = StepEncoder()  # what the workers hold of the running requests
        if args.role != Role.BOTH:  # every rank's handshake record, for rank 0's side channel
            self.adverts = tuple(self._gathered(AttachMessage(), w.attach_endpoint))

    def _send(self, msg: RankMessage) -> None:
        self._check_alive()
        self.rank0.broadcast(msg)

    def _gathered(self, msg: RankMessage, local: Callable[[], T]) -> list[T]:
        """Send `msg`, run rank 0's part, gather every rank's answer (rank order)."""
        self._send(msg)
        answers = self.rank0.gather(local())
        assert answers is not None  # rank 0 receives the gather
        return answers

    def _check_alive(self) -> None:
        dead = [p.name for p in self.procs if not p.is_alive()]
        if dead:
            raise RuntimeError(f"tensor-parallel ranks died: {', '.join(dead)}")

    def execute(self, out: SchedulerOutput) -> StepResult:
        result, _ = self.execute_with_transfer(out, None)
        return result

    def execute_with_transfer(self, out: SchedulerOutput, cmd: TransferCommand | None
                              ) -> tuple[StepResult, TransferReport | None]:
        """One step and (when `cmd` is given) a transfer command after it, in one broadcast.
        Rank 0 runs `out` itself; the others rebuild it from the step message."""
        self._send(self.steps.encode(out, cmd))
        result = self.rank0.worker.execute(out)
        if cmd is None:
            return result, None
        reports = self.rank0.gather(self.rank0.worker.transfer(cmd))
        assert reports is not None
        return result, TransferReport(tuple(reports))

    def transfer(self, cmd: TransferCommand) -> TransferReport:
        reports: list[RankTransferReport] = self._gathered(
            TransferMessage(cmd), lambda: self.rank0.worker.transfer(cmd))
        return TransferReport(tuple(reports))

    def shutdown(self) -> None:
        if all(p.is_alive() for p in self.procs):
            self.rank0.broadcast(Shutdown())
        for p in self.procs:
            p.join(timeout=JOIN_TIMEOUT_S)
            if p.is_alive():
                p.kill()
        self.rank0.close()
