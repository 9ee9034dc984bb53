"""The prefill ops in the kernel seam's signatures, on the Triton kernels.

Owns the thin adapters `prefill_attention`, `conv1d_prefill` and `ssd_prefill` that the seam
(`kernels/ops.py`, `CUDA_KERNELS`) registers: each takes the step's `PrefillMeta` and calls the
launcher with the reference's contract. Per-step derived metadata — the SSD chunk list (per
chunk size) and has_initial_state as bytes — is built once per step, by the first layer that
needs it, and kept in `meta.extra`, so later layers reuse it. Knows nothing of the model,
requests or the pool's byte layout.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hybridpd.kernels.metadata import PrefillMeta
from hybridpd.kernels.triton_attention import paged_attention_triton
from hybridpd.kernels.triton_conv1d import causal_conv1d_prefill_triton
from hybridpd.kernels.triton_ssd import SsdChunks, ssd_chunk_metadata, ssd_prefill_triton


def prefill_attention(q: Tensor, kv_cache: Tensor, block_table: Tensor, scale: float,
                      meta: PrefillMeta) -> Tensor:
    """(T, Hq, D) causal paged attention of the prefill rows over their cached prefixes."""
    return paged_attention_triton(q, kv_cache, block_table, meta.query_start_loc,
                                  meta.seq_lens, scale, max_query_len=meta.max_query_len)


def has_init_bytes(meta: PrefillMeta) -> Tensor:
    """has_initial_state as uint8 (what the kernels read), converted once per step."""
    flags = meta.extra.get("has_init_u8")
    if flags is None:
        flags = meta.has_initial_state.to(torch.uint8)
        meta.extra["has_init_u8"] = flags
    return flags


def conv1d_prefill(x: Tensor, weight: Tensor, bias: Tensor | None, conv_states: Tensor,
                   state_ids: Tensor, meta: PrefillMeta) -> Tensor:
    """(T, C) causal conv1d + SiLU of the prefill rows; conv states updated in the pool."""
    return causal_conv1d_prefill_triton(x, weight, bias, conv_states, state_ids,
                                        meta.query_start_loc, has_init_bytes(meta))


def ssd_chunks(meta: PrefillMeta, num_tokens: int, chunk_size: int) -> SsdChunks:
    """The step's SSD chunk list for `chunk_size`, built on first use and cached in meta.extra."""
    key = ("ssd_chunks", chunk_size)
    chunks = meta.extra.get(key)
    if chunks is None:
        chunks = ssd_chunk_metadata(meta.query_start_loc, num_tokens, chunk_size)
        meta.extra[key] = chunks
    return chunks


def ssd_prefill(x: Tensor, dt_raw: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor,
                dt_bias: Tensor, ssm_states: Tensor, state_ids: Tensor, meta: PrefillMeta,
                chunk_size: int) -> Tensor:
    """(T, H, P) SSD scan of the prefill rows; final states written to their pool slots."""
    return ssd_prefill_triton(x, dt_raw, A, B, C, D, dt_bias, ssm_states, state_ids,
                              meta.query_start_loc, has_init_bytes(meta),
                              chunk_size=chunk_size,
                              chunks=ssd_chunks(meta, x.shape[0], chunk_size))
