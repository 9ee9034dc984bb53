"""Written checkpoints load into transformers with every key used, and are reproducible."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402

from hybridpd.demo.shards import INDEX_FILE, SINGLE_FILE  # noqa: E402
from hybridpd.demo.writer import write_demo_model  # noqa: E402

torch.set_num_threads(1)


def _load(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    assert info["mismatched_keys"] == set() and not info["error_msgs"]
    return model.eval()


def _file_tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys()})  # noqa: SIM118
    return out


def _finite_logits(model: torch.nn.Module, vocab: int) -> torch.Tensor:
    ids = torch.tensor([[1, 40, 300, 7, 99, 250, 12, 5]])
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits
    assert logits.shape == (1, ids.shape[1], vocab)
    assert torch.isfinite(logits.float()).all()
    assert logits.float().std() > 0.1  # not a degenerate constant output
    return logits


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


def test_tiny_loads_exactly_and_gives_finite_logits(tmp_path: Path) -> None:
    info = write_demo_model(tmp_path / "m", "tiny", seed=5)
    assert info.weight_files == (SINGLE_FILE,)
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["vocab_size"] >= info.tokenizer_size and cfg["vocab_size"] % 64 == 0
    model = _load(tmp_path / "m")
    _finite_logits(model, cfg["vocab_size"])
    # every loaded parameter is the written value (nothing re-initialised after loading)
    state = model.state_dict()
    written = _file_tensors(tmp_path / "m")
    assert len(written) == len(state)
    for name, tensor in written.items():
        assert torch.equal(state[name.replace("backbone.", "model.", 1)], tensor), name


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path: Path) -> None:
    a = write_demo_model(tmp_path / "a", "tiny", seed=1).path
    b = write_demo_model(tmp_path / "b", "tiny", seed=1).path
    c = write_demo_model(tmp_path / "c", "tiny", seed=2).path
    assert _digest(a) == _digest(b)
    ta, tc = _file_tensors(a), _file_tensors(c)
    assert not torch.equal(ta["lm_head.weight"], tc["lm_head.weight"])


def test_sharded_output_has_consistent_index(tmp_path: Path) -> None:
    info = write_demo_model(tmp_path / "m", "tiny", max_shard_bytes=150_000)
    shards = [f for f in info.weight_files if f != INDEX_FILE]
    assert len(shards) > 2 and INDEX_FILE in info.weight_files
    index = json.loads((tmp_path / "m" / INDEX_FILE).read_text())
    for name, file in index["weight_map"].items():
        with safe_open(str(tmp_path / "m" / file), framework="pt") as st:
            assert name in st.keys()  # noqa: SIM118
    sizes = sum(t.numel() * t.element_size() for t in _file_tensors(tmp_path / "m").values())
    assert index["metadata"]["total_size"] == sizes == info.total_bytes
    assert not (tmp_path / "m" / SINGLE_FILE).exists()
    _finite_logits(_load(tmp_path / "m"), info.vocab_size)


def test_moe_preset_cut_to_few_layers_loads(tmp_path: Path) -> None:
    info = write_demo_model(tmp_path / "m", "small", num_layers=5, dtype="bfloat16")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["hybrid_override_pattern"] == "MEM*E" and cfg["dtype"] == "bfloat16"
    written = _file_tensors(tmp_path / "m")
    assert written["backbone.layers.1.mixer.experts.7.up_proj.weight"].dtype == torch.bfloat16
    assert written["backbone.layers.1.mixer.gate.weight"].dtype == torch.float32
    assert "backbone.layers.5.norm.weight" not in written
    _finite_logits(_load(tmp_path / "m"), info.vocab_size)


def test_refuses_non_empty_dir_unless_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "m"
    write_demo_model(out, "tiny", max_shard_bytes=150_000)
    with pytest.raises(FileExistsError, match="not empty"):
        write_demo_model(out, "tiny")
    (out / "notes.txt").write_text("keep me")
    write_demo_model(out, "tiny", overwrite=True)  # now a single file: stale shards must go
    assert sorted(p.name for p in out.glob("*.safetensors")) == [SINGLE_FILE]
    assert not (out / INDEX_FILE).exists() and (out / "notes.txt").read_text() == "keep me"


def test_nemotron_h_8b_cut_to_three_layers_loads(tmp_path: Path) -> None:
    out = tmp_path / "h8"
    try:
        info = write_demo_model(out, "nemotron-h-8b", num_layers=3)
        assert info.vocab_size == 131072 and info.num_layers == 3
        assert len(info.weight_files) == 3  # > 2 GB: two shards + index
        model = _load(out)
        assert model.dtype == torch.bfloat16
        _finite_logits(model, 131072)
        del model
    finally:
        shutil.rmtree(out, ignore_errors=True)  # ~3 GB: do not leave it to pytest's tmp reaper
