"""The Nemotron-H causal LM: embeddings, pre-norm residual blocks of four kinds, final norm,
LM head at the requested rows only.

Owns: building the layer stack from `ModelConfig.layer_kinds`, the checkpoint names of the whole
model (`backbone.` prefix, `lm_head`), `load_weights` (all missing names reported at once) and
`forward(batch, cache) -> logits`. Embeddings and LM head are replicated across TP ranks.
Must not know: requests, the scheduler, the pool's byte layout, NIXL.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from hybridpd.config import LayerKind, ModelConfig
from hybridpd.kernels.ops import KernelImpl, KernelOps, kernel_ops
from hybridpd.model.attention import Attention
from hybridpd.model.checkpoint import CheckpointReader
from hybridpd.model.forward_batch import CacheViews, ForwardBatch, StepMeta, build_step_meta
from hybridpd.model.mamba import Mamba2Mixer
from hybridpd.model.mlp import ReLU2MLP
from hybridpd.model.moe import MoE, RoutedExperts
from hybridpd.model.norms import RMSNorm
from hybridpd.model.parallel import SINGLE, TPGroup
from hybridpd.progress import Progress

PREFIX = "backbone"
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

Mixer = Mamba2Mixer | Attention | ReLU2MLP | MoE  # the four layer kinds


def build_mixer(cfg: ModelConfig, i: int, tp: TPGroup, dtype: torch.dtype,
                device: torch.device) -> Mixer:
    kind = cfg.layer_kinds[i]
    if kind == LayerKind.MAMBA:
        return Mamba2Mixer(cfg, i, tp, dtype, device)
    if kind == LayerKind.ATTENTION:
        return Attention(cfg, i, tp, dtype, device)
    if kind == LayerKind.MLP:
        return ReLU2MLP(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias, tp, dtype, device)
    return MoE(cfg, tp, dtype, device)


class Block(nn.Module):
    """x + mixer(norm(x))."""

    def __init__(self, cfg: ModelConfig, i: int, tp: TPGroup, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__()
        self.kind = cfg.layer_kinds[i]
        self.norm = RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon, dtype, device)
        self.mixer: Mixer = build_mixer(cfg, i, tp, dtype, device)

    def weight_names(self, prefix: str) -> list[str]:
        return [f"{prefix}.norm.weight"] + self.mixer.weight_names(f"{prefix}.mixer")

    def load(self, reader: CheckpointReader, prefix: str) -> None:
        self.norm.load(reader, f"{prefix}.norm")
        self.mixer.load(reader, f"{prefix}.mixer")

    def forward(self, x: torch.Tensor, delta: torch.Tensor | None, batch: ForwardBatch,
                cache: CacheViews, meta: StepMeta) -> tuple[torch.Tensor, torch.Tensor]:
        """(residual stream, the previous block's output or None) -> (the stream with that
        output added, this block's output): the residual add is fused into this norm."""
        h, x = meta.ops.add_rmsnorm(x, delta, self.norm.weight, self.norm.eps)
        if self.kind in (LayerKind.MAMBA, LayerKind.ATTENTION):
            return x, self.mixer(h, batch, cache, meta)
        return x, self.mixer(h, act=meta.ops.relu2)


class NemotronHForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig, device: torch.device | str,
                 tp: TPGroup | None = None) -> None:
        super().__init__()
        self.config = config
        self.device = torch.device(device)
        self.tp = tp or SINGLE
        self.ops: KernelOps = kernel_ops(self.device)  # chosen once for this device
        self.dtype = TORCH_DTYPES[config.dtype]
        v, h, dt, dev = config.vocab_size, config.hidden_size, self.dtype, self.device
        self.embeddings = nn.Parameter(torch.empty(v, h, dtype=dt, device=dev),
                                       requires_grad=False)  # (vocab, hidden)
        self.layers = nn.ModuleList(
            Block(config, i, self.tp, dt, dev) for i in range(config.num_layers))
        self.norm_f = RMSNorm(h, config.layer_norm_epsilon, dt, dev)
        self.lm_head = (None if config.tie_word_embeddings else
                        nn.Parameter(torch.empty(v, h, dtype=dt, device=dev),
                                     requires_grad=False))  # (vocab, hidden)

    @property
    def blocks(self) -> Sequence[Block]:
        """The layer stack, typed (an `nn.ModuleList` is typed as holding plain Modules)."""
        return cast("Sequence[Block]", self.layers)

    @property
    def graph_safe(self) -> bool:
        """No op of a decode step syncs with the host here (so it can be graph-captured)."""
        has_moe = any(layer.kind == LayerKind.MOE for layer in self.layers)
        return not has_moe or RoutedExperts.grouped_on(self.device, self.dtype)

    def use_kernels(self, impl: KernelImpl | str) -> KernelOps:
        """Switch every layer to `impl`'s op table (e.g. the references, to compare)."""
        self.ops = kernel_ops(self.device, impl)
        return self.ops

    def weight_names(self) -> list[str]:
        names = [f"{PREFIX}.embeddings.weight", f"{PREFIX}.norm_f.weight"]
        for i, layer in enumerate(self.blocks):
            names += layer.weight_names(f"{PREFIX}.layers.{i}")
        return names + ([] if self.lm_head is None else ["lm_head.weight"])

    @torch.no_grad()
    def load_weights(self, model_dir: str | Path, progress: bool = False) -> None:
        """Load (this rank's shard of) every weight; raises MissingWeightsError listing gaps.
        `progress`: a progress line on stderr, one step per layer."""
        with CheckpointReader(model_dir, self.dtype, self.device) as reader, \
                Progress("Loading weights", len(self.blocks), "layers", enabled=progress) as bar:
            reader.require(self.weight_names())
            self.embeddings.copy_(reader.read(f"{PREFIX}.embeddings.weight"))
            for i, layer in enumerate(self.blocks):
                layer.load(reader, f"{PREFIX}.layers.{i}")
                bar.update()
            self.norm_f.load(reader, f"{PREFIX}.norm_f")
            if self.lm_head is not None:
                self.lm_head.copy_(reader.read("lm_head.weight"))

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, cache: CacheViews) -> torch.Tensor:
        """Run every new token of the batch; logits (N, vocab) fp32 at `batch.logits_indices`
        (N = B: each request's last token; more when the runner asks for prompt rows)."""
        return self.compute_logits(self.forward_hidden(batch, cache))

    @torch.inference_mode()
    def forward_hidden(self, batch: ForwardBatch, cache: CacheViews) -> torch.Tensor:
        """The final-normed hidden states (N, hidden) at `batch.logits_indices`, so a caller
        that wants logits for many rows can take them in slices (`compute_logits`)."""
        meta = build_step_meta(batch, self.ops)  # once per step, shared by every layer
        x = F.embedding(batch.input_ids, self.embeddings)  # (T, hidden)
        delta: torch.Tensor | None = None  # the last block's output, not yet added to x
        for layer in self.layers:
            x, delta = layer(x, delta, batch, cache, meta)
        rows = batch.logits_indices
        return meta.ops.add_rmsnorm(x[rows], None if delta is None else delta[rows],
                                    self.norm_f.weight, self.norm_f.eps)[0]

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM head: (N, hidden) -> (N, vocab) fp32."""
        head = self.embeddings if self.lm_head is None else self.lm_head
        return F.linear(hidden, head).float()
