"""The pool's memory: one zeroed uint8 buffer per rank and typed strided views into it.

Owns `PoolTensors` (the buffer `uint8[num_blocks, S, page_bytes]` plus per-layer views laid out
as `CacheGeometry` says) and `num_blocks_for_budget`. Implements the model's `CacheViews`
protocol structurally. Knows nothing of requests, block allocation, the model code or NIXL.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from hybridpd.cache.geometry import CacheGeometry

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def num_blocks_for_budget(geometry: CacheGeometry, budget_bytes: int) -> int:
    """Blocks (null block included) whose S pages fit in `budget_bytes`."""
    return max(0, int(budget_bytes) // geometry.block_bytes)


class PoolTensors:
    """One rank's page pool. Every view aliases `buffer`; none copies."""

    def __init__(self, geometry: CacheGeometry, num_blocks: int,
                 device: torch.device | str = "cpu") -> None:
        if num_blocks < 2:
            raise ValueError(f"a pool needs at least 2 blocks (null + 1), got {num_blocks}")
        self.geometry = geometry
        self.num_blocks = num_blocks
        # (num_blocks, S, page_bytes) uint8: shared tensor i is buffer[:, i, :]
        self.buffer = torch.zeros(
            (num_blocks, geometry.num_regions, geometry.page_bytes), dtype=torch.uint8,
            device=device,
        )
        self._views: dict[tuple[str, int], torch.Tensor] = {}

    @property
    def nbytes(self) -> int:
        return self.buffer.numel()

    def data_ptr(self) -> int:
        return self.buffer.data_ptr()

    def copy_blocks(self, src: list[int], dst: list[int]) -> None:
        """Copy blocks src[i] -> dst[i] whole (every region's page): one gather, one scatter.
        The dst ids must be distinct and disjoint from src."""
        dev = self.buffer.device
        s = torch.tensor(src, dtype=torch.int64).to(dev, non_blocking=True)
        d = torch.tensor(dst, dtype=torch.int64).to(dev, non_blocking=True)
        self.buffer.index_copy_(0, d, self.buffer.index_select(0, s))

    def group_index(self, layer_idx: int) -> int:
        """Index of the layer's group among the groups of its kind."""
        return self.geometry.group_index(layer_idx)

    def _typed(self, region: int, offset: int, nbytes: int, dtype: str) -> torch.Tensor:
        """(num_blocks, nbytes // itemsize) view of bytes [offset, offset+nbytes) of a region."""
        tdtype = TORCH_DTYPES[dtype]
        size = torch.empty((), dtype=tdtype).element_size()
        if offset % size or nbytes % size or self.geometry.page_bytes % size:
            raise ValueError(f"range ({offset}, {nbytes}) is not aligned to {dtype}")
        typed = self.buffer.view(tdtype)  # (num_blocks, S, page_bytes // size)
        return typed[:, region, offset // size : (offset + nbytes) // size]

    def _cached(self, kind: str, layer_idx: int,
                make: Callable[[], torch.Tensor]) -> torch.Tensor:
        key = (kind, layer_idx)
        if key not in self._views:
            self._views[key] = make()
        return self._views[key]

    def kv_view(self, layer_idx: int) -> torch.Tensor:
        """(num_blocks, Hkv_local, 2, block_tokens, head_dim) in the KV dtype."""
        geo = self.geometry
        if not geo.is_attention_layer(layer_idx):
            raise KeyError(f"layer {layer_idx} is not an attention layer")
        _, region = geo.layer_location(layer_idx)

        def make() -> torch.Tensor:
            flat = self._typed(region, 0, geo.attention_page_bytes, geo.kv_dtype)
            shape = (geo.kv_heads_local, 2, geo.block_tokens, geo.head_dim)
            return flat.unflatten(-1, shape)

        return self._cached("kv", layer_idx, make)

    def conv_view(self, layer_idx: int) -> torch.Tensor:
        """(num_blocks, conv_dim_local, K-1) in the model dtype; channels x | B | C."""
        geo = self._mamba_geometry(layer_idx)
        _, region = geo.layer_location(layer_idx)

        def make() -> torch.Tensor:
            flat = self._typed(region, 0, geo.conv_bytes, geo.conv_dtype)
            return flat.unflatten(-1, (geo.conv_channels_local, geo.conv_state_len))

        return self._cached("conv", layer_idx, make)

    def ssm_view(self, layer_idx: int) -> torch.Tensor:
        """(num_blocks, H_local, P, N) in the SSM dtype."""
        geo = self._mamba_geometry(layer_idx)
        _, region = geo.layer_location(layer_idx)

        def make() -> torch.Tensor:
            flat = self._typed(region, geo.ssm_offset, geo.ssm_bytes, geo.ssm_dtype)
            shape = (geo.mamba_heads_local, geo.mamba_head_dim, geo.ssm_state_size)
            return flat.unflatten(-1, shape)

        return self._cached("ssm", layer_idx, make)

    def _mamba_geometry(self, layer_idx: int) -> CacheGeometry:
        if not any(layer_idx in g for g in self.geometry.mamba_groups):
            raise KeyError(f"layer {layer_idx} is not a Mamba layer")
        return self.geometry
