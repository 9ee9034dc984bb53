"""Index helpers for varlen batches: flattened tokens of several sequences, `query_start_loc`.

Owns the mapping from a flattened token index to (sequence, position in its sequence), shared
by every kernel reference op. Must not know about requests, the pool or the model.
"""

from __future__ import annotations

import torch
from torch import Tensor


def token_coords(query_start_loc: Tensor, num_tokens: int) -> tuple[Tensor, Tensor]:
    """Sequence index and position inside the sequence of every flattened token.

    query_start_loc: (B+1,) cumulative token starts. Returns seq (T,) and pos (T,), with token
    t = query_start_loc[seq[t]] + pos[t].
    """
    tokens = torch.arange(num_tokens, device=query_start_loc.device)  # (T,)
    seq = torch.searchsorted(query_start_loc[1:].contiguous(), tokens, right=True)  # (T,)
    return seq, tokens - query_start_loc[seq]
