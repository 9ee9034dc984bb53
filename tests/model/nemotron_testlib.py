"""Test helpers for tests/model: tiny random transformers reference models, a simple cache that
implements `CacheViews`, and a step-by-step `ForwardBatch` builder (what the runner will do).

Owns nothing in the package; imported by the tests of this folder only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hybridpd.cache.geometry import CacheGeometry
from hybridpd.config import ModelConfig
from hybridpd.model.forward_batch import ForwardBatch

BASE_HF = dict(
    vocab_size=96, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
    mamba_num_heads=4, mamba_head_dim=8, n_groups=1, ssm_state_size=8, conv_kernel=4,
    intermediate_size=40, n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
    moe_intermediate_size=16, moe_shared_expert_intermediate_size=24, routed_scaling_factor=2.5,
    chunk_size=8, layer_norm_epsilon=1e-5, eos_token_id=2, bos_token_id=1, pad_token_id=0,
)


def hf_config(pattern: str, **overrides: object):  # -> transformers.NemotronHConfig
    from transformers import NemotronHConfig

    return NemotronHConfig(hybrid_override_pattern=pattern, **{**BASE_HF, **overrides})


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int) -> None:
    """Seeded, non-trivial values for every parameter and buffer of a HF NemotronH model."""
    gen = torch.Generator().manual_seed(seed)

    def rand(t: torch.Tensor) -> torch.Tensor:
        return torch.randn(t.shape, generator=gen, dtype=torch.float32)

    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "A_log":
            val = torch.log(torch.rand(p.shape, generator=gen) * 3.5 + 0.5)  # A in [-4, -0.5]
        elif leaf == "dt_bias":
            dt = torch.rand(p.shape, generator=gen) * 0.2 + 0.02
            val = dt + torch.log(-torch.expm1(-dt))  # inverse softplus
        elif leaf == "D":
            val = 1.0 + 0.3 * rand(p)
        elif name.endswith("norm.weight") or name.endswith("norm_f.weight"):
            val = 1.0 + 0.2 * rand(p)
        elif leaf == "e_score_correction_bias":
            val = 0.1 * rand(p)
        elif "embeddings" in name:
            val = 0.5 * rand(p)
        elif "conv1d" in name:
            val = 0.3 * rand(p)
        elif p.dim() >= 2:
            val = rand(p) / math.sqrt(p.shape[-1]) * 0.8
        else:
            val = 0.05 * rand(p)
        p.copy_(val.to(p.dtype))


def make_reference(pattern: str, out_dir: Path, seed: int = 0, **overrides: object):
    """Random HF NemotronHForCausalLM (fp32, eval, no dt clamp), saved to `out_dir`."""
    from transformers import NemotronHForCausalLM as HFModel

    torch.manual_seed(seed)
    ref = HFModel(hf_config(pattern, **overrides)).float().eval()
    randomize(ref, seed)
    ref.save_pretrained(out_dir)
    for layer in ref.model.layers:
        if hasattr(layer.mixer, "time_step_limit"):
            layer.mixer.time_step_limit = (0.0, float("inf"))
    return ref


class SimpleCache:
    """`CacheViews` with one plain tensor per cached layer; groups from a `CacheGeometry`."""

    def __init__(self, geometry: CacheGeometry, cfg: ModelConfig, num_blocks: int,
                 block_tokens: int) -> None:
        self.geometry = geometry
        self.block_tokens = block_tokens
        g, f32 = geometry, torch.float32
        conv_local = g.x_channels_local + 2 * g.bc_channels_local
        # KV garbage is finite (masked slots get probability 0, and 0 * nan = nan); Mamba
        # garbage is nan, so any read of a state that has_initial_state says to ignore shows.
        gen = torch.Generator().manual_seed(1234)
        self._kv = {i: 1e3 * torch.randn((num_blocks, g.kv_heads_local, 2, block_tokens,
                                          g.head_dim), generator=gen, dtype=f32)
                    for grp in g.attention_groups for i in grp}
        self._conv = {i: torch.full((num_blocks, conv_local, g.conv_state_len), float("nan"))
                      for grp in g.mamba_groups for i in grp}
        self._ssm = {i: torch.full((num_blocks, g.mamba_heads_local, g.mamba_head_dim,
                                    g.ssm_state_size), float("nan"))
                     for grp in g.mamba_groups for i in grp}
        del cfg

    def kv_view(self, layer_idx: int) -> torch.Tensor:
        return self._kv[layer_idx]

    def conv_view(self, layer_idx: int) -> torch.Tensor:
        return self._conv[layer_idx]

    def ssm_view(self, layer_idx: int) -> torch.Tensor:
        return self._ssm[layer_idx]

    def group_index(self, layer_idx: int) -> int:
        return self.geometry.group_index(layer_idx)


@dataclass
class Seq:
    """One request's cache holdings, as the scheduler would track them."""

    attn_blocks: list[list[int]]  # per attention group
    state_ids: list[int]  # per Mamba group
    num_computed: int = 0
    tokens: list[int] = field(default_factory=list)


class BatchBuilder:
    """Allocates blocks (never block 0) and builds ForwardBatches step by step."""

    def __init__(self, geometry: CacheGeometry, block_tokens: int) -> None:
        self.geometry = geometry
        self.block_tokens = block_tokens
        self._next = 1

    def _alloc(self) -> int:
        self._next += 1
        return self._next - 1

    def new_seq(self) -> Seq:
        return Seq([[] for _ in self.geometry.attention_groups],
                   [self._alloc() for _ in self.geometry.mamba_groups])

    def build(self, work: list[tuple[Seq, list[int]]]) -> ForwardBatch:
        """`work`: (seq, new tokens) in batch order (decodes first); advances the seqs."""
        ids, pos, qsl, ctx = [], [], [0], []
        for seq, toks in work:
            ids += toks
            pos += range(seq.num_computed, seq.num_computed + len(toks))
            qsl.append(qsl[-1] + len(toks))
            ctx.append(seq.num_computed)
            need = -(-(seq.num_computed + len(toks)) // self.block_tokens)
            for blocks in seq.attn_blocks:
                blocks += [self._alloc() for _ in range(need - len(blocks))]
        num_decodes = 0
        for seq, toks in work:
            if len(toks) != 1 or seq.num_computed == 0:
                break
            num_decodes += 1
        max_blocks = max([len(s.attn_blocks[0]) for s, _ in work] if work[0][0].attn_blocks
                         else [1])
        tables, slots = [], []
        for g in range(len(self.geometry.attention_groups)):
            table = torch.zeros(len(work), max_blocks, dtype=torch.int64)
            slot = []
            for r, (seq, toks) in enumerate(work):
                table[r, : len(seq.attn_blocks[g])] = torch.tensor(seq.attn_blocks[g])
                for p in range(seq.num_computed, seq.num_computed + len(toks)):
                    blk = seq.attn_blocks[g][p // self.block_tokens]
                    slot.append(blk * self.block_tokens + p % self.block_tokens)
            tables.append(table)
            slots.append(torch.tensor(slot, dtype=torch.int64))
        states = [torch.tensor([s.state_ids[g] for s, _ in work], dtype=torch.int64)
                  for g in range(len(self.geometry.mamba_groups))]
        i64 = dict(dtype=torch.int64)
        ctx_t = torch.tensor(ctx, **i64)
        qsl_t = torch.tensor(qsl, **i64)
        lens = qsl_t[1:] - qsl_t[:-1]
        for seq, toks in work:
            seq.num_computed += len(toks)
            seq.tokens += toks
        return ForwardBatch(
            input_ids=torch.tensor(ids, **i64), positions=torch.tensor(pos, **i64),
            query_start_loc=qsl_t, context_lens=ctx_t, seq_lens=ctx_t + lens,
            has_initial_state=ctx_t > 0, logits_indices=qsl_t[1:] - 1,
            attn_block_tables=tuple(tables), attn_slot_mappings=tuple(slots),
            mamba_state_ids=tuple(states), num_decodes=num_decodes,
            max_query_len=int(lens.max()), max_seq_len=int((ctx_t + lens).max()),
        )


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())
