"""`hybridpd generate` as a user runs it: a real subprocess, JSON on stdout."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from hybridpd.engine.args import EngineArgs
from hybridpd.engine.core import Engine
from hybridpd.engine.protocol import GenerateRequest

from .pd_helpers import greedy, run_all, tokens


def _generate(*args: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "hybridpd.cli", "generate", "--device", "cpu",
         "--cache-memory", str(8 << 20), "--json", *args],
        capture_output=True, text=True, env=env, timeout=300, check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_generate_prompt_ids_json(tiny_model):
    doc = _generate("--model", tiny_model, "--prompt-ids", "5,6,7,8", "--max-tokens", "6",
                    "--ignore-eos")
    assert doc["prompt_token_ids"] == [5, 6, 7, 8]  # fed as given, no BOS
    eng = Engine(EngineArgs(model_dir=tiny_model, device="cpu", cache_memory=8 << 20))
    want = tokens(run_all(eng, [GenerateRequest("x", (5, 6, 7, 8), greedy(6))])["x"])
    eng.shutdown()
    assert doc["token_ids"] == want and doc["finish_reason"] == "length"
    assert isinstance(doc["text"], str)


def test_generate_text_prompt_tokenized_like_transformers(tiny_model):
    from transformers import AutoTokenizer

    text = "Hybrid models: Mamba2 + attention, ünïcödé 🚀"
    doc = _generate("--model", tiny_model, "--prompt", text, "--max-tokens", "3")
    assert doc["prompt_token_ids"] == AutoTokenizer.from_pretrained(tiny_model)(text).input_ids
    assert 1 <= len(doc["token_ids"]) <= 3


def test_generate_bad_prompt_ids_is_a_clear_error(tiny_model):
    out = subprocess.run(
        [sys.executable, "-m", "hybridpd.cli", "generate", "--model", tiny_model,
         "--device", "cpu", "--prompt-ids", "1,x,3"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode != 0 and "--prompt-ids" in out.stderr
