"""Immutable configuration, resolved once.

Owns `ModelConfig` (parsed from a Hugging Face `config.json` of a Nemotron-H-family model) and
the dtype helpers. Knows nothing of tensors beyond dtype names, nothing of requests or HTTP.
Unsupported architectures fail here, at load, with a message naming what is wrong.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from hybridpd.env import allow_long_max_model_len


class LayerKind(str, enum.Enum):
    MAMBA = "mamba"
    ATTENTION = "attention"
    MLP = "mlp"
    MOE = "moe"


PATTERN_CHARS = {
    "M": LayerKind.MAMBA, "*": LayerKind.ATTENTION, "-": LayerKind.MLP, "E": LayerKind.MOE,
}
LIST_NAMES = {
    "mamba": LayerKind.MAMBA,
    "linear_attention": LayerKind.MAMBA,
    "m": LayerKind.MAMBA,
    "attention": LayerKind.ATTENTION,
    "full_attention": LayerKind.ATTENTION,
    "*": LayerKind.ATTENTION,
    "mlp": LayerKind.MLP,
    "-": LayerKind.MLP,
    "moe": LayerKind.MOE,
    "e": LayerKind.MOE,
}
SUPPORTED_MODEL_TYPES = ("nemotron_h",)
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
DTYPE_ALIASES = {
    "fp32": "float32", "float": "float32", "float32": "float32",
    "fp16": "float16", "half": "float16", "float16": "float16",
    "bf16": "bfloat16", "bfloat16": "bfloat16",
}


def canonical_dtype(name: str) -> str:
    """'bf16' / 'torch.bfloat16' / 'bfloat16' -> 'bfloat16'; raises ValueError when unknown."""
    key = str(name).replace("torch.", "").lower()
    if key not in DTYPE_ALIASES:
        raise ValueError(f"unsupported dtype {name!r}; use one of float32, float16, bfloat16")
    return DTYPE_ALIASES[key]


def dtype_bytes(name: str) -> int:
    return DTYPE_BYTES[canonical_dtype(name)]


def parse_layer_kinds(raw: dict[str, Any]) -> tuple[LayerKind, ...]:
    """Layer kinds from `hybrid_override_pattern` (string) or `layers_block_type` (list)."""
    pattern = raw.get("hybrid_override_pattern")
    blocks = raw.get("layers_block_type") or raw.get("layer_types")
    if pattern is not None:
        bad = sorted({c for c in pattern if c not in PATTERN_CHARS})
        if bad:
            raise ValueError(f"hybrid_override_pattern has unsupported layer chars {bad}")
        return tuple(PATTERN_CHARS[c] for c in pattern)
    if blocks is not None:
        bad = sorted({b for b in blocks if str(b).lower() not in LIST_NAMES})
        if bad:
            raise ValueError(f"layers_block_type has unsupported layer types {bad}")
        return tuple(LIST_NAMES[str(b).lower()] for b in blocks)
    raise ValueError("config has neither hybrid_override_pattern nor layers_block_type")


@dataclass(frozen=True)
class ModelConfig:
    """Shapes and hyper-parameters of a Nemotron-H-family model (TP = 1, full sizes)."""

    layer_kinds: tuple[LayerKind, ...]
    vocab_size: int
    hidden_size: int
    # attention
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    # mamba2
    mamba_num_heads: int
    mamba_head_dim: int
    n_groups: int
    ssm_state_size: int
    conv_kernel: int
    use_conv_bias: bool
    mamba_proj_bias: bool
    chunk_size: int
    # mlp / moe
    intermediate_size: int
    mlp_bias: bool
    n_routed_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    moe_shared_expert_intermediate_size: int
    n_group: int
    topk_group: int
    norm_topk_prob: bool
    routed_scaling_factor: float
    # misc
    layer_norm_epsilon: float
    tie_word_embeddings: bool
    max_position_embeddings: int
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    pad_token_id: int | None
    dtype: str  # weights / activations / conv state
    ssm_state_dtype: str  # SSM state in the cache (default float32)

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.layer_kinds)

    @property
    def d_inner(self) -> int:
        return self.mamba_num_heads * self.mamba_head_dim

    @property
    def bc_dim(self) -> int:
        """Channels of B (and of C): n_groups * ssm_state_size."""
        return self.n_groups * self.ssm_state_size

    @property
    def conv_dim(self) -> int:
        return self.d_inner + 2 * self.bc_dim

    def context_limit(self, requested: int | None = None) -> int:
        """Longest sequence served: the model's limit, or less when asked (`--max-model-len`);
        more only with HYBRIDPD_ALLOW_LONG_MAX_MODEL_LEN=1 (the CLI refuses it otherwise)."""
        limit = self.max_position_embeddings
        if requested and requested > limit and allow_long_max_model_len():
            return requested
        return min(limit, requested) if requested else limit

    def layers_of(self, kind: LayerKind) -> tuple[int, ...]:
        return tuple(i for i, k in enumerate(self.layer_kinds) if k == kind)

    @property
    def pattern(self) -> str:
        inv = {v: k for k, v in PATTERN_CHARS.items()}
        return "".join(inv[k] for k in self.layer_kinds)

    def with_overrides(self, **kw: Any) -> ModelConfig:
        return replace(self, **kw)

    # ---- loading ---------------------------------------------------------------------------
    @classmethod
    def from_hf_dict(
        cls, raw: dict[str, Any], dtype: str | None = None, ssm_state_dtype: str | None = None
    ) -> ModelConfig:
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {model_type!r}; hybridpd supports {SUPPORTED_MODEL_TYPES}"
            )
        if raw.get("moe_latent_size"):
            raise ValueError("moe_latent_size (latent MoE projections) is not supported")
        if raw.get("num_nextn_predict_layers", 0):
            # MTP layers are ignored for serving; their weights are simply not loaded.
            pass
        kinds = parse_layer_kinds(raw)
        eos = raw.get("eos_token_id", 2)
        eos_ids = tuple(eos) if isinstance(eos, list | tuple) else (() if eos is None else (eos,))

        def g(name: str, default: Any, *aliases: str) -> Any:
            for key in (name, *aliases):
                if key in raw and raw[key] is not None:
                    return raw[key]
            return default

        num_heads = g("num_attention_heads", 32)
        weights_dtype = canonical_dtype(dtype or g("dtype", None, "torch_dtype") or "float32")
        return cls(
            layer_kinds=kinds,
            vocab_size=g("vocab_size", 131072),
            hidden_size=g("hidden_size", 4096),
            num_attention_heads=num_heads,
            num_key_value_heads=g("num_key_value_heads", num_heads),
            head_dim=g("head_dim", g("hidden_size", 4096) // num_heads),
            mamba_num_heads=g("mamba_num_heads", 128),
            mamba_head_dim=g("mamba_head_dim", 64),
            n_groups=g("n_groups", 8, "mamba_n_groups"),
            ssm_state_size=g("ssm_state_size", 128),
            conv_kernel=g("conv_kernel", 4, "mamba_d_conv"),
            use_conv_bias=bool(g("use_conv_bias", True, "mamba_conv_bias")),
            mamba_proj_bias=bool(raw.get("use_bias") or raw.get("mamba_proj_bias")),
            chunk_size=g("chunk_size", 128, "mamba_chunk_size"),
            intermediate_size=g("intermediate_size", 21504),
            mlp_bias=bool(g("mlp_bias", False)),
            n_routed_experts=g("n_routed_experts", 8),
            num_experts_per_tok=g("num_experts_per_tok", 2),
            moe_intermediate_size=g("moe_intermediate_size", 7688),
            moe_shared_expert_intermediate_size=g("moe_shared_expert_intermediate_size", 7688),
            n_group=g("n_group", 1),
            topk_group=g("topk_group", 1),
            norm_topk_prob=bool(g("norm_topk_prob", True)),
            routed_scaling_factor=float(g("routed_scaling_factor", 1.0)),
            layer_norm_epsilon=float(g("layer_norm_epsilon", 1e-5, "rms_norm_eps")),
            tie_word_embeddings=bool(g("tie_word_embeddings", False)),
            max_position_embeddings=g("max_position_embeddings", 4096),
            bos_token_id=raw.get("bos_token_id", 1),
            eos_token_ids=eos_ids,
            pad_token_id=raw.get("pad_token_id", 0),
            dtype=weights_dtype,
            ssm_state_dtype=canonical_dtype(
                ssm_state_dtype or g("mamba_ssm_cache_dtype", "float32")
            ),
        )

    @classmethod
    def from_dir(
        cls, model_dir: str | Path, dtype: str | None = None, ssm_state_dtype: str | None = None
    ) -> ModelConfig:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config.json in {model_dir}")
        return cls.from_hf_dict(json.loads(path.read_text()), dtype, ssm_state_dtype)


class ConfigError(ValueError):
    """A configuration mistake, told in one line (the CLI prints it and exits 2)."""


TOKENIZER_FILES = ("tokenizer.json",)  # what `hybridpd.tokenizer.Tokenizer.from_dir` needs


def check_model_dir(model_dir: str | Path, max_model_len: int | None = None,
                    dtype: str | None = None) -> ModelConfig:
    """Everything about a checkpoint directory that can be checked without loading weights:
    it exists, its config.json parses and describes a supported model, its tokenizer and
    weight files are present, `max_model_len` is within the model's limit and `dtype` is
    known. Returns the parsed config; raises ConfigError naming the first problem."""
    d = Path(model_dir)
    if not d.exists():
        raise ConfigError(f"model directory {str(d)!r} does not exist")
    if not d.is_dir():
        raise ConfigError(f"model {str(d)!r} is not a directory (expected a Hugging Face "
                          "checkpoint directory: config.json, *.safetensors, tokenizer.json)")
    path = d / "config.json"
    if not path.is_file():
        raise ConfigError(f"no config.json in {str(d)!r} (not a Hugging Face checkpoint dir)")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path} is not readable JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} is not a JSON object")
    if dtype is not None and dtype != "auto":
        try:
            canonical_dtype(dtype)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    try:
        cfg = ModelConfig.from_hf_dict(raw)
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigError(f"{path}: {e}") from None
    missing = [f for f in TOKENIZER_FILES if not (d / f).is_file()]
    if missing:
        raise ConfigError(f"model {str(d)!r} has no tokenizer ({', '.join(missing)} missing); "
                          "copy the tokenizer files of the model into the directory")
    if not any(d.glob("*.safetensors")):
        raise ConfigError(f"no *.safetensors weights in {str(d)!r}")
    limit = cfg.max_position_embeddings
    if max_model_len is not None and max_model_len > limit and not allow_long_max_model_len():
        raise ConfigError(f"--max-model-len {max_model_len} is above the model's limit of "
                          f"{limit} tokens (max_position_embeddings in {path}; "
                          "HYBRIDPD_ALLOW_LONG_MAX_MODEL_LEN=1 allows it)")
    return cfg
