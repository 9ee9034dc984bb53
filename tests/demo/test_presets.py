"""Presets: real layer patterns and shapes, config.json parseable by us and by transformers."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from hybridpd.config import LayerKind, ModelConfig  # noqa: E402
from hybridpd.demo.presets import (  # noqa: E402
    PRESETS,
    cut_pattern,
    get_preset,
    hf_config,
    resolve_vocab_size,
)

torch.set_num_threads(1)

# DESIGN.md section 2: (mamba, attention, mlp, moe) layer counts of the real models.
REAL_COUNTS = {
    "nemotron-h-8b": (24, 4, 24, 0),
    "nemotron-nano-9b-v2": (27, 4, 25, 0),
    "nemotron-3-nano-30b-a3b": (23, 6, 0, 23),
}


def _config(name: str, **kw: object) -> dict:
    p = get_preset(name)
    return hf_config(p, vocab_size=resolve_vocab_size(p, 380), bos_token_id=1,
                     eos_token_ids=[2, 5], pad_token_id=3, **kw)


@pytest.mark.parametrize("name", sorted(REAL_COUNTS))
def test_real_patterns_have_the_published_layer_counts(name: str) -> None:
    pattern = get_preset(name).pattern
    counts = tuple(pattern.count(c) for c in "M*-E")
    assert counts == REAL_COUNTS[name]
    assert len(pattern) == sum(counts)


def test_real_shapes_match_design_table() -> None:
    h8 = ModelConfig.from_hf_dict(_config("nemotron-h-8b"))
    assert (h8.hidden_size, h8.num_attention_heads, h8.num_key_value_heads, h8.head_dim) == (
        4096, 32, 8, 128)
    assert (h8.mamba_num_heads, h8.mamba_head_dim, h8.n_groups, h8.ssm_state_size) == (
        128, 64, 8, 128)
    assert h8.conv_dim == 10240 and h8.intermediate_size == 21504 and h8.vocab_size == 131072
    v2 = ModelConfig.from_hf_dict(_config("nemotron-nano-9b-v2"))
    assert (v2.hidden_size, v2.num_attention_heads, v2.mamba_head_dim, v2.intermediate_size) == (
        4480, 40, 80, 15680)
    n3 = ModelConfig.from_hf_dict(_config("nemotron-3-nano-30b-a3b"))
    assert (n3.hidden_size, n3.num_key_value_heads, n3.mamba_num_heads) == (2688, 2, 64)
    assert (n3.n_routed_experts, n3.num_experts_per_tok, n3.moe_intermediate_size) == (128, 6, 1856)
    assert n3.moe_shared_expert_intermediate_size == 3712
    assert n3.routed_scaling_factor == 2.5 and n3.norm_topk_prob


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_config_round_trips_through_model_config_and_transformers(name: str) -> None:
    from transformers import NemotronHConfig

    raw = _config(name)
    ours = ModelConfig.from_hf_dict(raw)
    assert ours.pattern == get_preset(name).pattern
    assert ours.eos_token_ids == (2, 5) and ours.bos_token_id == 1
    theirs = NemotronHConfig(**{k: v for k, v in raw.items() if k != "model_type"})
    assert theirs.hybrid_override_pattern == raw["hybrid_override_pattern"]
    assert theirs.num_hidden_layers == len(raw["hybrid_override_pattern"])
    if get_preset(name).has_moe:
        assert theirs.n_routed_experts == raw["n_routed_experts"]


def test_num_layers_keeps_the_first_layers() -> None:
    raw = _config("nemotron-h-8b", num_layers=3)
    assert raw["hybrid_override_pattern"] == "M-M" and raw["num_hidden_layers"] == 3
    kinds = ModelConfig.from_hf_dict(raw).layer_kinds
    assert kinds == (LayerKind.MAMBA, LayerKind.MLP, LayerKind.MAMBA)
    assert cut_pattern("M*E", None) == "M*E"
    for bad in (0, 4, -1):
        with pytest.raises(ValueError, match="num_layers"):
            cut_pattern("M*E", bad)


def test_vocab_rounding_and_unknown_preset() -> None:
    tiny = get_preset("tiny")
    assert resolve_vocab_size(tiny, 380) == 384
    assert resolve_vocab_size(tiny, 384) == 384
    assert resolve_vocab_size(tiny, 385) == 448
    assert resolve_vocab_size(get_preset("nemotron-h-8b"), 380) == 131072
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("nope")


def test_dtype_override_and_tiny_defaults() -> None:
    assert _config("tiny")["dtype"] == "float32"
    assert _config("tiny", dtype="bf16")["dtype"] == "bfloat16"
    assert _config("nemotron-h-8b")["dtype"] == "bfloat16"
    with pytest.raises(ValueError, match="dtype"):
        _config("tiny", dtype="int8")
    tiny = ModelConfig.from_hf_dict(_config("tiny"))
    assert tiny.n_groups % 2 == 0 and tiny.num_key_value_heads % 2 == 0  # TP=2 friendly
    assert tiny.layers_of(LayerKind.ATTENTION) and tiny.layers_of(LayerKind.MAMBA)
