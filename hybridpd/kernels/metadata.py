"""Per-step metadata the kernel ops share across layers, built once per step.

Owns `DecodeMeta` (the decode rows of a step: one new token each) and `PrefillMeta` (the
prefill/continuation rows: a varlen batch rebased to start at token 0), plus their builders.
Built by the model once per forward pass, outside the layer loop, so no layer recomputes the
token->sequence map or any kernel's chunk/split metadata. `extra` holds kernel-specific
metadata that an implementation's `prepare_*` hook (see `kernels/ops.py`) adds once per step.
Knows nothing of requests, the scheduler, the pool's byte layout or the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from hybridpd.kernels.varlen import token_coords

# a key of `extra`: a name, or (name, parameter) for metadata built per parameter value,
# e.g. ("ssd_chunks", chunk_size)
ExtraKey = str | tuple[str, int]


@dataclass(frozen=True)
class DecodeMeta:
    """The first `num_seqs` requests of a step, one new token each, all with a context."""

    seq_lens: Tensor  # (B,) int64 context + 1
    max_seq_len: int  # host upper bound of seq_lens (a graph's capture bound, not exact)
    num_splits: int  # split-KV partitions for decode attention (host int, fixed per graph)
    extra: dict[ExtraKey, Any] = field(default_factory=dict)

    @property
    def num_seqs(self) -> int:
        return int(self.seq_lens.shape[0])


@dataclass(frozen=True)
class PrefillMeta:
    """A varlen batch (prefills and continuing chunks), token 0 = its first token."""

    query_start_loc: Tensor  # (B+1,) int64, starts at 0
    seq_lens: Tensor  # (B,) int64 context + new tokens
    context_lens: Tensor  # (B,) int64 tokens already cached
    has_initial_state: Tensor  # (B,) bool
    token_seq: Tensor  # (T,) int64 sequence of each token
    token_pos: Tensor  # (T,) int64 position of each token inside its new tokens
    max_query_len: int  # host int: longest new-token run
    max_seq_len: int  # host int: longest context + new tokens
    query_start_loc_host: tuple[int, ...] | None = None  # host copy when the caller has one
    extra: dict[ExtraKey, Any] = field(default_factory=dict)

    @property
    def num_seqs(self) -> int:
        return int(self.seq_lens.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.token_seq.shape[0])


DEFAULT_SPLIT_TOKENS = 512  # decode attention: one split per this many cached tokens


def decode_splits(max_seq_len: int, split_tokens: int = DEFAULT_SPLIT_TOKENS,
                  max_splits: int = 64) -> int:
    """Split-KV partitions for a decode step whose longest sequence is `max_seq_len`."""
    return max(1, min(max_splits, -(-max(max_seq_len, 1) // split_tokens)))


def build_decode_meta(seq_lens: Tensor, max_seq_len: int) -> DecodeMeta:
    """Decode metadata for rows with `seq_lens` (B,), longest at most `max_seq_len`."""
    return DecodeMeta(seq_lens=seq_lens, max_seq_len=max_seq_len,
                      num_splits=decode_splits(max_seq_len))


def build_prefill_meta(query_start_loc: Tensor, seq_lens: Tensor, context_lens: Tensor,
                       has_initial_state: Tensor, max_query_len: int, max_seq_len: int,
                       num_tokens: int,
                       query_start_loc_host: tuple[int, ...] | None = None) -> PrefillMeta:
    """Prefill metadata; `query_start_loc` (B+1,) may start anywhere (it is rebased to 0)."""
    qsl = query_start_loc - query_start_loc[:1]
    if query_start_loc_host is not None and query_start_loc_host:
        base = query_start_loc_host[0]
        query_start_loc_host = tuple(v - base for v in query_start_loc_host)
    seq, pos = token_coords(qsl, num_tokens)
    return PrefillMeta(
        query_start_loc=qsl, seq_lens=seq_lens, context_lens=context_lens,
        has_initial_state=has_initial_state, token_seq=seq, token_pos=pos,
        max_query_len=max_query_len, max_seq_len=max_seq_len,
        query_start_loc_host=query_start_loc_host,
    )

