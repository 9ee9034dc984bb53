"""`hybridpd bench engine` on CPU: the tiny preset end to end, its JSON, and its errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hybridpd.bench import engine_bench
from hybridpd.cli import main as cli_main

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def test_tiny_cpu_run_writes_every_field(tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    proc = subprocess.run(
        [sys.executable, "-m", "hybridpd.cli", "bench", "engine", "--preset", "tiny",
         "--device", "cpu", "--json", str(out), "--batch-sizes", "1", "3",
         "--prefill-lens", "40", "--decode-steps", "3", "--prefill-iters", "1"],
        capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(out.read_text())
    assert data["device"] == "cpu"
    assert data["copy_gbps"] > 0 and data["gemm_tflops"] > 0
    decode = [m for m in data["measurements"] if m["kind"] == "decode"]
    prefill = [m for m in data["measurements"] if m["kind"] == "prefill"]
    assert [m["batch_size"] for m in decode] == [1, 3]
    assert [m["tokens"] for m in prefill] == [40]
    for m in decode:
        assert m["ms_per_step"] > 0 and 0 < m["mbu"]
        assert m["tok_per_s"] == pytest.approx(1e3 * m["batch_size"] / m["ms_per_step"])
        want = m["bytes_per_step"] / (m["ms_per_step"] / 1e3) / (data["copy_gbps"] * 1e9)
        assert m["mbu"] == pytest.approx(want)
    assert prefill[0]["tok_per_s"] > 0 and prefill[0]["mfu"] > 0
    assert "decode  auto+eager" in proc.stdout


def test_decode_bytes_grow_with_batch_and_context() -> None:
    cfg = engine_bench.preset_config("small", None, "float32")
    model = engine_bench.build_model(cfg, torch.device("cpu"), 0, None)
    from hybridpd.cache.geometry import CacheGeometry

    geo = CacheGeometry.build(cfg)
    one = engine_bench.decode_step_bytes(model, cfg, geo, 1, 100)
    assert engine_bench.decode_step_bytes(model, cfg, geo, 8, 100) > one
    assert engine_bench.decode_step_bytes(model, cfg, geo, 1, 1000) > one
    total, experts, _ = engine_bench._param_bytes(model)
    assert 0 < experts < total
    assert one < total  # batch 1 touches 2 of 8 experts per MoE layer, not all of them


@pytest.mark.parametrize("argv,message", [
    (["--variants", "fast+graphs"], "kernels must be auto or reference"),
    (["--batch-sizes", "0"], "must be >= 1"),
    (["--preset", "no-such"], "unknown preset"),
])
def test_bad_configuration_is_one_line(argv, message, capsys) -> None:
    code = cli_main(["bench", "engine", "--device", "cpu", *argv])
    assert code == 2
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("hybridpd bench engine:") and message in out[0]


def test_transformers_out_of_memory_is_recorded_not_fatal(monkeypatch) -> None:
    """transformers' torch fallbacks can run a GPU out of memory at big batches (64 × 128
    tokens asked for 64 GiB on an H200): that measurement says so, the others still run."""
    import argparse

    from hybridpd.bench import engine_bench as eb

    def generate(hf, batch, prompt_len, new_tokens, device):
        if batch == 2:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return 0.01 * new_tokens

    monkeypatch.setattr(eb, "transformers_model", lambda model, cfg, device: (None, 1, 0))
    monkeypatch.setattr(eb, "hf_generate_s", generate)
    res = eb.BenchResult("cpu", "cpu", "tiny", "float32", 1, 1.0, 1.0, 1)
    args = argparse.Namespace(decode_steps=2, batch_sizes=[1, 2, 4], context_len=4,
                              prefill_lens=[8])
    eb._compare_transformers(args, None, None, torch.device("cpu"), res)
    got = [(m["kind"], m.get("batch_size"), m.get("error")) for m in res.measurements]
    assert got == [("decode", 1, None), ("decode", 2, "out of memory"), ("decode", 4, None),
                   ("prefill", None, None)]
    assert res.measurements[0]["ms_per_step"] == pytest.approx(10.0)  # (t(3) - t(1)) / 2
