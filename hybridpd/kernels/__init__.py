"""Compute ops the model layers call: pure-torch `*_ref` references (any device) and, behind
the seam in `kernels/ops.py`, Triton kernels on CUDA (imported lazily, never on CPU).

Owns the op signatures. Knows nothing of requests, the scheduler, the page pool's byte layout
or the model.
"""

from hybridpd.kernels.attention import (
    paged_attention_ref,
    paged_decode_attention_ref,
    write_kv_ref,
)
from hybridpd.kernels.conv1d import causal_conv1d_prefill_ref, causal_conv1d_update_ref
from hybridpd.kernels.ssd import ssd_decode_ref, ssd_prefill_ref

__all__ = [
    "causal_conv1d_prefill_ref",
    "causal_conv1d_update_ref",
    "paged_attention_ref",
    "paged_decode_attention_ref",
    "ssd_decode_ref",
    "ssd_prefill_ref",
    "write_kv_ref",
]
