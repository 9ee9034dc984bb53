"""Mamba2 SSD (state space duality) scan over varlen batches, with the SSM state in the pool.

Owns the pure-torch reference ops `ssd_prefill_ref` (chunked scan) and `ssd_decode_ref` (one
recurrence step). dt = softplus(dt_raw + dt_bias), no clamp; head h reads group h // (H // G)
of B and C; y = SSD(x, dt, A, B, C) + D * x, no z gating. Everything is computed in float32;
the state is written back in the pool view's dtype, in place. Must not know about requests,
the scheduler, the page pool's byte layout or the model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from hybridpd.kernels.varlen import token_coords


def _pad(flat: Tensor, seq: Tensor, pos: Tensor, num_seqs: int, length: int) -> Tensor:
    """Scatter (T, ...) rows into a zero (B, length, ...) float32 tensor."""
    padded = flat.new_zeros((num_seqs, length, *flat.shape[1:]), dtype=torch.float32)
    padded[seq, pos] = flat.float()
    return padded


def _per_head(groups: Tensor, num_heads: int) -> Tensor:
    """(..., G, N) -> (..., H, N): head h reads group h // (H // G)."""
    return groups.repeat_interleave(num_heads // groups.shape[-2], dim=-2)


def _segsum(a: Tensor) -> Tensor:
    """(..., Q) -> (..., Q, Q): out[i, j] = sum(a[j+1..i]) for j <= i, -inf above the diagonal.

    Built by a masked cumsum rather than a difference of cumsums, so it stays exact-ish for
    long chunks.
    """
    q = a.shape[-1]
    below = torch.tril(torch.ones(q, q, dtype=torch.bool, device=a.device), diagonal=-1)
    rep = a[..., None, :].expand(*a.shape, q).transpose(-1, -2)  # (..., Q, Q): rep[i, j] = a[i]
    sums = torch.cumsum(rep.masked_fill(~below, 0.0), dim=-2)  # sums[i, j] = a[j+1..i]
    on_or_below = torch.tril(torch.ones(q, q, dtype=torch.bool, device=a.device))
    return sums.masked_fill(~on_or_below, float("-inf"))


def _chunked_scan(x: Tensor, dt: Tensor, A: Tensor, Bh: Tensor, Ch: Tensor, init: Tensor,
                  chunk: int) -> tuple[Tensor, Tensor]:
    """SSD over padded sequences. x: (B, L, H, P); dt: (B, L, H), 0 at padding;
    Bh, Ch: (B, L, H, N); init: (B, H, P, N); L % chunk == 0. Returns y (B, L, H, P) without
    the D skip, and the final state (B, H, P, N)."""
    b, length, h, p = x.shape
    n = Bh.shape[-1]
    nc = length // chunk
    xc = (x * dt[..., None]).view(b, nc, chunk, h, p)  # (B, nc, Q, H, P) dt-weighted inputs
    Bc = Bh.view(b, nc, chunk, h, n)  # (B, nc, Q, H, N)
    Cc = Ch.view(b, nc, chunk, h, n)  # (B, nc, Q, H, N)
    dA = (dt * A).view(b, nc, chunk, h).permute(0, 3, 1, 2)  # (B, H, nc, Q)
    dA_cum = torch.cumsum(dA, dim=-1)  # (B, H, nc, Q)

    decay_in = torch.exp(_segsum(dA))  # (B, H, nc, Q, Q)
    y_diag = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", Cc, Bc, decay_in, xc)

    decay_to_end = torch.exp(dA_cum[..., -1:] - dA_cum)  # (B, H, nc, Q)
    chunk_states = torch.einsum("bclhn,bhcl,bclhp->bchpn", Bc, decay_to_end, xc)  # (B,nc,H,P,N)
    chunk_decay = torch.exp(dA_cum[..., -1])  # (B, H, nc)

    state = init
    entering = []  # state entering each chunk, nc x (B, H, P, N)
    for c in range(nc):
        entering.append(state)
        state = state * chunk_decay[:, :, c, None, None] + chunk_states[:, c]
    states_in = torch.stack(entering, dim=1)  # (B, nc, H, P, N)
    y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", Cc, states_in, torch.exp(dA_cum))
    return (y_diag + y_off).reshape(b, length, h, p), state


def ssd_prefill_ref(x: Tensor, dt_raw: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor,
                    dt_bias: Tensor, ssm_states: Tensor, state_ids: Tensor,
                    query_start_loc: Tensor, has_initial_state: Tensor,
                    chunk_size: int = 128, max_len: int | None = None,
                    coords: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Varlen SSD scan. x: (T, H, P); dt_raw: (T, H); A, D, dt_bias: (H,); B, C: (T, G, N);
    ssm_states: (num_blocks, H, P, N) pool view; state_ids, has_initial_state: (B,);
    query_start_loc: (B+1,). Returns y (T, H, P) in x's dtype; ssm_states[state_ids] gets
    each sequence's final state. `max_len` (longest sequence, a host int the caller knows)
    avoids a device->host sync; `coords` (token_coords, built once per step) avoids
    recomputing the token->sequence map."""
    num_tokens, num_heads, _ = x.shape
    num_seqs = state_ids.shape[0]
    seq, pos = coords if coords is not None else token_coords(query_start_loc, num_tokens)
    if max_len is None:
        max_len = int((query_start_loc[1:] - query_start_loc[:-1]).max().item()) if num_seqs else 0
    elif not num_seqs:
        max_len = 0
    chunk = max(1, min(chunk_size, max_len))
    length = -(-max_len // chunk) * chunk

    dt = F.softplus(dt_raw.float() + dt_bias.float())  # (T, H)
    stored = ssm_states[state_ids].float()  # (B, H, P, N)
    init = torch.where(has_initial_state.view(-1, 1, 1, 1), stored, torch.zeros_like(stored))
    y_pad, final = _chunked_scan(
        _pad(x, seq, pos, num_seqs, length),  # (B, L, H, P)
        _pad(dt, seq, pos, num_seqs, length),  # (B, L, H); padding keeps dt = 0
        A.float(),
        _pad(_per_head(B, num_heads), seq, pos, num_seqs, length),  # (B, L, H, N)
        _pad(_per_head(C, num_heads), seq, pos, num_seqs, length),  # (B, L, H, N)
        init,
        chunk,
    )
    ssm_states[state_ids] = final.to(ssm_states.dtype)
    y = y_pad[seq, pos] + D.float()[:, None] * x.float()  # (T, H, P)
    return y.to(x.dtype)


def ssd_decode_ref(x: Tensor, dt_raw: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor,
                   dt_bias: Tensor, ssm_states: Tensor, state_ids: Tensor) -> Tensor:
    """One recurrence step per sequence. x: (B, H, P); dt_raw: (B, H); B, C: (B, G, N).

    state <- state * exp(dt*A) + dt * outer(x, B); y = <state, C> + D*x. Returns (B, H, P)
    in x's dtype; ssm_states[state_ids] gets the new state in its own dtype.
    """
    num_heads = x.shape[1]
    dt = F.softplus(dt_raw.float() + dt_bias.float())  # (B, H)
    decay = torch.exp(dt * A.float())  # (B, H)
    Bh = _per_head(B.float(), num_heads)  # (B, H, N)
    Ch = _per_head(C.float(), num_heads)  # (B, H, N)
    xf = x.float()
    state = ssm_states[state_ids].float()  # (B, H, P, N)
    state = state * decay[..., None, None] + (dt[..., None] * xf)[..., None] * Bh[:, :, None, :]
    ssm_states[state_ids] = state.to(ssm_states.dtype)
    y = torch.einsum("bhpn,bhn->bhp", state, Ch) + D.float()[:, None] * xf  # (B, H, P)
    return y.to(x.dtype)
