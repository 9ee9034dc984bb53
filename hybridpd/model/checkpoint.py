"""Reading a Hugging Face safetensors checkpoint directory by tensor name.

Owns: finding the `*.safetensors` files (one file, or shards listed by
`model.safetensors.index.json`), lazy per-name (and per-slice) reads cast to the model dtype,
name normalisation (`backbone.` is canonical; transformers' in-memory `model.` prefix is
accepted), the two MoE expert layouts (per expert `experts.{j}.up_proj.weight`, or fused
`experts.up_proj` of shape (E, out, in)), and the error naming every missing tensor.
Must not know: model classes, layer kinds or tensor parallelism (callers pass row/column ranges).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

CANONICAL_PREFIX = "backbone."
ALIAS_PREFIXES = ("model.",)
INDEX_FILE = "model.safetensors.index.json"
_PER_EXPERT = re.compile(r"^(?P<head>.*\.experts)\.(?P<idx>\d+)\.(?P<proj>\w+)\.weight$")

Ranges = Sequence[tuple[int, int]]


class MissingWeightsError(KeyError):
    """Raised when a checkpoint lacks tensors the model needs; lists every missing name."""

    def __init__(self, model_dir: str, missing: Sequence[str]) -> None:
        self.missing = tuple(missing)
        shown = ", ".join(self.missing[:20])
        more = f" (+{len(self.missing) - 20} more)" if len(self.missing) > 20 else ""
        super().__init__(
            f"checkpoint {model_dir} is missing {len(self.missing)} tensor(s): {shown}{more}"
        )

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def _canonical(name: str) -> str:
    for alias in ALIAS_PREFIXES:
        if name.startswith(alias):
            return CANONICAL_PREFIX + name[len(alias):]
    return name


def _shard_files(model_dir: Path) -> list[Path]:
    index = model_dir / INDEX_FILE
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        return sorted({model_dir / f for f in weight_map.values()})
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {model_dir}")
    return files


class CheckpointReader:
    """Lazy name -> tensor access over a checkpoint directory. Use as a context manager."""

    def __init__(self, model_dir: str | Path, dtype: torch.dtype, device: torch.device) -> None:
        self.model_dir = Path(model_dir)
        self.dtype = dtype
        self.device = device
        self._stack = ExitStack()
        self._where: dict[str, tuple[Any, str]] = {}  # canonical name -> (handle, stored name)
        for path in _shard_files(self.model_dir):
            handle = self._stack.enter_context(safe_open(str(path), framework="pt"))
            for stored in handle.keys():
                self._where.setdefault(_canonical(stored), (handle, stored))

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stack.close()

    # ---- names -------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return sorted(self._where)

    def _fused_source(self, name: str) -> tuple[str, int] | None:
        """For a per-expert name absent as such: (fused tensor name, expert index) if stored."""
        m = _PER_EXPERT.match(name)
        if m is None:
            return None
        head, proj = m.group("head"), m.group("proj")
        for fused in (f"{head}.{proj}", f"{head}.{proj}.weight"):
            if fused in self._where:
                return fused, int(m.group("idx"))
        return None

    def has(self, name: str) -> bool:
        name = _canonical(name)
        return name in self._where or self._fused_source(name) is not None

    def require(self, names: Iterable[str]) -> None:
        """Raise `MissingWeightsError` naming every tensor of `names` the checkpoint lacks."""
        missing = [n for n in names if not self.has(n)]
        if missing:
            raise MissingWeightsError(str(self.model_dir), missing)

    # ---- reads -------------------------------------------------------------------------------
    def shape(self, name: str) -> tuple[int, ...]:
        name = _canonical(name)
        if name in self._where:
            handle, stored = self._where[name]
            return tuple(handle.get_slice(stored).get_shape())
        fused = self._fused_source(name)
        if fused is None:
            raise MissingWeightsError(str(self.model_dir), [name])
        handle, stored = self._where[fused[0]]
        return tuple(handle.get_slice(stored).get_shape()[1:])

    def read(
        self, name: str, dim: int = 0, ranges: Ranges | None = None,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """The tensor `name`, or the concatenation of `ranges` along `dim`; cast and moved.

        Only the requested ranges are read from disk (safetensors slices).
        """
        name = _canonical(name)
        if name in self._where:
            handle, stored = self._where[name]
            prefix: tuple[Any, ...] = ()
        else:
            fused = self._fused_source(name)
            if fused is None:
                raise MissingWeightsError(str(self.model_dir), [name])
            handle, stored = self._where[fused[0]]
            prefix = (fused[1],)
        sl = handle.get_slice(stored)
        ndim = len(sl.get_shape()) - len(prefix)
        if ranges is None:
            parts = [sl[prefix] if prefix else sl[:]]
        else:
            parts = []
            for start, stop in ranges:
                index = [slice(None)] * ndim
                index[dim] = slice(start, stop)
                parts.append(sl[tuple(prefix) + tuple(index)])
        out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)
        return out.to(device=self.device, dtype=dtype or self.dtype).contiguous()
