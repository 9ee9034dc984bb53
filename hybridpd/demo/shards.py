"""Streaming safetensors writer: shard planning, headers, index file.

Owns the safetensors byte format (8-byte little-endian header length, JSON header, raw
row-major little-endian data) written tensor by tensor and chunk by chunk, so memory stays at
one chunk whatever the model size, and the Hugging Face shard naming / index file. Must not
know what the tensors mean or how their values are drawn (it is given chunk iterators).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import torch

from hybridpd.demo.weights import TensorSpec

DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
ST_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
HEADER_ALIGN = 8

ChunkSource = Callable[[TensorSpec], Iterable[torch.Tensor]]


def plan_shards(specs: Sequence[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Greedy split in order; a tensor larger than the limit gets a shard of its own."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def shard_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE_FILE]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def _header(specs: Sequence[TensorSpec]) -> bytes:
    meta: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in specs:
        meta[spec.name] = {
            "dtype": ST_DTYPES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    raw = json.dumps(meta, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % HEADER_ALIGN)
    return len(raw).to_bytes(8, "little") + raw


def _chunk_bytes(chunk: torch.Tensor) -> bytes:
    flat = chunk.contiguous().reshape(-1)
    if flat.dtype in (torch.bfloat16, torch.float16):
        flat = flat.view(torch.int16)  # numpy has no bfloat16; the bytes are what matter
    return flat.numpy().tobytes()


def _checked(spec: TensorSpec, chunks: Iterable[torch.Tensor]) -> Iterator[bytes]:
    written = 0
    for chunk in chunks:
        data = _chunk_bytes(chunk)
        written += len(data)
        yield data
    if written != spec.nbytes:
        raise RuntimeError(f"{spec.name}: wrote {written} bytes, expected {spec.nbytes}")


def write_file(path: Path, specs: Sequence[TensorSpec], source: ChunkSource) -> None:
    """One safetensors file holding `specs` in order, values streamed from `source`."""
    with open(path, "wb") as f:
        f.write(_header(specs))
        for spec in specs:
            for data in _checked(spec, source(spec)):
                f.write(data)


def write_sharded(
    out_dir: Path,
    specs: Sequence[TensorSpec],
    source: ChunkSource,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> list[str]:
    """Write all tensors; with more than one shard also the index. Returns the file names."""
    shards = plan_shards(specs, max_shard_bytes)
    names = shard_names(len(shards))
    for name, shard in zip(names, shards):
        write_file(out_dir / name, shard, source)
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(s.nbytes for s in specs)},
            "weight_map": {s.name: n for n, shard in zip(names, shards) for s in shard},
        }
        (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return names
