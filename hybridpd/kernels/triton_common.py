"""Shared launcher helpers for the Triton prefill kernels (shape/stride/device checks).

Owns the small rules every launcher applies: tensors must be on CUDA (or on the CPU under
Triton's interpreter, `TRITON_INTERPRET=1`), a power-of-two block size for a dimension, and the
dot precision for a compute dtype; and a fix for Triton 3.6's interpreter under NumPy >= 2.4
(applied only when interpreting). Imports triton; only the kernel modules import this one, and
only the seam imports those (never on CPU). Knows nothing of the model, requests or the pool.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _fix_interpreter_scalar_index() -> None:
    """Triton 3.6's interpreter turns a scalar into a loop bound with `int(array)`, which
    NumPy >= 2.4 refuses for its 1-element (not 0-d) scalars; read the element instead."""
    try:
        import triton.runtime.interpreter as interp
    except ImportError:  # no triton: nothing to fix
        return
    original = getattr(interp, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_hybridpd_fixed", False):
        return

    def patched(tensor, scope):  # noqa: ANN001 - the interpreter's own signature
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched.__dict__["_hybridpd_fixed"] = True  # a function attribute (mypy: no such field)
    interp._patch_lang_tensor = patched


if interpreting():
    _fix_interpreter_scalar_index()


def check_device(op: str, *tensors: Tensor) -> None:
    """ValueError unless every tensor is on one CUDA device (or on CPU while interpreting)."""
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"{op}: tensors on several devices {sorted(map(str, devices))}")
    dev = devices.pop()
    if dev.type != "cuda" and not (dev.type == "cpu" and interpreting()):
        raise ValueError(f"{op}: Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 on "
                         f"CPU), got {dev}")


def check_shape(op: str, name: str, t: Tensor, shape: tuple[int, ...]) -> None:
    """ValueError naming the tensor unless t.shape == shape."""
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} has shape {tuple(t.shape)}, expected {tuple(shape)}")


def check_last_dim_contiguous(op: str, name: str, t: Tensor) -> None:
    """ValueError unless the innermost dimension has stride 1 (coalesced loads)."""
    if t.dim() and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{op}: {name} needs a unit innermost stride, got strides {t.stride()}")


def pow2(n: int, minimum: int = 16) -> int:
    """The smallest power of two >= max(n, minimum)."""
    n = max(n, minimum, 1)
    return 1 << (n - 1).bit_length()


def dot_precision(dtype: torch.dtype, interpret: bool = False) -> str:
    """tl.dot precision for float32 operands: exact ("ieee") for float32 models, so they match
    the references closely; half-precision models use "tf32" where a dot runs on fp32 data.
    The interpreter computes dots in float32 ("ieee"): its bf16 dot is wrong (Triton 3.6)."""
    return "ieee" if dtype == torch.float32 or interpret else "tf32"
