"""Model shape presets for demo (random-weight) checkpoints.

Owns the `Preset` table (the tiny embedded demo model, a small MoE model and the three real
Nemotron-H-family shapes) and the translation of a preset into a Hugging Face `config.json`
dict. Must not know how weights are drawn or written, nor anything about tokenizers beyond the
special-token ids it is given.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hybridpd.config import canonical_dtype

VOCAB_MULTIPLE = 64  # presets without a fixed vocab round the tokenizer size up to this


@dataclass(frozen=True)
class Preset:
    """Shape of one model family member (full depth; `--num-layers` cuts `pattern`)."""

    name: str
    pattern: str  # hybrid_override_pattern: M mamba2, * attention, - MLP, E MoE
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    mamba_num_heads: int
    mamba_head_dim: int
    n_groups: int
    ssm_state_size: int
    conv_kernel: int
    intermediate_size: int  # dense relu^2 MLP width
    vocab_size: int | None  # None: tokenizer size rounded up to VOCAB_MULTIPLE
    max_position_embeddings: int
    default_dtype: str
    chunk_size: int = 128
    layer_norm_epsilon: float = 1e-5
    # MoE (only used when the pattern has E layers)
    n_routed_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    moe_shared_expert_intermediate_size: int = 0
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True

    @property
    def has_moe(self) -> bool:
        return "E" in self.pattern


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        # The embedded demo model: fast on one CPU core, every layer kind but MoE; TP 1, 2 and 4
        # work (n_groups 4, 2 KV heads: replicated at TP 4).
        Preset(
            name="tiny", pattern="M*M-M*M-", hidden_size=64,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            mamba_num_heads=8, mamba_head_dim=16, n_groups=4, ssm_state_size=16, conv_kernel=4,
            intermediate_size=128, vocab_size=None, max_position_embeddings=4096,
            default_dtype="float32", chunk_size=16,
        ),
        # The shape of the trained demo model (`hybridpd train-demo`, shipped in demo/assets):
        # every layer kind (MoE included), TP 1, 2 and 4 valid (n_groups 4, 2 KV heads replicated
        # at TP 4).
        Preset(
            name="demo", pattern="M*M-M*ME", hidden_size=128,
            num_attention_heads=4, num_key_value_heads=2, head_dim=32,
            mamba_num_heads=8, mamba_head_dim=32, n_groups=4, ssm_state_size=16, conv_kernel=4,
            intermediate_size=512, vocab_size=None, max_position_embeddings=4096,
            default_dtype="float32", chunk_size=16,
            n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=256,
            moe_shared_expert_intermediate_size=256, n_group=1, topk_group=1,
            routed_scaling_factor=1.0, norm_topk_prob=True,
        ),
        # A bit bigger, with MoE layers (grouped routing, shared expert) and every layer kind.
        Preset(
            name="small", pattern="MEM*EM-M*E", hidden_size=128,
            num_attention_heads=4, num_key_value_heads=2, head_dim=32,
            mamba_num_heads=8, mamba_head_dim=32, n_groups=2, ssm_state_size=32, conv_kernel=4,
            intermediate_size=256, vocab_size=None, max_position_embeddings=4096,
            default_dtype="float32", chunk_size=16,
            n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=64,
            moe_shared_expert_intermediate_size=128, n_group=2, topk_group=1,
            routed_scaling_factor=2.5, norm_topk_prob=True,
        ),
        Preset(
            name="nemotron-h-8b",
            pattern="M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-",
            hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
            mamba_num_heads=128, mamba_head_dim=64, n_groups=8, ssm_state_size=128,
            conv_kernel=4, intermediate_size=21504, vocab_size=131072,
            max_position_embeddings=8192, default_dtype="bfloat16",
        ),
        Preset(
            name="nemotron-nano-9b-v2",
            pattern="M-M-M-MM-M-M-M*-M-M-M*-M-M-M-M*-M-M-M-M*-M-MM-M-M-M-M-M-",
            hidden_size=4480, num_attention_heads=40, num_key_value_heads=8, head_dim=128,
            mamba_num_heads=128, mamba_head_dim=80, n_groups=8, ssm_state_size=128,
            conv_kernel=4, intermediate_size=15680, vocab_size=131072,
            max_position_embeddings=131072, default_dtype="bfloat16",
        ),
        Preset(
            name="nemotron-3-nano-30b-a3b",
            pattern="MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME",
            hidden_size=2688, num_attention_heads=32, num_key_value_heads=2, head_dim=128,
            mamba_num_heads=64, mamba_head_dim=64, n_groups=8, ssm_state_size=128,
            conv_kernel=4, intermediate_size=1856, vocab_size=131072,
            max_position_embeddings=262144, default_dtype="bfloat16",
            n_routed_experts=128, num_experts_per_tok=6, moe_intermediate_size=1856,
            moe_shared_expert_intermediate_size=3712, n_group=1, topk_group=1,
            routed_scaling_factor=2.5, norm_topk_prob=True,
        ),
    )
}


def get_preset(name: str) -> Preset:
    """The preset called `name`; ValueError listing the known names otherwise."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]


def cut_pattern(pattern: str, num_layers: int | None) -> str:
    """The first `num_layers` layers of `pattern` (all of them when None)."""
    if num_layers is None:
        return pattern
    if not 1 <= num_layers <= len(pattern):
        raise ValueError(f"num_layers must be in [1, {len(pattern)}], got {num_layers}")
    return pattern[:num_layers]


def resolve_vocab_size(preset: Preset, tokenizer_size: int) -> int:
    """Config vocab: the preset's fixed one, or the tokenizer size rounded up to 64."""
    if preset.vocab_size is not None:
        if preset.vocab_size < tokenizer_size:
            raise ValueError(f"preset vocab {preset.vocab_size} < tokenizer size {tokenizer_size}")
        return preset.vocab_size
    return -(-tokenizer_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def hf_config(
    preset: Preset,
    *,
    vocab_size: int,
    bos_token_id: int,
    eos_token_ids: list[int],
    pad_token_id: int,
    num_layers: int | None = None,
    dtype: str | None = None,
) -> dict[str, Any]:
    """The `config.json` dict of a NemotronHForCausalLM checkpoint at this preset's shape."""
    pattern = cut_pattern(preset.pattern, num_layers)
    cfg: dict[str, Any] = {
        "architectures": ["NemotronHForCausalLM"],
        "model_type": "nemotron_h",
        "hybrid_override_pattern": pattern,
        "num_hidden_layers": len(pattern),
        "vocab_size": vocab_size,
        "hidden_size": preset.hidden_size,
        "num_attention_heads": preset.num_attention_heads,
        "num_key_value_heads": preset.num_key_value_heads,
        "head_dim": preset.head_dim,
        "attention_bias": False,
        "mamba_num_heads": preset.mamba_num_heads,
        "mamba_head_dim": preset.mamba_head_dim,
        "n_groups": preset.n_groups,
        "ssm_state_size": preset.ssm_state_size,
        "conv_kernel": preset.conv_kernel,
        "expand": 2,  # ignored by the model: d_inner = mamba_num_heads * mamba_head_dim
        "chunk_size": preset.chunk_size,
        "use_conv_bias": True,
        "mamba_proj_bias": False,
        "use_bias": False,
        "mamba_hidden_act": "silu",
        "time_step_min": 0.001,
        "time_step_max": 0.1,
        "time_step_floor": 0.0001,
        "intermediate_size": preset.intermediate_size,
        "mlp_hidden_act": "relu2",
        "mlp_bias": False,
        "layer_norm_epsilon": preset.layer_norm_epsilon,
        "residual_in_fp32": False,
        "tie_word_embeddings": False,
        "max_position_embeddings": preset.max_position_embeddings,
        "bos_token_id": bos_token_id,
        "eos_token_id": list(eos_token_ids),
        "pad_token_id": pad_token_id,
        "mamba_ssm_cache_dtype": "float32",
        "dtype": canonical_dtype(dtype or preset.default_dtype),
        "use_cache": True,
    }
    if preset.has_moe:
        cfg.update(
            n_routed_experts=preset.n_routed_experts,
            num_experts_per_tok=preset.num_experts_per_tok,
            moe_intermediate_size=preset.moe_intermediate_size,
            moe_shared_expert_intermediate_size=preset.moe_shared_expert_intermediate_size,
            n_shared_experts=1,
            n_group=preset.n_group,
            topk_group=preset.topk_group,
            routed_scaling_factor=preset.routed_scaling_factor,
            norm_topk_prob=preset.norm_topk_prob,
        )
    return cfg
