"""The Nemotron-H Mamba2 mixer (`M` layers) over the paged conv/SSM state.

Owns: in_proj -> [z | xBC | dt], the causal conv1d + SiLU and the SSD scan through the kernel
seam (decode requests through the *_update/decode ops, the rest through the prefill ops, one call
each per layer), the grouped gated RMSNorm and out_proj; TP sharding of every Mamba tensor
(heads for z/x/dt/A/D/dt_bias/norm/out_proj, groups for B/C; local conv channels
[x_local | B_local | C_local], the cache's DS conv order). Must not know: requests, the
allocator, page byte layout.
"""

from __future__ import annotations

import torch
from torch import nn

from hybridpd.config import ModelConfig
from hybridpd.kernels.metadata import PrefillMeta
from hybridpd.kernels.ops import KernelOps
from hybridpd.model.checkpoint import CheckpointReader
from hybridpd.model.forward_batch import CacheViews, ForwardBatch, StepMeta
from hybridpd.model.norms import GatedRMSNorm
from hybridpd.model.parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    Shard,
    TPGroup,
    linear_names,
    read_vector,
    split_evenly,
)


class MambaShards:
    """Which rows/channels of each Mamba tensor one rank holds."""

    def __init__(self, cfg: ModelConfig, tp: TPGroup) -> None:
        heads = split_evenly(cfg.mamba_num_heads, tp, "mamba_num_heads")
        groups = split_evenly(cfg.n_groups, tp, "n_groups")
        d_inner, bc = cfg.d_inner, cfg.bc_dim
        self.heads = heads
        self.inner = heads.scaled(cfg.mamba_head_dim)  # within d_inner
        self.bc = groups.scaled(cfg.ssm_state_size)  # within n_groups * N
        # conv channels: [x | B | C] of the full conv_dim
        self.conv = Shard.concat(self.inner, self.bc.offset(d_inner), self.bc.offset(d_inner + bc))
        # in_proj rows: [z | x | B | C | dt]
        self.in_proj = Shard.concat(self.inner, self.conv.offset(d_inner),
                                    heads.offset(d_inner + cfg.conv_dim))


class Mamba2Mixer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, tp: TPGroup, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.chunk_size = cfg.chunk_size
        self.head_dim = cfg.mamba_head_dim
        self.state_size = cfg.ssm_state_size
        self.proj_bias = cfg.mamba_proj_bias
        self.conv_bias = cfg.use_conv_bias
        sh = MambaShards(cfg, tp)
        self.shards = sh
        self.num_heads = sh.heads.size
        self.d_inner = sh.inner.size
        self.bc_dim = sh.bc.size
        self.n_groups = self.bc_dim // cfg.ssm_state_size
        h = cfg.hidden_size
        self.in_proj = ColumnParallelLinear(h, sh.in_proj, self.proj_bias, dtype, device)
        conv_local = sh.conv.size
        self.conv_dim = conv_local
        self.conv_weight = nn.Parameter(
            torch.empty(conv_local, cfg.conv_kernel, dtype=dtype, device=device),
            requires_grad=False)  # (conv_dim_local, K)
        self.conv_bias_t = (
            nn.Parameter(torch.empty(conv_local, dtype=dtype, device=device), requires_grad=False)
            if self.conv_bias else None)
        f32 = torch.float32
        self.A_log = nn.Parameter(torch.empty(self.num_heads, dtype=f32, device=device),
                                  requires_grad=False)  # (H_local,)
        self._a_cache: tuple[int, torch.Tensor] | None = None  # (A_log version, -exp(A_log))
        self.D = nn.Parameter(torch.empty(self.num_heads, dtype=f32, device=device),
                              requires_grad=False)
        self.dt_bias = nn.Parameter(torch.empty(self.num_heads, dtype=f32, device=device),
                                    requires_grad=False)
        self.norm = GatedRMSNorm(sh.inner, cfg.d_inner // cfg.n_groups, cfg.layer_norm_epsilon,
                                 dtype, device)
        self.out_proj = RowParallelLinear(sh.inner, h, self.proj_bias, tp, dtype, device)

    def weight_names(self, prefix: str) -> list[str]:
        names = linear_names(f"{prefix}.in_proj", self.proj_bias)
        names += linear_names(f"{prefix}.conv1d", self.conv_bias)
        names += [f"{prefix}.{n}" for n in ("A_log", "D", "dt_bias", "norm.weight")]
        return names + linear_names(f"{prefix}.out_proj", self.proj_bias)

    def load(self, reader: CheckpointReader, prefix: str) -> None:
        self.in_proj.load(reader, f"{prefix}.in_proj")
        conv = reader.read(f"{prefix}.conv1d.weight", 0, self.shards.conv.ranges)  # (C, 1, K)
        self.conv_weight.copy_(conv.reshape(self.conv_weight.shape))
        if self.conv_bias_t is not None:
            self.conv_bias_t.copy_(read_vector(reader, f"{prefix}.conv1d.bias", self.shards.conv))
        for name in ("A_log", "D", "dt_bias"):
            getattr(self, name).copy_(
                read_vector(reader, f"{prefix}.{name}", self.shards.heads, torch.float32))
        self.norm.load(reader, f"{prefix}.norm")
        self.out_proj.load(reader, f"{prefix}.out_proj")

    def forward(self, x: torch.Tensor, batch: ForwardBatch, cache: CacheViews,
                meta: StepMeta) -> torch.Tensor:
        """(T, hidden) -> (T, hidden); advances each request's conv and SSM state in the pool."""
        z, xbc, dt = self.in_proj(x).split([self.d_inner, self.conv_dim, self.num_heads], dim=-1)
        state_ids = batch.mamba_state_ids[cache.group_index(self.layer_idx)]
        conv_states = cache.conv_view(self.layer_idx)  # (nb, conv_local, K-1)
        ssm_states = cache.ssm_view(self.layer_idx)  # (nb, H_local, P, N)
        ops, nd = meta.ops, batch.num_decodes  # decode requests own the first nd tokens
        parts = []
        if meta.decode is not None:
            parts.append(self._decode(ops, xbc[:nd], dt[:nd], state_ids[:nd], conv_states,
                                      ssm_states))
        if meta.prefill is not None:
            parts.append(self._prefill(ops, xbc[nd:], dt[nd:], state_ids[nd:], meta.prefill,
                                       conv_states, ssm_states))
        y = parts[0] if len(parts) == 1 else torch.cat(parts)  # (T, H_local, P)
        norm = self.norm
        y = ops.gated_rmsnorm(y.reshape(x.shape[0], self.d_inner), z, norm.weight,
                              norm.group_size, norm.eps)
        return self.out_proj(y.to(x.dtype))

    def _split_xbc(self, xbc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        t = xbc.shape[0]
        xs, b, c = xbc.split([self.d_inner, self.bc_dim, self.bc_dim], dim=-1)
        return (xs.reshape(t, self.num_heads, self.head_dim),  # (T, H_local, P)
                b.reshape(t, self.n_groups, self.state_size),  # (T, G_local, N)
                c.reshape(t, self.n_groups, self.state_size))

    def _decode(self, ops: KernelOps, xbc: torch.Tensor, dt: torch.Tensor, ids: torch.Tensor,
                conv_states: torch.Tensor, ssm_states: torch.Tensor) -> torch.Tensor:
        xbc = ops.conv1d_update(xbc, self.conv_weight, self.conv_bias_t, conv_states, ids)
        xs, b, c = self._split_xbc(xbc)
        return ops.ssd_decode(xs, dt, self._A(), b, c, self.D, self.dt_bias, ssm_states, ids)

    def _prefill(self, ops: KernelOps, xbc: torch.Tensor, dt: torch.Tensor, ids: torch.Tensor,
                 meta: PrefillMeta, conv_states: torch.Tensor,
                 ssm_states: torch.Tensor) -> torch.Tensor:
        xbc = ops.conv1d_prefill(xbc, self.conv_weight, self.conv_bias_t, conv_states, ids, meta)
        xs, b, c = self._split_xbc(xbc)
        return ops.ssd_prefill(xs, dt, self._A(), b, c, self.D, self.dt_bias, ssm_states, ids,
                               meta, self.chunk_size)

    def _A(self) -> torch.Tensor:
        """-exp(A_log) (H_local,) fp32, computed once per value of A_log (its version counter
        moves on every in-place write: a load, a re-init), not in every step."""
        version = self.A_log._version
        if self._a_cache is None or self._a_cache[0] != version:
            self._a_cache = (version, -torch.exp(self.A_log))
        return self._a_cache[1]
