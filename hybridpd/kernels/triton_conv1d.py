"""Depthwise causal conv1d + SiLU for prefill as Triton kernels, beside the reference.

Owns `causal_conv1d_prefill_triton`, with the signature of
`conv1d.causal_conv1d_prefill_ref`: a packed varlen batch x (T, C) (any row stride, e.g. a
column slice of in_proj's output), each sequence continuing from its DS-layout conv state
`(C, K-1)` (the last K-1 inputs, oldest first) in its pool slot where has_initial_state, and
zeros otherwise (pool garbage never read). Two launches: the output (each token finds its
sequence by a binary search over query_start_loc, so no host metadata), then each sequence's
last K-1 inputs written back to its slot in the pool's dtype — after every read of the old
state, so the in-place update cannot race. Knows nothing of requests, the scheduler, the pool's
byte layout or the model.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from hybridpd.kernels.triton_common import check_device, check_shape, interpreting, pow2


@triton.jit
def _conv_prefill_kernel(x_ptr, w_ptr, bias_ptr, states_ptr, state_ids_ptr, has_init_ptr,
                         qsl_ptr, out_ptr, num_tokens, channels, num_seqs,
                         stride_xt, stride_xc, stride_wc, stride_wk,
                         stride_sb, stride_sc, stride_sk, stride_ot, stride_oc,
                         WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, SEARCH_STEPS: tl.constexpr,
                         BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    t_mask = offs_t < num_tokens
    c_mask = offs_c < channels
    # sequence of each token: the last b with qsl[b] <= t (empty sequences are skipped)
    lo = tl.zeros([BLOCK_T], dtype=tl.int32)
    hi = tl.zeros([BLOCK_T], dtype=tl.int32) + (num_seqs - 1)
    for _ in tl.static_range(SEARCH_STEPS):
        mid = (lo + hi + 1) // 2
        below = tl.load(qsl_ptr + mid) <= offs_t
        lo = tl.where(below, mid, lo)
        hi = tl.where(below, hi, mid - 1)
    seq = lo
    pos = offs_t - tl.load(qsl_ptr + seq)  # position inside the sequence
    acc = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    tc_mask = t_mask[:, None] & c_mask[None, :]
    x_rows = x_ptr + offs_t.to(tl.int64)[:, None] * stride_xt + offs_c[None, :] * stride_xc
    if tl.min(tl.where(t_mask, pos, WIDTH)) >= WIDTH - 1:
        # every tap of every token in the tile is an input of this step: no state reads
        for k in tl.static_range(WIDTH):
            xv = tl.load(x_rows + (k - (WIDTH - 1)) * stride_xt, mask=tc_mask, other=0.0)
            w = tl.load(w_ptr + offs_c * stride_wc + k * stride_wk, mask=c_mask, other=0.0)
            acc += xv.to(tl.float32) * w.to(tl.float32)[None, :]
    else:  # a sequence starts in the tile: early taps read its conv state
        sid = tl.load(state_ids_ptr + seq, mask=t_mask, other=0).to(tl.int64)
        has_init = tl.load(has_init_ptr + seq, mask=t_mask, other=0) != 0
        for k in tl.static_range(WIDTH):
            src = pos - (WIDTH - 1) + k  # (BLOCK_T,) local position of this tap's input
            in_x = src >= 0
            xv = tl.load(x_rows + (k - (WIDTH - 1)) * stride_xt,
                         mask=tc_mask & in_x[:, None], other=0.0)
            sv = tl.load(states_ptr + sid[:, None] * stride_sb + offs_c[None, :] * stride_sc
                         + (WIDTH - 1 + src)[:, None] * stride_sk,
                         mask=tc_mask & ((~in_x) & has_init)[:, None], other=0.0)
            w = tl.load(w_ptr + offs_c * stride_wc + k * stride_wk, mask=c_mask, other=0.0)
            acc += (xv.to(tl.float32) + sv.to(tl.float32)) * w.to(tl.float32)[None, :]
    out = acc / (1.0 + tl.exp(-acc))  # silu
    tl.store(out_ptr + offs_t.to(tl.int64)[:, None] * stride_ot + offs_c[None, :] * stride_oc,
             out.to(out_ptr.dtype.element_ty), mask=tc_mask)


@triton.jit
def _conv_state_kernel(x_ptr, states_ptr, state_ids_ptr, has_init_ptr, qsl_ptr, channels,
                       stride_xt, stride_xc, stride_sb, stride_sc, stride_sk,
                       WIDTH: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr):
    b = tl.program_id(0)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_k = tl.arange(0, BLOCK_K)
    c_mask = offs_c < channels
    k_mask = offs_k < WIDTH - 1
    start = tl.load(qsl_ptr + b)
    length = tl.load(qsl_ptr + b + 1) - start
    sid = tl.load(state_ids_ptr + b).to(tl.int64)
    has_init = tl.load(has_init_ptr + b) != 0
    src = length - (WIDTH - 1) + offs_k  # (BLOCK_K,) local positions of the last K-1 inputs
    in_x = src >= 0
    ck_mask = c_mask[:, None] & k_mask[None, :]
    xv = tl.load(x_ptr + (start + src).to(tl.int64)[None, :] * stride_xt
                 + offs_c[:, None] * stride_xc, mask=ck_mask & in_x[None, :], other=0.0)
    slot = states_ptr + sid * stride_sb + offs_c[:, None] * stride_sc
    sv = tl.load(slot + (WIDTH - 1 + src)[None, :] * stride_sk,
                 mask=ck_mask & ((~in_x) & has_init)[None, :], other=0.0)
    new = xv.to(tl.float32) + sv.to(tl.float32)  # one of the two is zero
    tl.store(slot + offs_k[None, :] * stride_sk, new.to(states_ptr.dtype.element_ty),
             mask=ck_mask)


def causal_conv1d_prefill_triton(x: Tensor, weight: Tensor, bias: Tensor | None,
                                 conv_states: Tensor, state_ids: Tensor,
                                 query_start_loc: Tensor, has_initial_state: Tensor,
                                 config: tuple[int, int, int] | None = None) -> Tensor:
    """Same contract as `causal_conv1d_prefill_ref`: x (T, C), weight (C, K), bias (C,) or
    None, conv_states (num_blocks, C, K-1) pool view, state_ids/has_initial_state (B,),
    query_start_loc (B+1,) from 0 -> (T, C) in x's dtype; each slot gets its sequence's last
    K-1 inputs. `config` overrides (BLOCK_T, BLOCK_C, num_warps) of the output kernel."""
    op = "causal_conv1d_prefill_triton"
    if x.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"{op}: x must be (T, C) and weight (C, K); got {tuple(x.shape)}, "
                         f"{tuple(weight.shape)}")
    num_tokens, channels = x.shape
    width = weight.shape[1]
    num_seqs = state_ids.shape[0]
    check_shape(op, "weight", weight, (channels, width))
    if bias is not None:
        check_shape(op, "bias", bias, (channels,))
    check_shape(op, "conv_states", conv_states[:0], (0, channels, width - 1))
    check_shape(op, "query_start_loc", query_start_loc, (num_seqs + 1,))
    check_shape(op, "has_initial_state", has_initial_state, (num_seqs,))
    if width < 2:
        raise ValueError(f"{op}: kernel width must be >= 2, got {width}")
    tensors = [x, weight, conv_states, state_ids, query_start_loc, has_initial_state]
    check_device(op, *tensors, *([bias] if bias is not None else []))
    out = torch.empty((num_tokens, channels), dtype=x.dtype, device=x.device)
    if num_seqs == 0:
        return out
    has_init = has_initial_state.to(torch.uint8)  # no copy when already uint8
    block_c = 32 if interpreting() else 128
    if num_tokens:
        block_t, block_cx, warps = config or ((16, 32, 4) if interpreting() else (32, 128, 4))
        steps = max(1, (num_seqs - 1).bit_length() + 1)
        grid = (triton.cdiv(num_tokens, block_t), triton.cdiv(channels, block_cx))
        _conv_prefill_kernel[grid](
            x, weight, bias if bias is not None else weight, conv_states, state_ids, has_init,
            query_start_loc, out, num_tokens, channels, num_seqs, *x.stride(),
            *weight.stride(), *conv_states.stride(), *out.stride(),
            WIDTH=width, HAS_BIAS=bias is not None, SEARCH_STEPS=steps, BLOCK_T=block_t,
            BLOCK_C=block_cx, num_warps=warps)
    _conv_state_kernel[(num_seqs, triton.cdiv(channels, block_c))](
        x, conv_states, state_ids, has_init, query_start_loc, channels, *x.stride(),
        *conv_states.stride(), WIDTH=width, BLOCK_K=pow2(width - 1, minimum=2),
        BLOCK_C=block_c, num_warps=4)
    return out
