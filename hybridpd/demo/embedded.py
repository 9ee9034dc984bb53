"""The embedded demo models: the trained one shipped in the package, and cached random ones.

Owns where they live. `embedded_model_dir()` is the default model of `up` / `serve` / `LLM()`:
the checkpoint trained by `hybridpd train-demo` and shipped under `demo/assets/demo-model`
(read in place, never written). `random_model_dir()` is the random-weight `tiny` preset with a
fixed seed (shape tests and benchmarks), materialised once in `env.cache_dir()/models/tiny-
<version>`: written into a private temporary directory next to the target and renamed into
place, so a reader never sees a half-written model and two racing processes both end up with
the same complete directory. Must not know how models are written or trained.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

from hybridpd import env
from hybridpd.demo.presets import get_preset
from hybridpd.demo.tokenizer_files import CHAT_TEMPLATE, MERGE_WORDS, SPECIAL_TOKENS
from hybridpd.demo.writer import write_demo_model

EMBEDDED_PRESET = "tiny"
EMBEDDED_SEED = 1234
FORMAT_VERSION = 1  # bump when the writer's output for the same inputs changes


def embedded_version() -> str:
    """Short fingerprint of everything that determines the embedded model's bytes."""
    spec = {
        "format": FORMAT_VERSION,
        "preset": asdict(get_preset(EMBEDDED_PRESET)),
        "seed": EMBEDDED_SEED,
        "tokenizer": [SPECIAL_TOKENS, MERGE_WORDS, CHAT_TEMPLATE],
    }
    blob = json.dumps(spec, sort_keys=True, default=str).encode()
    return f"v{FORMAT_VERSION}-{hashlib.sha256(blob).hexdigest()[:10]}"


SHIPPED_DIR = Path(__file__).resolve().parent / "assets" / "demo-model"
SHIPPED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


class MissingDemoModelError(FileNotFoundError):
    """The package was installed without the trained demo model's files."""


def embedded_model_dir() -> Path:
    """Directory of the trained demo model shipped with the package (read-only use)."""
    missing = [n for n in SHIPPED_FILES if not (SHIPPED_DIR / n).is_file()]
    if missing:
        raise MissingDemoModelError(
            f"the shipped demo model lacks {', '.join(missing)} in {SHIPPED_DIR}; reinstall "
            f"hybridpd, or train one with `hybridpd train-demo --out DIR` and pass --model DIR")
    return SHIPPED_DIR


def random_model_dir() -> Path:
    """Directory of the random-weight `tiny` demo model, written on first use and reused."""
    models = env.cache_dir() / "models"
    final = models / f"{EMBEDDED_PRESET}-{embedded_version()}"
    if (final / "config.json").is_file():
        return final
    models.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=models))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        write_demo_model(tmp, EMBEDDED_PRESET, seed=EMBEDDED_SEED, overwrite=True)
        try:
            os.rename(tmp, final)  # atomic; fails if another process got there first
        except OSError:
            if not (final / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
