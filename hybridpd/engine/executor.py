"""Executors: where the workers run. Local (TP = 1, in this process) or one process per rank.

Owns the fan-out of a step to every rank and the collection of rank 0's sample. Knows nothing
of scheduling policy or requests. The engine talks to `Executor` only.
"""

from __future__ import annotations

from typing import Protocol

from hybridpd.cache.geometry import CacheGeometry
from hybridpd.config import ModelConfig
from hybridpd.disagg.commands import TransferCommand, TransferReport
from hybridpd.disagg.endpoint import RankAdvert
from hybridpd.engine.args import EngineArgs, Role
from hybridpd.engine.runner import StepResult
from hybridpd.engine.scheduler import SchedulerOutput


class Executor(Protocol):
    geometry: CacheGeometry  # rank 0's geometry (block ids and tokens are the same on all)
    model_config: ModelConfig
    num_blocks: int

    # what a peer's handshake needs of each rank (P/D roles; empty otherwise), for the
    # transfer service's side channel
    adverts: tuple[RankAdvert, ...]
    recoverable: bool  # may the engine go on after a step raised? (not with TP collectives)

    def execute(self, out: SchedulerOutput) -> StepResult: ...

    def execute_with_transfer(self, out: SchedulerOutput, cmd: TransferCommand | None
                              ) -> tuple[StepResult, TransferReport | None]:
        """A step and, when `cmd` is given, a transfer command after it (under TP one
        broadcast carries both)."""

    def transfer(self, cmd: TransferCommand) -> TransferReport: ...

    def shutdown(self) -> None: ...


class LocalExecutor:
    """TP = 1: the single worker lives in this process."""

    recoverable = True  # a failed step leaves no other process mid-collective

    def __init__(self, args: EngineArgs) -> None:
        from hybridpd.engine.worker import Worker

        self.worker = Worker(args, rank=0)
        self.geometry = self.worker.geometry
        self.model_config = self.worker.model_config
        self.num_blocks = self.worker.num_blocks
        self.adverts: tuple[RankAdvert, ...] = ()
        if args.role != Role.BOTH:
            self.adverts = (self.worker.attach_endpoint(),)

    def execute(self, out: SchedulerOutput) -> StepResult:
        return self.worker.execute(out)

    def execute_with_transfer(self, out: SchedulerOutput, cmd: TransferCommand | None
                              ) -> tuple[StepResult, TransferReport | None]:
        result = self.execute(out)
        return result, None if cmd is None else self.transfer(cmd)

    def transfer(self, cmd: TransferCommand) -> TransferReport:
        return TransferReport((self.worker.transfer(cmd),))

    def shutdown(self) -> None:
        self.worker.close()


def make_executor(args: EngineArgs) -> Executor:
    if args.tp_size == 1:
        return LocalExecutor(args)
    from hybridpd.engine.tp_executor import TPExecutor

    return TPExecutor(args)
