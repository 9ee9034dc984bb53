"""Write a complete random-weight Hugging Face checkpoint directory for a preset.

Owns the order of operations: tokenizer files first (their size fixes the vocab of presets
without one), then `config.json`, then the weights streamed into (possibly sharded) safetensors.
Must not know weight-init details (`weights.py`), the file format (`shards.py`) or the tokenizer
internals (`tokenizer_files.py`); it is not atomic (see `embedded.py` for that).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hybridpd.demo.presets import Preset, get_preset, hf_config, resolve_vocab_size
from hybridpd.demo.shards import DEFAULT_MAX_SHARD_BYTES, INDEX_FILE, write_sharded
from hybridpd.demo.tokenizer_files import TokenizerInfo, write_tokenizer_files
from hybridpd.demo.weights import TensorSpec, draw_chunks, tensor_specs
from hybridpd.progress import Progress

MANAGED_SUFFIXES = (".safetensors", ".json")


@dataclass(frozen=True)
class DemoModelInfo:
    path: Path
    preset: str
    num_layers: int
    vocab_size: int
    tokenizer_size: int
    num_params: int
    total_bytes: int
    weight_files: tuple[str, ...]


def _prepare_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} is not empty (pass overwrite=True / --overwrite)")
        for child in out.iterdir():  # drop stale shards / index / configs we would rewrite
            if child.is_file() and child.name.endswith(MANAGED_SUFFIXES):
                child.unlink()
    out.mkdir(parents=True, exist_ok=True)


def demo_config(
    preset: Preset, tok: TokenizerInfo, *, num_layers: int | None = None, dtype: str | None = None
) -> dict[str, Any]:
    """The config.json dict of `preset` with the demo tokenizer described by `tok`."""
    return hf_config(
        preset,
        vocab_size=resolve_vocab_size(preset, tok.size),
        bos_token_id=tok.bos_token_id,
        eos_token_ids=list(tok.eos_token_ids),
        pad_token_id=tok.pad_token_id,
        num_layers=num_layers,
        dtype=dtype,
    )


def write_demo_model(
    out_dir: str | Path,
    preset: str = "tiny",
    *,
    seed: int = 0,
    num_layers: int | None = None,
    dtype: str | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
    progress: bool = False,
) -> DemoModelInfo:
    """Write config.json, tokenizer files and seeded random weights of `preset` into `out_dir`.

    `num_layers` keeps the first N layers of the preset's pattern; `dtype` overrides the
    preset's weight dtype (float32, float16, bfloat16). Same arguments -> identical bytes.
    `progress`: a progress line on stderr while the weights are drawn and written.
    """
    p = get_preset(preset)
    out = Path(out_dir)
    _prepare_dir(out, overwrite)
    tok = write_tokenizer_files(out, model_max_length=p.max_position_embeddings)
    cfg = demo_config(p, tok, num_layers=num_layers, dtype=dtype)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    specs = tensor_specs(cfg)
    with Progress("Writing weights", sum(s.nbytes for s in specs), "B", enabled=progress) as bar:

        def drawn(spec: TensorSpec) -> Iterator[torch.Tensor]:
            yield from draw_chunks(spec, seed)
            bar.update(spec.nbytes)

        files = write_sharded(out, specs, drawn, max_shard_bytes)
    return DemoModelInfo(
        path=out,
        preset=p.name,
        num_layers=cfg["num_hidden_layers"],
        vocab_size=cfg["vocab_size"],
        tokenizer_size=tok.size,
        num_params=sum(s.numel for s in specs),
        total_bytes=sum(s.nbytes for s in specs),
        weight_files=tuple(files) + ((INDEX_FILE,) if len(files) > 1 else ()),
    )
