"""Per-step batch metadata handed from the runner to the model (frozen).

Owns the `ForwardBatch` record, the `CacheViews` protocol the model reads the pool through, and
`StepMeta` (the kernel metadata of one step, built from a batch once per forward pass, outside
the layer loop, by `build_step_meta`). Knows nothing of requests or the scheduler: only index
tensors. Built once per step by `engine/runner.py`; every tensor already lives on the model's
device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from hybridpd.kernels.metadata import (
    DecodeMeta,
    PrefillMeta,
    build_decode_meta,
    build_prefill_meta,
)
from hybridpd.kernels.ops import KernelOps


@dataclass(frozen=True)
class ForwardBatch:
    input_ids: torch.Tensor  # (T,) int64, decode requests first, then prefill chunks
    positions: torch.Tensor  # (T,) int64 absolute positions (NoPE models ignore them)
    query_start_loc: torch.Tensor  # (B+1,) int64 cumulative new-token offsets
    context_lens: torch.Tensor  # (B,) int64 tokens already in the cache before this step
    seq_lens: torch.Tensor  # (B,) int64 context + new tokens
    has_initial_state: torch.Tensor  # (B,) bool, context_lens > 0
    logits_indices: torch.Tensor  # (B,) int64 row in T of each request's last new token
    attn_block_tables: tuple[torch.Tensor, ...]  # per attention group: (B, max_blocks) int64
    attn_slot_mappings: tuple[torch.Tensor, ...]  # per attention group: (T,) int64
    mamba_state_ids: tuple[torch.Tensor, ...]  # per Mamba group: (B,) int64 state block ids
    num_decodes: int  # the first num_decodes requests have exactly 1 new token and a context
    max_query_len: int  # host ints, so layers never sync to learn shapes
    max_seq_len: int
    query_start_loc_host: tuple[int, ...] | None = None  # (B+1,) host copy, when the caller has it

    @property
    def num_reqs(self) -> int:
        return int(self.context_lens.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])


class CacheViews(Protocol):
    """The page pool as the model sees it (implemented by `cache.tensors.PoolTensors`)."""

    def kv_view(self, layer_idx: int) -> torch.Tensor:
        """(num_blocks, Hkv_local, 2, block_tokens, head_dim)"""

    def conv_view(self, layer_idx: int) -> torch.Tensor:
        """(num_blocks, conv_dim_local, K-1)"""

    def ssm_view(self, layer_idx: int) -> torch.Tensor:
        """(num_blocks, H_local, P, N)"""

    def group_index(self, layer_idx: int) -> int:
        """Index of the layer's group among the groups of its kind."""


@dataclass(frozen=True)
class StepMeta:
    """What every layer of one step shares: the op table and the decode/prefill metadata."""

    ops: KernelOps
    decode: DecodeMeta | None  # rows [0, num_decodes)
    prefill: PrefillMeta | None  # rows [num_decodes, B), tokens [num_decodes, T)


def build_step_meta(batch: ForwardBatch, ops: KernelOps) -> StepMeta:
    """Split the batch into its decode and prefill parts and build each part's metadata once."""
    nd = batch.num_decodes
    decode = prefill = None
    if nd > 0:
        decode = ops.prepare_decode(build_decode_meta(batch.seq_lens[:nd], batch.max_seq_len))
    if nd < batch.num_reqs:
        host = batch.query_start_loc_host
        prefill = ops.prepare_prefill(build_prefill_meta(
            batch.query_start_loc[nd:], batch.seq_lens[nd:], batch.context_lens[nd:],
            batch.has_initial_state[nd:], batch.max_query_len, batch.max_seq_len,
            batch.num_tokens - nd, None if host is None else tuple(host[nd:])))
    return StepMeta(ops, decode, prefill)
