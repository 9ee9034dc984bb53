"""Tensor parallelism for the model: the rank group, shard arithmetic, parallel linears.

Owns `TPGroup` (rank, size, torch.distributed group), `Shard` (which ranges of a full dimension
one rank holds, in local order), the head/group/channel sharding rules (KV-head replication when
TP > num_kv_heads) and the column/row-parallel linear layers with their loaders.
Must not know: layer kinds, the cache, batches or requests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from hybridpd.model.checkpoint import CheckpointReader


@dataclass(frozen=True)
class TPGroup:
    """One rank's view of its tensor-parallel group. `group=None` means the default group."""

    rank: int
    size: int
    group: Any = None

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over the group in place (no-op at size 1); returns `x`."""
        if self.size > 1:
            dist.all_reduce(x, op=dist.ReduceOp.SUM, group=self.group)
        return x


SINGLE = TPGroup(rank=0, size=1)


@dataclass(frozen=True)
class Shard:
    """Ranges [start, stop) of a full dimension held locally, concatenated in this order."""

    ranges: tuple[tuple[int, int], ...]

    @property
    def size(self) -> int:
        return sum(stop - start for start, stop in self.ranges)

    @staticmethod
    def full(n: int) -> Shard:
        return Shard(((0, n),))

    @staticmethod
    def concat(*shards: Shard) -> Shard:
        return Shard(tuple(r for s in shards for r in s.ranges))

    def offset(self, by: int) -> Shard:
        return Shard(tuple((a + by, b + by) for a, b in self.ranges))

    def scaled(self, unit: int) -> Shard:
        """Item ranges -> element ranges when each item spans `unit` elements."""
        return Shard(tuple((a * unit, b * unit) for a, b in self.ranges))


def split_evenly(n: int, tp: TPGroup, what: str) -> Shard:
    """This rank's contiguous 1/size of `n` items; `what` names them in the error."""
    if n % tp.size:
        raise ValueError(f"{what} ({n}) must be divisible by the tensor-parallel size {tp.size}")
    per = n // tp.size
    return Shard(((tp.rank * per, (tp.rank + 1) * per),))


def kv_head_shard(num_kv_heads: int, tp: TPGroup) -> Shard:
    """KV heads of this rank: an even split, or one replicated head when TP > num_kv_heads.

    With replication rank q holds head floor(q * K / TP).
    """
    if tp.size <= num_kv_heads:
        return split_evenly(num_kv_heads, tp, "num_key_value_heads")
    if tp.size % num_kv_heads:
        raise ValueError(
            f"tensor-parallel size {tp.size} must be a multiple of num_key_value_heads "
            f"{num_kv_heads} when larger than it"
        )
    head = tp.rank * num_kv_heads // tp.size
    return Shard(((head, head + 1),))


class ColumnParallelLinear(nn.Module):
    """y = x W[rows]^T (+ b[rows]): the output features of `out_shard`, no communication."""

    def __init__(
        self, in_features: int, out_shard: Shard, bias: bool, dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        self.out_shard = out_shard
        # (out_local, in)
        self.weight = nn.Parameter(
            torch.empty(out_shard.size, in_features, dtype=dtype, device=device),
            requires_grad=False,
        )
        self.bias = (
            nn.Parameter(torch.empty(out_shard.size, dtype=dtype, device=device),
                         requires_grad=False)
            if bias else None
        )

    def load(self, reader: CheckpointReader, prefix: str) -> None:
        self.weight.copy_(reader.read(f"{prefix}.weight", 0, self.out_shard.ranges))
        if self.bias is not None:
            self.bias.copy_(reader.read(f"{prefix}.bias", 0, self.out_shard.ranges))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """y = all_reduce(x_local W[:, cols]^T) (+ b): input features of `in_shard` on this rank.

    `reduce=False` leaves the partial sum to the caller (to fuse several reductions in one).
    """

    def __init__(
        self, in_shard: Shard, out_features: int, bias: bool, tp: TPGroup, dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        self.in_shard = in_shard
        self.tp = tp
        # (out, in_local)
        self.weight = nn.Parameter(
            torch.empty(out_features, in_shard.size, dtype=dtype, device=device),
            requires_grad=False,
        )
        self.bias = (
            nn.Parameter(torch.empty(out_features, dtype=dtype, device=device),
                         requires_grad=False)
            if bias else None
        )

    def load(self, reader: CheckpointReader, prefix: str) -> None:
        self.weight.copy_(reader.read(f"{prefix}.weight", 1, self.in_shard.ranges))
        if self.bias is not None:
            self.bias.copy_(reader.read(f"{prefix}.bias"))

    def forward(self, x: torch.Tensor, reduce: bool = True) -> torch.Tensor:
        y = F.linear(x, self.weight)
        if reduce:
            y = self.tp.all_reduce(y)
        if self.bias is not None and (reduce or self.tp.rank == 0):
            y = y + self.bias
        return y


def linear_names(prefix: str, bias: bool) -> list[str]:
    return [f"{prefix}.weight"] + ([f"{prefix}.bias"] if bias else [])


def read_vector(reader: CheckpointReader, name: str, shard: Shard | None,
                dtype: torch.dtype | None = None) -> torch.Tensor:
    """A 1-D tensor (or its `shard` along dim 0)."""
    return reader.read(name, 0, None if shard is None else shard.ranges, dtype)
