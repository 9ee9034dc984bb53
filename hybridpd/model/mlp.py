"""The non-gated ReLU² MLP (`-` layers and the MoE shared expert), tensor parallel.

Owns: up (column-parallel) -> relu(x)^2 -> down (row-parallel) and its checkpoint names.
Must not know: the cache, batches, routing.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from hybridpd.model.checkpoint import CheckpointReader
from hybridpd.model.parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    TPGroup,
    linear_names,
    split_evenly,
)


def relu2(x: torch.Tensor) -> torch.Tensor:
    return torch.relu(x).square()


class ReLU2MLP(nn.Module):
    def __init__(
        self, hidden: int, intermediate: int, bias: bool, tp: TPGroup, dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        self.bias = bias
        inter = split_evenly(intermediate, tp, "MLP intermediate size")
        self.up_proj = ColumnParallelLinear(hidden, inter, bias, dtype, device)
        self.down_proj = RowParallelLinear(inter, hidden, bias, tp, dtype, device)

    def weight_names(self, prefix: str) -> list[str]:
        return linear_names(f"{prefix}.up_proj", self.bias) + linear_names(
            f"{prefix}.down_proj", self.bias
        )

    def load(self, reader: CheckpointReader, prefix: str) -> None:
        self.up_proj.load(reader, f"{prefix}.up_proj")
        self.down_proj.load(reader, f"{prefix}.down_proj")

    def forward(self, x: torch.Tensor, reduce: bool = True,
                act: Callable[[torch.Tensor], torch.Tensor] = relu2) -> torch.Tensor:
        """(T, hidden) -> (T, hidden); `reduce=False` returns this rank's partial sum; `act`
        is relu² (the kernel seam's, on devices that fuse it)."""
        return self.down_proj(act(self.up_proj(x)), reduce=reduce)
