"""Random weights of a Nemotron-H checkpoint: tensor names, shapes and seeded initialisation.

Owns the list of tensors a `NemotronHForCausalLM` checkpoint holds (checkpoint names with the
`backbone.` prefix, MoE experts stored per expert) for a given `config.json` dict, and drawing
each tensor's values in bounded-size chunks from a generator seeded by (seed, tensor name), so
values do not depend on write order or sharding. Must not know file formats or presets.

Initialisation (chosen so activations stay O(1) at any width): matrices ~ N(0, 1/fan_in), the
residual-branch outputs additionally scaled by 1/sqrt(num_layers); embeddings ~ N(0, 1); norm
weights ~ 1 + N(0, 0.1); A_log = log U(1, 16); dt_bias = softplus^-1(dt), dt log-uniform in
[1e-3, 0.1]; D ~ 1 + N(0, 0.1); conv weights ~ N(0, 0.2), conv bias ~ N(0, 0.05); MoE router
weight and correction bias in float32 (bias ~ N(0, 0.01)).
"""

from __future__ import annotations

import enum
import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from hybridpd.config import canonical_dtype, dtype_bytes

CHUNK_ELEMS = 1 << 22  # values drawn per generator call (16 MiB of float32)
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DT_MIN, DT_MAX = 1e-3, 0.1


class Init(enum.Enum):
    NORMAL = enum.auto()  # N(0, std)
    ONE_PLUS_NORMAL = enum.auto()  # 1 + N(0, std)
    A_LOG = enum.auto()  # log U(1, 16)
    DT_BIAS = enum.auto()  # inverse softplus of a log-uniform dt


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str  # canonical dtype name
    init: Init
    std: float = 0.0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * dtype_bytes(self.dtype)


def _linear(name: str, out_dim: int, in_dim: int, dtype: str, scale: float = 1.0) -> TensorSpec:
    return TensorSpec(name, (out_dim, in_dim), dtype, Init.NORMAL, scale / math.sqrt(in_dim))


def _mamba(p: str, c: dict[str, Any], dt: str, res: float) -> list[TensorSpec]:
    h, nh = c["hidden_size"], c["mamba_num_heads"]
    d_inner = nh * c["mamba_head_dim"]
    conv_dim = d_inner + 2 * c["n_groups"] * c["ssm_state_size"]
    return [
        # in_proj rows: [z (d_inner) | xBC (conv_dim) | dt (nh)]
        _linear(f"{p}.in_proj.weight", d_inner + conv_dim + nh, h, dt),
        TensorSpec(f"{p}.conv1d.weight", (conv_dim, 1, c["conv_kernel"]), dt, Init.NORMAL, 0.2),
        TensorSpec(f"{p}.conv1d.bias", (conv_dim,), dt, Init.NORMAL, 0.05),
        TensorSpec(f"{p}.dt_bias", (nh,), dt, Init.DT_BIAS),
        TensorSpec(f"{p}.A_log", (nh,), dt, Init.A_LOG),
        TensorSpec(f"{p}.D", (nh,), dt, Init.ONE_PLUS_NORMAL, 0.1),
        TensorSpec(f"{p}.norm.weight", (d_inner,), dt, Init.ONE_PLUS_NORMAL, 0.1),
        _linear(f"{p}.out_proj.weight", h, d_inner, dt, res),
    ]


def _attention(p: str, c: dict[str, Any], dt: str, res: float) -> list[TensorSpec]:
    h, hd = c["hidden_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    return [
        _linear(f"{p}.q_proj.weight", q, h, dt),
        _linear(f"{p}.k_proj.weight", kv, h, dt),
        _linear(f"{p}.v_proj.weight", kv, h, dt),
        _linear(f"{p}.o_proj.weight", h, q, dt, res),
    ]


def _mlp(p: str, h: int, inter: int, dt: str, res: float) -> list[TensorSpec]:
    return [
        _linear(f"{p}.up_proj.weight", inter, h, dt),
        _linear(f"{p}.down_proj.weight", h, inter, dt, res),
    ]


def _moe(p: str, c: dict[str, Any], dt: str, res: float) -> list[TensorSpec]:
    h, n, inter = c["hidden_size"], c["n_routed_experts"], c["moe_intermediate_size"]
    specs = [
        _linear(f"{p}.gate.weight", n, h, "float32"),
        TensorSpec(f"{p}.gate.e_score_correction_bias", (n,), "float32", Init.NORMAL, 0.01),
    ]
    for j in range(n):
        specs += _mlp(f"{p}.experts.{j}", h, inter, dt, res)
    specs += _mlp(f"{p}.shared_experts", h, c["moe_shared_expert_intermediate_size"], dt, res)
    return specs


def tensor_specs(cfg: dict[str, Any]) -> list[TensorSpec]:
    """Every tensor of the checkpoint described by HF config dict `cfg`, in write order."""
    dt = canonical_dtype(cfg["dtype"])
    pattern = cfg["hybrid_override_pattern"]
    h, v = cfg["hidden_size"], cfg["vocab_size"]
    res = 1.0 / math.sqrt(len(pattern))
    specs = [TensorSpec("backbone.embeddings.weight", (v, h), dt, Init.NORMAL, 1.0)]
    for i, kind in enumerate(pattern):
        p = f"backbone.layers.{i}"
        specs.append(TensorSpec(f"{p}.norm.weight", (h,), dt, Init.ONE_PLUS_NORMAL, 0.1))
        m = f"{p}.mixer"
        if kind == "M":
            specs += _mamba(m, cfg, dt, res)
        elif kind == "*":
            specs += _attention(m, cfg, dt, res)
        elif kind == "-":
            specs += _mlp(m, h, cfg["intermediate_size"], dt, res)
        elif kind == "E":
            specs += _moe(m, cfg, dt, res)
        else:
            raise ValueError(f"unsupported layer kind {kind!r} in pattern {pattern!r}")
    specs.append(TensorSpec("backbone.norm_f.weight", (h,), dt, Init.ONE_PLUS_NORMAL, 0.1))
    specs.append(_linear("lm_head.weight", v, h, dt))
    return specs


def _generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def _draw_float32(spec: TensorSpec, n: int, gen: torch.Generator) -> torch.Tensor:
    if spec.init is Init.NORMAL:
        return torch.randn(n, generator=gen) * spec.std  # [n] fp32
    if spec.init is Init.ONE_PLUS_NORMAL:
        return 1.0 + torch.randn(n, generator=gen) * spec.std
    u = torch.rand(n, generator=gen, dtype=torch.float64)  # [n] in [0, 1)
    if spec.init is Init.A_LOG:
        return torch.log(1.0 + 15.0 * u).float()
    assert spec.init is Init.DT_BIAS, spec.init
    dt = torch.exp(math.log(DT_MIN) + u * (math.log(DT_MAX) - math.log(DT_MIN)))
    return (dt + torch.log(-torch.expm1(-dt))).float()  # softplus^-1(dt)


def draw_chunks(spec: TensorSpec, seed: int) -> Iterator[torch.Tensor]:
    """The tensor's values, flattened row-major, as 1-D chunks in the spec's dtype."""
    gen = _generator(seed, spec.name)
    dtype = TORCH_DTYPES[spec.dtype]
    left = spec.numel
    while left > 0:
        n = min(left, CHUNK_ELEMS)
        yield _draw_float32(spec, n, gen).to(dtype)
        left -= n


def materialize(spec: TensorSpec, seed: int) -> torch.Tensor:
    """The whole tensor in memory (tests and small tensors only)."""
    return torch.cat(list(draw_chunks(spec, seed))).reshape(spec.shape)
