"""The Nemotron-H mixture of experts (`E` layers): sigmoid router, ReLU² experts, shared expert.

Owns: grouped top-k routing exactly as transformers' NemotronHTopkRouter (fp32 sigmoid scores,
correction bias for selection only, weights from the un-biased scores, norm_topk_prob,
routed_scaling_factor), the routed experts (on CUDA: device-side grouping and two
`torch.nn.functional.grouped_mm` calls, no host sync, so a decode step can be captured in a CUDA
graph; decode-sized batches on CUDA: Triton GEMVs over the touched experts; on CPU: the
reference loop over experts, never over requests), the shared expert and TP
sharding (each expert's intermediate dim split column/row; one all-reduce per layer).
Must not know: the cache, batches, requests.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from hybridpd.config import ModelConfig
from hybridpd.model.checkpoint import CheckpointReader
from hybridpd.model.mlp import ReLU2MLP, relu2
from hybridpd.model.parallel import TPGroup, split_evenly

_HAS_GROUPED_MM = hasattr(F, "grouped_mm")  # torch >= 2.10
# up to this many (token, expert) assignments the routed experts run as Triton GEMVs over the
# touched experts' rows (kernels/triton_moe.py); above it, the grouped GEMM (measured on an H200:
# docs/benchmarks.md)
GEMV_MAX_ASSIGNMENTS = 48


class TopkRouter(nn.Module):
    def __init__(self, cfg: ModelConfig, device: torch.device) -> None:
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.num_experts = cfg.n_routed_experts
        self.n_group = cfg.n_group
        self.topk_group = cfg.topk_group
        self.norm_topk_prob = cfg.norm_topk_prob
        self.scaling = cfg.routed_scaling_factor
        e, h = cfg.n_routed_experts, cfg.hidden_size
        self.weight = nn.Parameter(torch.empty(e, h, dtype=torch.float32, device=device),
                                   requires_grad=False)  # (E, hidden) fp32
        self.e_score_correction_bias = nn.Parameter(
            torch.empty(e, dtype=torch.float32, device=device), requires_grad=False)  # (E,)

    def weight_names(self, prefix: str) -> list[str]:
        return [f"{prefix}.weight", f"{prefix}.e_score_correction_bias"]

    def load(self, reader: CheckpointReader, prefix: str) -> None:
        self.weight.copy_(reader.read(f"{prefix}.weight", dtype=torch.float32))
        self.e_score_correction_bias.copy_(
            reader.read(f"{prefix}.e_score_correction_bias", dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(T, hidden) -> (weights (T, k) fp32, expert ids (T, k) int64)."""
        logits = F.linear(x.float(), self.weight)  # (T, E)
        if not logits.is_cuda or self.n_group != 1:
            return self.select(logits)
        from hybridpd.kernels.triton_moe import route_topk

        return route_topk(logits, self.e_score_correction_bias, self.top_k,  # one launch
                          self.norm_topk_prob, self.scaling)

    def select(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference selection from the linear's logits (T, E): (weights, ids) (T, k)."""
        scores = logits.sigmoid()  # (T, E)
        choice = scores + self.e_score_correction_bias
        if self.n_group > 1:  # group-limited routing; one group selects every expert
            choice = self._mask_groups(choice)
        topk_idx = torch.topk(choice, k=self.top_k, dim=-1, sorted=False)[1]  # (T, k)
        weights = scores.gather(1, topk_idx)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.scaling, topk_idx

    def _mask_groups(self, choice: torch.Tensor) -> torch.Tensor:
        """-inf outside the top `topk_group` groups (by each group's two best scores)."""
        per_group = self.num_experts // self.n_group
        group_scores = choice.view(-1, self.n_group, per_group).topk(2, dim=-1)[0].sum(-1)
        group_idx = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)  # (T, n_group)
        score_mask = group_mask.unsqueeze(-1).expand(-1, self.n_group, per_group)
        return choice.masked_fill(~score_mask.reshape(-1, self.num_experts).bool(), -torch.inf)


class RoutedExperts(nn.Module):
    """All experts of one layer, stacked; this rank holds each expert's intermediate slice."""

    def __init__(self, cfg: ModelConfig, tp: TPGroup, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__()
        self.num_experts = cfg.n_routed_experts
        self.inter = split_evenly(cfg.moe_intermediate_size, tp, "moe_intermediate_size")
        e, h, i = cfg.n_routed_experts, cfg.hidden_size, self.inter.size
        self.up = nn.Parameter(torch.empty(e, i, h, dtype=dtype, device=device),
                               requires_grad=False)  # (E, I_local, hidden)
        self.down = nn.Parameter(torch.empty(e, h, i, dtype=dtype, device=device),
                                 requires_grad=False)  # (E, hidden, I_local)

    def weight_names(self, prefix: str) -> list[str]:
        return [f"{prefix}.{j}.{p}.weight" for j in range(self.num_experts)
                for p in ("up_proj", "down_proj")]

    def load(self, reader: CheckpointReader, prefix: str) -> None:
        for j in range(self.num_experts):
            self.up[j].copy_(reader.read(f"{prefix}.{j}.up_proj.weight", 0, self.inter.ranges))
            self.down[j].copy_(reader.read(f"{prefix}.{j}.down_proj.weight", 1, self.inter.ranges))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                add: torch.Tensor) -> torch.Tensor:
        """(T, hidden), (T, k), (T, k), add (T, hidden) -> this rank's routed partial, summed
        in fp32, cast to x's dtype, plus `add` (the shared expert's partial) in x's dtype. The
        decode-sized GEMV path does the cast and the add in its last kernel."""
        if self.grouped_on(x.device, x.dtype):
            if ids.numel() <= GEMV_MAX_ASSIGNMENTS:  # decode-sized: the Triton GEMV path
                from hybridpd.kernels.triton_moe import moe_experts_gemv

                return moe_experts_gemv(x, self.up, self.down, weights, ids, out_dtype=x.dtype,
                                        add=add)
            return self.forward_grouped(x, weights, ids).to(x.dtype) + add
        return self.forward_loop(x, weights, ids).to(x.dtype) + add

    @staticmethod
    def grouped_on(device: torch.device, dtype: torch.dtype) -> bool:
        """Whether the sync-free grouped path runs here (CUDA grouped_mm wants bf16)."""
        return _HAS_GROUPED_MM and device.type == "cuda" and dtype == torch.bfloat16

    def forward_grouped(self, x: torch.Tensor, weights: torch.Tensor,
                        ids: torch.Tensor) -> torch.Tensor:
        """Assignments sorted by expert on the device; one grouped GEMM per projection over
        per-expert row ranges (`offs`); no host sync, so it captures in a CUDA graph."""
        k = ids.shape[1]
        flat = ids.reshape(-1)  # (T*k,)
        order = flat.argsort(stable=True)  # (T*k,) assignments grouped by expert
        tokens = order // k  # (T*k,) token of each sorted assignment
        sorted_w = weights.reshape(-1)[order]  # (T*k,)
        counts = torch.zeros(self.num_experts, dtype=torch.int64, device=x.device)
        counts.index_add_(0, flat, torch.ones_like(flat))  # (E,); bincount would sync on CUDA
        offs = torch.cumsum(counts, 0).to(torch.int32)  # (E,) end row of each expert
        xs = x[tokens]  # (T*k, hidden)
        h = relu2(F.grouped_mm(xs, self.up.transpose(1, 2), offs=offs))  # (T*k, I_local)
        h = F.grouped_mm(h, self.down.transpose(1, 2), offs=offs)  # (T*k, hidden)
        out = torch.zeros(x.shape, dtype=weights.dtype, device=x.device)  # (T, hidden) fp32
        return out.index_add_(0, tokens, h.to(out.dtype) * sorted_w[:, None])

    def forward_loop(self, x: torch.Tensor, weights: torch.Tensor,
                     ids: torch.Tensor) -> torch.Tensor:
        """The reference: a loop over experts; one host sync (the per-expert counts)."""
        k = ids.shape[1]
        order = ids.reshape(-1).argsort(stable=True)  # (T*k,) assignments grouped by expert
        tokens = order // k  # (T*k,) token of each sorted assignment
        sorted_w = weights.reshape(-1)[order]  # (T*k,)
        counts = torch.bincount(ids.reshape(-1), minlength=self.num_experts).tolist()
        out = torch.zeros(x.shape, dtype=weights.dtype, device=x.device)  # (T, hidden) fp32
        start = 0
        for e, n in enumerate(counts):
            if n:
                idx = tokens[start:start + n]
                h = F.linear(relu2(F.linear(x[idx], self.up[e])), self.down[e])  # (n, hidden)
                out.index_add_(0, idx, (h * sorted_w[start:start + n, None]).to(out.dtype))
                start += n
        return out


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPGroup, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__()
        self.tp = tp
        self.gate = TopkRouter(cfg, device)
        self.experts = RoutedExperts(cfg, tp, dtype, device)
        self.shared_experts = ReLU2MLP(cfg.hidden_size, cfg.moe_shared_expert_intermediate_size,
                                       cfg.mlp_bias, tp, dtype, device)

    def weight_names(self, prefix: str) -> list[str]:
        return (self.gate.weight_names(f"{prefix}.gate")
                + self.experts.weight_names(f"{prefix}.experts")
                + self.shared_experts.weight_names(f"{prefix}.shared_experts"))

    def load(self, reader: CheckpointReader, prefix: str) -> None:
        self.gate.load(reader, f"{prefix}.gate")
        self.experts.load(reader, f"{prefix}.experts")
        self.shared_experts.load(reader, f"{prefix}.shared_experts")

    def forward(self, x: torch.Tensor,
                act: Callable[[torch.Tensor], torch.Tensor] = relu2) -> torch.Tensor:
        """(T, hidden) -> (T, hidden); `act`: the shared expert's relu² (see ReLU2MLP)."""
        weights, ids = self.gate(x)
        shared = self.shared_experts(x, reduce=False, act=act)  # this rank's partial
        return self.tp.all_reduce(self.experts(x, weights, ids, add=shared))
