"""The kernel seam: which implementation of each compute op a device uses, chosen once.

Owns `KernelOps` (one callable per op, with the op signatures below), `KernelImpl` and
`kernel_ops(device, impl)`, which resolves and caches the table once per (device type, impl).
CPU always gets the pure-torch `*_ref` ops. CUDA gets the Triton kernels registered in
`CUDA_KERNELS` (imported lazily, only when a CUDA table is first asked for, so nothing
GPU-only is imported on CPU) and the reference op for anything not registered or whose module
does not import. `HYBRIDPD_KERNELS=reference` forces the references everywhere.

Op signatures (stable; kernels register under these names):
  write_kv(k, v, kv_cache, slot_mapping) -> None
  decode_attention(q (B,Hq,D), kv_cache, block_table (B,W), scale, meta: DecodeMeta) -> (B,Hq,D)
  prefill_attention(q (T,Hq,D), kv_cache, block_table (B,W), scale, meta: PrefillMeta)
      -> (T,Hq,D)
  conv1d_update(x (B,C), weight (C,K), bias, conv_states, state_ids (B,)) -> (B,C)
  conv1d_prefill(x (T,C), weight, bias, conv_states, state_ids (B,), meta: PrefillMeta) -> (T,C)
  ssd_decode(x (B,H,P), dt_raw (B,H), A, B (B,G,N), C, D, dt_bias, ssm_states, state_ids)
      -> (B,H,P)
  ssd_prefill(x (T,H,P), dt_raw, A, B, C, D, dt_bias, ssm_states, state_ids,
              meta: PrefillMeta, chunk_size) -> (T,H,P)
  gated_rmsnorm(y (T,d), z (T,d), weight (d,), group_size, eps) -> (T,d) in y's dtype
  rmsnorm(x (T,H), weight (H,), eps) -> (T,H) in x's dtype
  add_rmsnorm(x (T,H), delta (T,H) | None, weight, eps) -> (rmsnorm(x + delta), x + delta)
  relu2(x) -> relu(x)² in x's dtype and shape
  prepare_decode(meta: DecodeMeta) -> DecodeMeta    (once per step; may fill meta.extra)
  prepare_prefill(meta: PrefillMeta) -> PrefillMeta (once per step; may fill meta.extra)

Knows nothing of the model, requests or the pool's byte layout.
"""

from __future__ import annotations

import enum
import importlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from hybridpd.kernels.attention import (
    paged_attention_ref,
    paged_decode_attention_ref,
    write_kv_ref,
)
from hybridpd.kernels.conv1d import causal_conv1d_prefill_ref, causal_conv1d_update_ref
from hybridpd.kernels.metadata import DecodeMeta, PrefillMeta
from hybridpd.kernels.ssd import ssd_decode_ref, ssd_prefill_ref

log = logging.getLogger(__name__)

ENV_VAR = "HYBRIDPD_KERNELS"


class KernelImpl(str, enum.Enum):
    AUTO = "auto"  # the device's best: Triton kernels on CUDA, references on CPU
    REFERENCE = "reference"  # the pure-torch *_ref ops on every device


# op name -> "module:function" of its CUDA kernel. Each module is imported on first use of a
# CUDA table; one that fails to import leaves that op on its reference (logged once).
CUDA_KERNELS: dict[str, str] = {
    "decode_attention": "hybridpd.kernels.triton_decode:decode_attention",
    "conv1d_update": "hybridpd.kernels.triton_decode:conv1d_update",
    "ssd_decode": "hybridpd.kernels.triton_decode:ssd_decode",
    "rmsnorm": "hybridpd.kernels.triton_norms:rmsnorm",
    "gated_rmsnorm": "hybridpd.kernels.triton_norms:gated_rmsnorm",
    "prefill_attention": "hybridpd.kernels.triton_prefill:prefill_attention",
    "conv1d_prefill": "hybridpd.kernels.triton_prefill:conv1d_prefill",
    "ssd_prefill": "hybridpd.kernels.triton_prefill:ssd_prefill",
    "write_kv": "hybridpd.kernels.triton_kv:write_kv_triton",
    "add_rmsnorm": "hybridpd.kernels.triton_norms:add_rmsnorm",
    "relu2": "hybridpd.kernels.triton_norms:relu2",
}


def _prefill_attention_ref(q: Tensor, kv_cache: Tensor, block_table: Tensor, scale: float,
                           meta: PrefillMeta) -> Tensor:
    return paged_attention_ref(q, kv_cache, block_table, meta.query_start_loc, meta.seq_lens,
                               scale, max_query_len=meta.max_query_len,
                               coords=(meta.token_seq, meta.token_pos))


def _decode_attention_ref(q: Tensor, kv_cache: Tensor, block_table: Tensor, scale: float,
                          meta: DecodeMeta) -> Tensor:
    return paged_decode_attention_ref(q, kv_cache, block_table, meta.seq_lens, scale)


def _conv1d_prefill_ref(x: Tensor, weight: Tensor, bias: Tensor | None, conv_states: Tensor,
                        state_ids: Tensor, meta: PrefillMeta) -> Tensor:
    return causal_conv1d_prefill_ref(x, weight, bias, conv_states, state_ids,
                                     meta.query_start_loc, meta.has_initial_state,
                                     coords=(meta.token_seq, meta.token_pos))


def _ssd_prefill_ref(x: Tensor, dt_raw: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor,
                     dt_bias: Tensor, ssm_states: Tensor, state_ids: Tensor,
                     meta: PrefillMeta, chunk_size: int) -> Tensor:
    return ssd_prefill_ref(x, dt_raw, A, B, C, D, dt_bias, ssm_states, state_ids,
                           meta.query_start_loc, meta.has_initial_state, chunk_size=chunk_size,
                           max_len=meta.max_query_len, coords=(meta.token_seq, meta.token_pos))


def gated_rmsnorm_ref(y: Tensor, z: Tensor, weight: Tensor, group_size: int,
                      eps: float) -> Tensor:
    """weight * groupnorm_rms(y * silu(z)) in fp32 (transformers' NemotronHRMSNormGated)."""
    h = y.float() * F.silu(z.float())  # (T, d)
    grouped = h.view(*h.shape[:-1], -1, group_size)  # (T, groups, group_size)
    grouped = grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + eps)
    return weight * grouped.view(h.shape).to(y.dtype)


def rmsnorm_ref(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """weight * x / rms(x) in fp32, cast back to x's dtype (transformers' NemotronHRMSNorm)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (weight.float() * h).to(x.dtype)


def add_rmsnorm_ref(x: Tensor, delta: Tensor | None, weight: Tensor,
                    eps: float) -> tuple[Tensor, Tensor]:
    """(rmsnorm(s), s) for the residual stream s = x + delta (x itself when delta is None):
    a block's residual add fused with the next block's norm."""
    total = x if delta is None else x + delta
    return rmsnorm_ref(total, weight, eps), total


def relu2_ref(x: Tensor) -> Tensor:
    """relu(x)², the Nemotron-H MLP activation."""
    return torch.relu(x).square()


def _identity(meta: Any) -> Any:
    return meta


@dataclass(frozen=True)
class KernelOps:
    """One implementation per op (see the module docstring for the signatures)."""

    name: str
    write_kv: Callable[..., None] = write_kv_ref
    decode_attention: Callable[..., Tensor] = _decode_attention_ref
    prefill_attention: Callable[..., Tensor] = _prefill_attention_ref
    conv1d_update: Callable[..., Tensor] = causal_conv1d_update_ref
    conv1d_prefill: Callable[..., Tensor] = _conv1d_prefill_ref
    ssd_decode: Callable[..., Tensor] = ssd_decode_ref
    ssd_prefill: Callable[..., Tensor] = _ssd_prefill_ref
    gated_rmsnorm: Callable[..., Tensor] = gated_rmsnorm_ref
    rmsnorm: Callable[..., Tensor] = rmsnorm_ref
    add_rmsnorm: Callable[..., tuple[Tensor, Tensor]] = add_rmsnorm_ref
    relu2: Callable[[Tensor], Tensor] = relu2_ref
    prepare_decode: Callable[[DecodeMeta], DecodeMeta] = _identity
    prepare_prefill: Callable[[PrefillMeta], PrefillMeta] = _identity

    def kernel_names(self) -> dict[str, str]:
        """op -> implementing function's qualified name (for logs and benchmarks)."""
        out = {}
        for f in fields(self):
            if f.name != "name":
                fn = getattr(self, f.name)
                out[f.name] = f"{fn.__module__}.{fn.__qualname__}"
        return out


OP_NAMES = tuple(f.name for f in fields(KernelOps) if f.name != "name")
REFERENCE_OPS = KernelOps(name="reference")
_cache: dict[tuple[str, KernelImpl], KernelOps] = {}


def _resolve(spec: str) -> Callable[..., Any]:
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)


def _cuda_ops() -> KernelOps:
    chosen: dict[str, Callable[..., Any]] = {}
    for op, spec in CUDA_KERNELS.items():
        if op not in OP_NAMES:
            raise ValueError(f"CUDA_KERNELS names unknown op {op!r}; ops are {OP_NAMES}")
        try:
            chosen[op] = _resolve(spec)
        except (ImportError, AttributeError) as exc:  # no triton, or an unfinished kernel
            log.warning("kernel %s unavailable (%s); using its reference", spec, exc)
    return replace(REFERENCE_OPS, name="triton" if chosen else "reference", **chosen)


def resolve_impl(impl: KernelImpl | str | None = None) -> KernelImpl:
    """`impl`, else $HYBRIDPD_KERNELS, else AUTO; ValueError naming the choices if unknown."""
    value = impl if impl is not None else os.environ.get(ENV_VAR, KernelImpl.AUTO.value)
    try:
        return KernelImpl(value)
    except ValueError:
        choices = ", ".join(k.value for k in KernelImpl)
        raise ValueError(f"unknown kernel implementation {value!r}; choose {choices}") from None


def kernel_ops(device: torch.device | str, impl: KernelImpl | str | None = None) -> KernelOps:
    """The op table for `device`, resolved once per (device type, impl) and cached."""
    dev_type = torch.device(device).type
    chosen = resolve_impl(impl)
    key = (dev_type, chosen)
    if key not in _cache:
        use_gpu = dev_type == "cuda" and chosen == KernelImpl.AUTO
        _cache[key] = _cuda_ops() if use_gpu else REFERENCE_OPS
    return _cache[key]
