"""Byte geometry of one rank's page pool: layer groups, page sizes, offsets inside a page.

Owns `CacheGeometry` (frozen, pure integers and dtype names) and its compatibility hash. This is
the single source of truth for the layout contract of docs/architecture.md "The page pool":

* buffer `uint8[num_blocks, S, page_bytes]`; block `b` of region `i` at `(b*S + i)*page_bytes`;
* attention page `kv[Hkv_local][K|V][T][head_dim]` (kv dtype), T = block_tokens;
* Mamba page `[conv (conv_dim_local, K-1) DS, channels x|B|C][ssm (H_local, P, N)][pad]`.

Knows nothing of tensors, requests, the model code or NIXL: only `ModelConfig` numbers.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from hybridpd.config import LayerKind, ModelConfig, canonical_dtype, dtype_bytes

LAYOUT_VERSION = 1
CONV_LAYOUT = "DS"  # conv state (dim, state_len), channels x | B | C
SSM_ALIGN = 16  # the SSM state starts at align_up(conv_bytes, SSM_ALIGN)


def align_up(value: int, alignment: int) -> int:
    return -(-value // alignment) * alignment


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def split_groups(layers: tuple[int, ...], size: int) -> tuple[tuple[int, ...], ...]:
    """Consecutive chunks of `size` layers; the last one may be shorter (padded)."""
    return tuple(layers[i : i + size] for i in range(0, len(layers), size))


def kv_head_range(num_kv_heads: int, tp_size: int, tp_rank: int) -> tuple[int, int]:
    """(first head, count) of the KV heads rank `tp_rank` holds; replicated when tp > heads."""
    if tp_size <= num_kv_heads:
        per = num_kv_heads // tp_size
        return tp_rank * per, per
    return (tp_rank * num_kv_heads) // tp_size, 1


def _validate_tp(model: ModelConfig, tp_size: int, tp_rank: int, has_attn: bool,
                 has_mamba: bool) -> None:
    if tp_size < 1 or not 0 <= tp_rank < tp_size:
        raise ValueError(f"bad tensor parallel rank {tp_rank} of size {tp_size}")
    if has_attn:
        if model.num_attention_heads % tp_size:
            raise ValueError(
                f"num_attention_heads={model.num_attention_heads} is not divisible by "
                f"tp_size={tp_size}"
            )
        k = model.num_key_value_heads
        if k % tp_size and tp_size % k:
            raise ValueError(
                f"num_key_value_heads={k} is neither divisible by tp_size={tp_size} nor "
                f"replicable (tp_size % num_key_value_heads = {tp_size % k})"
            )
    if has_mamba:
        if model.mamba_num_heads % tp_size:
            raise ValueError(
                f"mamba_num_heads={model.mamba_num_heads} is not divisible by tp_size={tp_size}"
            )
        if model.n_groups % tp_size:
            raise ValueError(f"n_groups={model.n_groups} is not divisible by tp_size={tp_size}")


@dataclass(frozen=True)
class CacheGeometry:
    """Layout of one TP rank's pool. Build with `CacheGeometry.build(model, ...)`."""

    layer_pattern: str  # the model's layer kinds, e.g. "M-M*..." (hashed: must match)
    attention_groups: tuple[tuple[int, ...], ...]  # model layer indices per attention group
    mamba_groups: tuple[tuple[int, ...], ...]  # model layer indices per Mamba group
    group_size: int  # S = number of shared tensors (regions)
    tp_size: int
    tp_rank: int
    kernel_block_size: int  # kb: tokens per kernel block
    kv_dtype: str
    conv_dtype: str
    ssm_dtype: str
    # attention (zeros when the model has no attention layer)
    num_kv_heads: int  # total (TP = 1)
    kv_head_start: int  # first KV head this rank holds
    kv_heads_local: int
    head_dim: int
    # Mamba (zeros when the model has no Mamba layer)
    mamba_num_heads: int  # total (TP = 1)
    mamba_heads_local: int
    mamba_head_dim: int  # P
    ssm_state_size: int  # N
    n_groups: int  # total (TP = 1)
    conv_state_len: int  # K - 1
    x_channels_local: int  # d_inner / tp
    bc_channels_local: int  # n_groups * N / tp (each of B and C)

    # ---- construction ------------------------------------------------------------------------
    @classmethod
    def build(cls, model: ModelConfig, tp_size: int = 1, tp_rank: int = 0,
              kernel_block_size: int = 16, kv_dtype: str | None = None) -> CacheGeometry:
        attn = model.layers_of(LayerKind.ATTENTION)
        mamba = model.layers_of(LayerKind.MAMBA)
        if not attn and not mamba:
            raise ValueError("model has neither attention nor Mamba layers: nothing to cache")
        if kernel_block_size < 1:
            raise ValueError(f"kernel_block_size must be >= 1, got {kernel_block_size}")
        _validate_tp(model, tp_size, tp_rank, bool(attn), bool(mamba))
        size = min(n for n in (len(attn), len(mamba)) if n > 0)
        kv_start, kv_local = (
            kv_head_range(model.num_key_value_heads, tp_size, tp_rank) if attn else (0, 0)
        )
        return cls(
            layer_pattern=model.pattern,
            attention_groups=split_groups(attn, size),
            mamba_groups=split_groups(mamba, size),
            group_size=size,
            tp_size=tp_size,
            tp_rank=tp_rank,
            kernel_block_size=kernel_block_size,
            kv_dtype=canonical_dtype(kv_dtype or model.dtype),
            conv_dtype=canonical_dtype(model.dtype),
            ssm_dtype=canonical_dtype(model.ssm_state_dtype),
            num_kv_heads=model.num_key_value_heads if attn else 0,
            kv_head_start=kv_start,
            kv_heads_local=kv_local,
            head_dim=model.head_dim if attn else 0,
            mamba_num_heads=model.mamba_num_heads if mamba else 0,
            mamba_heads_local=model.mamba_num_heads // tp_size if mamba else 0,
            mamba_head_dim=model.mamba_head_dim if mamba else 0,
            ssm_state_size=model.ssm_state_size if mamba else 0,
            n_groups=model.n_groups if mamba else 0,
            conv_state_len=model.conv_kernel - 1 if mamba else 0,
            x_channels_local=model.d_inner // tp_size if mamba else 0,
            bc_channels_local=model.bc_dim // tp_size if mamba else 0,
        )

    def __post_init__(self) -> None:
        groups = self.attention_groups + self.mamba_groups
        if self.group_size < 1 or any(not 1 <= len(g) <= self.group_size for g in groups):
            raise ValueError(f"layer groups {groups} do not fit group size {self.group_size}")
        layers = [layer for g in groups for layer in g]
        if len(set(layers)) != len(layers):
            raise ValueError(f"a layer appears in two groups: {groups}")
        if self.tp_size < 1 or not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"bad tensor parallel rank {self.tp_rank} of size {self.tp_size}")
        if self.kernel_block_size < 1:
            raise ValueError(f"kernel_block_size must be >= 1, got {self.kernel_block_size}")
        for name in ("kv_dtype", "conv_dtype", "ssm_dtype"):
            if canonical_dtype(getattr(self, name)) != getattr(self, name):
                raise ValueError(f"{name}={getattr(self, name)!r} is not a canonical dtype name")
        if self.has_attention and min(self.kv_heads_local, self.head_dim) < 1:
            raise ValueError("attention layers need kv_heads_local >= 1 and head_dim >= 1")
        if self.has_attention and self.kv_head_start + self.kv_heads_local > self.num_kv_heads:
            raise ValueError(
                f"KV heads [{self.kv_head_start}, +{self.kv_heads_local}) exceed "
                f"num_kv_heads={self.num_kv_heads}"
            )
        mamba_sizes = (self.mamba_heads_local, self.mamba_head_dim, self.ssm_state_size,
                       self.conv_state_len, self.x_channels_local, self.bc_channels_local)
        if self.has_mamba and min(mamba_sizes) < 1:
            raise ValueError(f"Mamba layers need positive local sizes, got {mamba_sizes}")

    # ---- groups ------------------------------------------------------------------------------
    @property
    def has_attention(self) -> bool:
        return bool(self.attention_groups)

    @property
    def has_mamba(self) -> bool:
        return bool(self.mamba_groups)

    @property
    def num_regions(self) -> int:
        return self.group_size

    @property
    def num_groups(self) -> int:
        """Attention groups then Mamba groups: the order of block ids per group everywhere."""
        return len(self.attention_groups) + len(self.mamba_groups)

    def layer_location(self, layer_idx: int) -> tuple[int, int]:
        """(group index among the groups of the layer's kind, region index) of a cached layer."""
        for groups in (self.attention_groups, self.mamba_groups):
            for g, layers in enumerate(groups):
                if layer_idx in layers:
                    return g, layers.index(layer_idx)
        raise KeyError(f"layer {layer_idx} has no cache (not an attention or Mamba layer)")

    def is_attention_layer(self, layer_idx: int) -> bool:
        return any(layer_idx in g for g in self.attention_groups)

    def group_index(self, layer_idx: int) -> int:
        return self.layer_location(layer_idx)[0]

    # ---- attention page ----------------------------------------------------------------------
    @property
    def blocks_per_logical(self) -> int:
        """r: kernel blocks per logical block, the fewest whose page holds the Mamba page."""
        if not self.has_attention or not self.has_mamba:
            return 1
        return max(1, cdiv(self.mamba_page_bytes, self.kernel_page_bytes))

    @property
    def r(self) -> int:
        return self.blocks_per_logical

    @property
    def block_tokens(self) -> int:
        """T: tokens per logical block (= r * kb)."""
        return self.blocks_per_logical * self.kernel_block_size

    @property
    def kv_itemsize(self) -> int:
        return dtype_bytes(self.kv_dtype)

    @property
    def kv_row_bytes(self) -> int:
        """Bytes of one (head, K or V) row of a logical block: T * head_dim * kv bytes."""
        return self.block_tokens * self.head_dim * self.kv_itemsize

    @property
    def kv_head_bytes(self) -> int:
        """Bytes of one head (K row then V row) of a logical block."""
        return 2 * self.kv_row_bytes

    @property
    def kernel_page_bytes(self) -> int:
        return self.kernel_block_size * 2 * self.kv_heads_local * self.head_dim * self.kv_itemsize

    @property
    def attention_page_bytes(self) -> int:
        return self.kv_heads_local * self.kv_head_bytes

    def attn_blocks_for_tokens(self, num_tokens: int) -> int:
        """Logical blocks an attention group needs to hold `num_tokens` tokens."""
        return cdiv(num_tokens, self.block_tokens)

    # ---- Mamba page --------------------------------------------------------------------------
    @property
    def conv_itemsize(self) -> int:
        return dtype_bytes(self.conv_dtype)

    @property
    def ssm_itemsize(self) -> int:
        return dtype_bytes(self.ssm_dtype)

    @property
    def conv_channels_local(self) -> int:
        return self.x_channels_local + 2 * self.bc_channels_local

    @property
    def conv_channel_bytes(self) -> int:
        return self.conv_state_len * self.conv_itemsize

    @property
    def x_bytes(self) -> int:
        """xb: bytes of this rank's x channels of the conv state."""
        return self.x_channels_local * self.conv_channel_bytes

    @property
    def bc_bytes(self) -> int:
        """bb: bytes of this rank's B channels (same for C)."""
        return self.bc_channels_local * self.conv_channel_bytes

    @property
    def x_offset(self) -> int:
        return 0

    @property
    def b_offset(self) -> int:
        return self.x_bytes

    @property
    def c_offset(self) -> int:
        return self.x_bytes + self.bc_bytes

    @property
    def conv_bytes(self) -> int:
        return self.x_bytes + 2 * self.bc_bytes

    @property
    def ssm_offset(self) -> int:
        return align_up(self.conv_bytes, SSM_ALIGN)

    @property
    def ssm_head_bytes(self) -> int:
        return self.mamba_head_dim * self.ssm_state_size * self.ssm_itemsize

    @property
    def ssm_bytes(self) -> int:
        return self.mamba_heads_local * self.ssm_head_bytes

    @property
    def mamba_page_bytes(self) -> int:
        """Unpadded Mamba page: conv, alignment gap, SSM (0 without Mamba layers)."""
        return self.ssm_offset + self.ssm_bytes if self.has_mamba else 0

    # ---- unified page ------------------------------------------------------------------------
    @property
    def page_bytes(self) -> int:
        if self.has_attention:
            return self.blocks_per_logical * self.kernel_page_bytes
        return align_up(self.mamba_page_bytes, SSM_ALIGN)

    @property
    def block_bytes(self) -> int:
        """Bytes of one block id across all regions (S pages)."""
        return self.group_size * self.page_bytes

    def page_offset(self, block_id: int, region: int) -> int:
        """Byte offset of (block, region) from the buffer base."""
        return (block_id * self.group_size + region) * self.page_bytes

    # ---- compatibility -----------------------------------------------------------------------
    def compat_key(self) -> dict[str, object]:
        """What must match between P and D for bytes to mean the same thing.

        Hashed: layout version, conv layout, layer pattern (hence groups and S), full (TP = 1)
        head counts and sizes, dtypes. NOT hashed, because the planner translates them: TP size
        and rank, kernel block size, r, block_tokens, page_bytes, pool size.
        """
        return {
            "layout_version": LAYOUT_VERSION,
            "conv_layout": CONV_LAYOUT,
            "ssm_align": SSM_ALIGN,
            "layer_pattern": self.layer_pattern,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "mamba_num_heads": self.mamba_num_heads,
            "mamba_head_dim": self.mamba_head_dim,
            "ssm_state_size": self.ssm_state_size,
            "n_groups": self.n_groups,
            "conv_state_len": self.conv_state_len,
            "x_channels": self.x_channels_local * self.tp_size,
            "bc_channels": self.bc_channels_local * self.tp_size,
            "kv_dtype": self.kv_dtype,
            "conv_dtype": self.conv_dtype,
            "ssm_dtype": self.ssm_dtype,
        }

    def compat_hash(self) -> str:
        blob = json.dumps(self.compat_key(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()
