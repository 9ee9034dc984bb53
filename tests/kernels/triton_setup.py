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


def _fix_interpreter_scalar_index() -> None:
    """Triton 3.6's interpreter turns a scalar into a loop bound with `int(array)`, which
    NumPy >= 2.4 refuses for its 1-element (not 0-d) scalars; read the element instead."""
    try:
        import triton.runtime.interpreter as interp
    except ImportError:  # no triton: the tests skip
        return
    original = getattr(interp, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_hybridpd_fixed", False):
        return

    def patched(tensor, scope):  # noqa: ANN001 - the interpreter's own signature
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._hybridpd_fixed = True
    interp._patch_lang_tensor = patched


if not HAS_CUDA:
    _fix_interpreter_scalar_index()


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
