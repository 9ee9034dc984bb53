"""Shared setup for the Triton kernel tests: interpreter on CPU, the device, random cases.

Owns test-only helpers: on a machine without CUDA it turns Triton's CPU interpreter on
(`TRITON_INTERPRET=1`, before triton is imported) so the kernels run on CPU tensors; the
device the kernels are checked on; relative-error comparison. Knows nothing of the model.
"""

from __future__ import annotations

import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (inf when out has a NaN)."""
    o, r = out.double(), ref.double()
    if not torch.isfinite(o).all():
        return float("inf")
    return float((o - r).norm() / r.norm().clamp_min(1e-30))


def qsl(lens: list[int], device: torch.device = DEVICE) -> torch.Tensor:
    """query_start_loc (B+1,) int64 for sequence lengths `lens`."""
    return torch.tensor([0, *torch.tensor(lens, dtype=torch.int64).cumsum(0).tolist()],
                        dtype=torch.int64, device=device)
