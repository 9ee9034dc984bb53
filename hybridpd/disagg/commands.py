"""What the engine asks of its ranks' transfer endpoints each step, and what they answer.

Owns the frozen `TransferCommand` / `TransferReport` records that cross the executor boundary
(picklable, so they travel to TP worker processes). Knows nothing of NIXL or tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

from hybridpd.disagg.endpoint import ReadNotice
from hybridpd.disagg.receiver import ReadJob, ReadResult


@dataclass(frozen=True)
class TransferCommand:
    start: tuple[ReadJob, ...] = ()  # decode ranks: post these READs
    cancel: tuple[str, ...] = ()  # decode ranks: release these in-flight READs


@dataclass(frozen=True)
class RankTransferReport:
    rank: int
    notices: tuple[ReadNotice, ...] = ()  # prefill ranks: readers that finished
    results: tuple[ReadResult, ...] = ()  # decode ranks: READs that finished or failed


@dataclass(frozen=True)
class TransferReport:
    ranks: tuple[RankTransferReport, ...]

    @property
    def notices(self) -> list[tuple[int, ReadNotice]]:
        return [(r.rank, n) for r in self.ranks for n in r.notices]

    @property
    def results(self) -> list[tuple[int, ReadResult]]:
        return [(r.rank, x) for r in self.ranks for x in r.results]
