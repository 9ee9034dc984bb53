"""RMS normalisations of Nemotron-H: the block/final `RMSNorm` and the Mamba gated, grouped one.

Owns the exact formulas (fp32 math, where the weight multiply and the casts happen, matching
transformers' NemotronHRMSNorm / NemotronHRMSNormGated). Must not know: layers, cache, TP
(a TP rank passes its local width; groups stay whole per rank).
"""

from __future__ import annotations

import torch
from torch import nn

from hybridpd.kernels.ops import gated_rmsnorm_ref, rmsnorm_ref
from hybridpd.model.checkpoint import CheckpointReader
from hybridpd.model.parallel import Shard, read_vector


class RMSNorm(nn.Module):
    """weight * x / rms(x) in fp32, cast back to the input dtype."""

    def __init__(self, hidden: int, eps: float, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden, dtype=dtype, device=device),
                                   requires_grad=False)  # (hidden,)

    def load(self, reader: CheckpointReader, prefix: str) -> None:
        self.weight.copy_(read_vector(reader, f"{prefix}.weight", None))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reference formula (the model calls the kernel seam's op with these parameters
        instead, so a fused kernel can replace it on a GPU)."""
        return rmsnorm_ref(x, self.weight, self.eps)


class GatedRMSNorm(nn.Module):
    """weight * groupnorm_rms(y * silu(z)): gate before the norm, groups of `group_size`."""

    def __init__(
        self, shard: Shard, group_size: int, eps: float, dtype: torch.dtype, device: torch.device
    ) -> None:
        super().__init__()
        if shard.size % group_size:
            raise ValueError(f"gated norm width {shard.size} is not whole groups of {group_size}")
        self.shard = shard
        self.group_size = group_size
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(shard.size, dtype=dtype, device=device),
                                   requires_grad=False)  # (d_inner_local,)

    def load(self, reader: CheckpointReader, prefix: str) -> None:
        self.weight.copy_(read_vector(reader, f"{prefix}.weight", self.shard))

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The reference formula (the Mamba mixer calls the kernel seam's op with these
        parameters instead, so a fused kernel can replace it on a GPU)."""
        return gated_rmsnorm_ref(y, z, self.weight, self.group_size, self.eps)
