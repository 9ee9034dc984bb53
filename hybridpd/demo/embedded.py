"""The embedded demo model: the `tiny` preset with a fixed seed, materialised once in the cache.

Owns where the embedded model lives (`env.cache_dir()/models/tiny-<version>`) and creating it
safely: it is written into a private temporary directory next to the target and renamed into
place, so a reader never sees a half-written model and two racing processes both end up with
the same complete directory. Must not know how the model is written (see `writer.py`).
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


def embedded_model_dir() -> Path:
    """Directory of the embedded demo model, written on first use and reused afterwards."""
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
