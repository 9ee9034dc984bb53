"""Per-step batch metadata handed from the runner to the model (frozen).

Owns the `ForwardBatch` record and the `CacheViews` protocol the model reads the pool through.
Knows nothing of requests or the scheduler: only index tensors. Built once per step by
`engine/runner.py`; every tensor already lives on the model's device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


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
