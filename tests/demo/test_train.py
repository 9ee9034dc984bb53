"""The training script: a few steps on a tiny config give a checkpoint that our loader and
transformers both load (same logits), the same spec gives the same bytes, bad input is refused."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from hybridpd.demo import tasks as T  # noqa: E402
from hybridpd.demo.train import TRAINING_FILE, Encoder, TrainSpec, train  # noqa: E402

torch.set_num_threads(1)


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """Relative L2 error, the measure the engine-vs-transformers tests use (fp32)."""
    return float((got - want).norm() / want.norm())

QUICK = TrainSpec(preset="tiny", steps=4, batch_size=8, warmup_steps=2, seed=5)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train") / "m"
    result = train(QUICK, out, threads=1, eval_num=16, log=lambda _: None)
    assert result.path == out and result.num_params > 0
    assert set(result.held_out) == {t.value for t in T.Task} | {"all"}
    return out


def _assert_loads_alike(trained: Path) -> None:
    """Both loaders read every tensor of `trained`, and their last-position logits agree."""
    from transformers import AutoModelForCausalLM

    from hybridpd.engine.args import EngineArgs
    from hybridpd.engine.core import Engine
    from hybridpd.engine.protocol import GenerateRequest
    from hybridpd.request import SamplingParams

    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 TRAINING_FILE):
        assert (trained / name).is_file(), name
    ref, info = AutoModelForCausalLM.from_pretrained(trained, output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    ids, _ = Encoder().encode(T.held_out(1, seed=3)[0])
    with torch.no_grad():
        want = ref.eval()(torch.tensor([ids]), use_cache=False).logits[0, -1].float()

    eng = Engine(EngineArgs(model_dir=str(trained), device="cpu", dtype="float32",
                            cache_memory=8 << 20))
    sampler = eng.executor.worker.runner.sampler
    rows: list[torch.Tensor] = []
    inner = sampler.sample

    def sample(logits, params, output_index):
        rows.append(logits.detach().float().clone())
        return inner(logits, params, output_index)

    sampler.sample = sample
    eng.add_request(GenerateRequest("a", tuple(ids), SamplingParams(max_tokens=1,
                                                                     temperature=0.0)))
    for _ in range(100):
        if any(o.finished for o in eng.step()):
            break
    eng.shutdown()
    assert rows and _rel_err(rows[0][0], want) < 1e-4
    assert int(rows[0][0].argmax()) == int(want.argmax())


def test_checkpoint_loads_in_transformers_and_in_our_model_alike(trained: Path) -> None:
    _assert_loads_alike(trained)


def test_the_shipped_shape_with_its_moe_layer_saves_and_loads_alike(tmp_path: Path) -> None:
    """The `demo` preset has a MoE layer: transformers trains its experts fused, the
    checkpoint names one matrix per expert, and both loaders agree on the result."""
    spec = TrainSpec(preset="demo", steps=2, batch_size=8, warmup_steps=1, seed=5)
    out = train(spec, tmp_path / "moe", threads=1, eval_num=8, log=lambda _: None).path
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert any(".experts.3.down_proj.weight" in k for k in f.keys())
    _assert_loads_alike(out)


def test_same_spec_same_bytes_and_a_different_seed_differs(trained: Path, tmp_path: Path
                                                            ) -> None:
    again = train(QUICK, tmp_path / "again", threads=1, eval_num=16, log=lambda _: None).path
    other = train(TrainSpec(**{**QUICK.__dict__, "seed": 6}), tmp_path / "other", threads=1,
                  eval_num=16, log=lambda _: None).path
    weights = (trained / "model.safetensors").read_bytes()
    assert (again / "model.safetensors").read_bytes() == weights
    assert (other / "model.safetensors").read_bytes() != weights


def test_bad_input_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="steps"):
        train(TrainSpec(steps=0), tmp_path / "x")
    with pytest.raises(ValueError, match="unknown preset"):
        train(TrainSpec(preset="nope"), tmp_path / "x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        train(QUICK, tmp_path / "full")
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]
    cli = subprocess.run([sys.executable, "-m", "hybridpd.cli", "train-demo", "--out",
                          str(tmp_path / "y"), "--tasks", "add,mul"],
                         capture_output=True, text=True, timeout=120)
    assert cli.returncode == 2
    assert cli.stderr.strip().splitlines() == [
        "hybridpd train-demo: error: unknown task 'mul'; choose from "
        "['add', 'copy', 'count', 'reverse']"]
