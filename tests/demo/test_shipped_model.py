"""The trained demo model shipped in the package: it is the default, transformers and our
engine compute the same logits from it (fp32), it answers held-out questions, and using it
writes nothing into the package directory."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from hybridpd.demo import embedded  # noqa: E402
from hybridpd.demo import tasks as T  # noqa: E402
from hybridpd.demo.train import Encoder  # noqa: E402

torch.set_num_threads(1)


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """Relative L2 error, the measure the engine-vs-transformers tests use (fp32)."""
    return float((got - want).norm() / want.norm())

MODEL = embedded.SHIPPED_DIR


def _snapshot(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")}


def test_default_model_is_the_shipped_trained_one() -> None:
    assert embedded.embedded_model_dir() == MODEL
    cfg = json.loads((MODEL / "config.json").read_text())
    pattern = cfg["hybrid_override_pattern"]
    assert set(pattern) == {"M", "*", "-", "E"} and pattern.count("M") >= 2  # every layer kind
    assert cfg["num_key_value_heads"] < cfg["num_attention_heads"] and cfg["n_groups"] >= 2
    for tp in (1, 2, 4):  # shapes every TP size of the e2e tests can shard
        assert cfg["n_groups"] % tp == 0 and cfg["mamba_num_heads"] % tp == 0
        assert cfg["num_attention_heads"] % tp == 0 and cfg["intermediate_size"] % tp == 0
        assert cfg["moe_intermediate_size"] % tp == 0
        assert cfg["moe_shared_expert_intermediate_size"] % tp == 0
        assert tp % cfg["num_key_value_heads"] == 0 or cfg["num_key_value_heads"] % tp == 0
    training = json.loads((MODEL / "training.json").read_text())
    assert training["num_params"] <= 10_000_000


def test_missing_shipped_files_are_one_clear_error(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(embedded, "SHIPPED_DIR", tmp_path)
    with pytest.raises(embedded.MissingDemoModelError, match="train-demo"):
        embedded.embedded_model_dir()


def test_transformers_and_our_engine_agree_and_answer_held_out_questions() -> None:
    from transformers import AutoModelForCausalLM

    from hybridpd.engine.llm import LLM, greedy

    before = _snapshot(MODEL.parent)
    ref, info = AutoModelForCausalLM.from_pretrained(MODEL, output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    ref.eval()
    problems = T.held_out(24, seed=11)
    enc = Encoder()
    llm = LLM(device="cpu", dtype="float32", cache_memory=16 << 20)  # no model: the default
    try:
        assert Path(llm.model_dir) == MODEL
        sampler = llm.engine.executor.worker.runner.sampler
        rows: list[torch.Tensor] = []
        inner = sampler.sample

        def sample(logits, params, output_index):
            rows.append(logits.detach().float().clone())
            return inner(logits, params, output_index)

        sampler.sample = sample
        first = problems[0]
        ids, _ = enc.encode(first)
        prompt = enc.tok.encode(first.prompt).ids
        llm.generate([prompt], greedy(1))
        with torch.no_grad():
            want = ref(torch.tensor([ids[: len(prompt)]]), use_cache=False).logits[0, -1]
        assert _rel_err(rows[0][0], want.float()) < 1e-4
        assert int(rows[0][0].argmax()) == int(want.argmax())
        sampler.sample = inner
        outs = llm.generate([p.prompt for p in problems], greedy(16))
    finally:
        llm.close()
    right = sum(o.text == p.answer for o, p in zip(outs, problems))
    assert right >= 22, [(p.prompt, o.text) for o, p in zip(outs, problems)]
    assert _snapshot(MODEL.parent) == before  # loading wrote nothing into the package
