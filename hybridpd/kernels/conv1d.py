"""Depthwise causal conv1d + SiLU over varlen batches, with the conv state kept in the pool.

Owns the pure-torch reference ops `causal_conv1d_prefill_ref` and `causal_conv1d_update_ref`.
The conv state uses the DS layout `(C, K-1)`: the last K-1 *inputs* of a sequence, oldest
first. Pool views are strided views over a byte buffer: they are read with and written through
advanced indexing, in place, in their own dtype. Must not know about requests, the scheduler,
the page pool's byte layout or the model: only tensors and index tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from hybridpd.kernels.varlen import token_coords


def _initial_states(conv_states: Tensor, state_ids: Tensor, has_initial_state: Tensor) -> Tensor:
    """(B, C, K-1) float32 initial states; zeros where there is none (pool garbage ignored)."""
    stored = conv_states[state_ids].float()  # (B, C, K-1)
    return torch.where(has_initial_state.view(-1, 1, 1), stored, torch.zeros_like(stored))


def _source_rows(seq: Tensor, pos: Tensor, query_start_loc: Tensor, num_tokens: int,
                 width: int) -> Tensor:
    """Rows of `[x; init]` that hold local positions `pos` (any shape, may be negative).

    Position p >= 0 of sequence b is token `query_start_loc[b] + p`; position p in [-(K-1), 0)
    is column `K-1+p` of b's initial state, stored after the T tokens as row
    `T + b*(K-1) + (K-1+p)`.
    """
    from_x = query_start_loc[seq] + pos
    from_init = num_tokens + seq * (width - 1) + (width - 1 + pos)
    return torch.where(pos >= 0, from_x, from_init)


def causal_conv1d_prefill_ref(x: Tensor, weight: Tensor, bias: Tensor | None,
                              conv_states: Tensor, state_ids: Tensor, query_start_loc: Tensor,
                              has_initial_state: Tensor,
                              coords: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """silu(causal_conv(x) + bias) of every sequence; stores each sequence's last K-1 inputs.

    x: (T, C); weight: (C, K); conv_states: (num_blocks, C, K-1) pool view; state_ids,
    has_initial_state: (B,); query_start_loc: (B+1,). Returns (T, C) in x's dtype.
    `coords`: token_coords(query_start_loc, T) when the caller built them once per step.
    """
    num_tokens, channels = x.shape
    width = weight.shape[1]
    num_seqs = state_ids.shape[0]
    init = _initial_states(conv_states, state_ids, has_initial_state)  # (B, C, K-1)
    init_rows = init.transpose(1, 2).reshape(num_seqs * (width - 1), channels)  # (B*(K-1), C)
    source = torch.cat([x.float(), init_rows], dim=0)  # (T + B*(K-1), C)

    seq, pos = coords if coords is not None else token_coords(query_start_loc, num_tokens)
    taps = torch.arange(width, device=x.device) - (width - 1)  # (K,) offsets -(K-1)..0
    rows = _source_rows(seq[:, None], pos[:, None] + taps, query_start_loc, num_tokens, width)
    windows = source[rows]  # (T, K, C)
    out = torch.einsum("tkc,ck->tc", windows, weight.float())  # (T, C)
    if bias is not None:
        out = out + bias.float()

    seq_ids = torch.arange(num_seqs, device=x.device)  # (B,)
    lens = query_start_loc[1:] - query_start_loc[:-1]  # (B,)
    tail = lens[:, None] + taps[:-1]  # (B, K-1) positions of the last K-1 inputs
    tail_rows = _source_rows(seq_ids[:, None], tail, query_start_loc, num_tokens, width)
    new_states = source[tail_rows].transpose(1, 2)  # (B, C, K-1)
    conv_states[state_ids] = new_states.to(conv_states.dtype)
    return F.silu(out).to(x.dtype)


def causal_conv1d_update_ref(x: Tensor, weight: Tensor, bias: Tensor | None,
                             conv_states: Tensor, state_ids: Tensor) -> Tensor:
    """One decode step: x (B, C) is each sequence's new input; the state shifts by one.

    Returns (B, C) silu(conv + bias) in x's dtype; conv_states[state_ids] gets the last K-1
    inputs (the old state minus its oldest column, plus x).
    """
    window = torch.cat([conv_states[state_ids].float(), x.float()[:, :, None]], dim=2)  # (B,C,K)
    out = (window * weight.float()).sum(dim=2)  # (B, C)
    if bias is not None:
        out = out + bias.float()
    conv_states[state_ids] = window[:, :, 1:].to(conv_states.dtype)
    return F.silu(out).to(x.dtype)
