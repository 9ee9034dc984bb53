"""Checkpoint loading: transformers' save_pretrained layout (per-expert MoE tensors), fused expert
tensors in a sharded checkpoint with `model.` names, extra tensors ignored, missing ones named."""

from __future__ import annotations

import json
import os
import shutil

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from nemotron_testlib import BatchBuilder, SimpleCache, make_reference  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from hybridpd.cache.geometry import CacheGeometry  # noqa: E402
from hybridpd.config import ModelConfig  # noqa: E402
from hybridpd.model.checkpoint import CheckpointReader, MissingWeightsError  # noqa: E402
from hybridpd.model.nemotron_h import NemotronHForCausalLM  # noqa: E402

torch.set_num_threads(1)

PATTERN = "ME*E-"
NUM_EXPERTS = 8


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf")
    make_reference(PATTERN, path, seed=11)
    return path


def load(path) -> NemotronHForCausalLM:
    model = NemotronHForCausalLM(ModelConfig.from_dir(path), "cpu")
    model.load_weights(path)
    return model


def logits_of(model: NemotronHForCausalLM) -> torch.Tensor:
    geometry = CacheGeometry.build(model.config)
    cache, builder = SimpleCache(geometry, model.config, 16, 4), BatchBuilder(geometry, 4)
    return model(builder.build([(builder.new_seq(), [5, 9, 3, 44, 17, 8])]), cache)


def fuse_experts(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-expert names -> one (E, out, in) tensor per layer and projection."""
    out = {k: v for k, v in tensors.items() if ".experts." not in k}
    layers = sorted({k.split(".experts.")[0] for k in tensors if ".experts." in k})
    for head in layers:
        for proj in ("up_proj", "down_proj"):
            out[f"{head}.experts.{proj}"] = torch.stack(
                [tensors[f"{head}.experts.{j}.{proj}.weight"] for j in range(NUM_EXPERTS)])
    return out


def write_sharded(tensors: dict[str, torch.Tensor], path) -> None:
    names = sorted(tensors)
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:])):
        fname = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({n: tensors[n].contiguous() for n in part}, str(path / fname))
        weight_map.update({n: fname for n in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def test_save_pretrained_layout_is_per_expert_and_loads(saved) -> None:
    names = load_file(str(saved / "model.safetensors")).keys()
    assert "backbone.layers.1.mixer.experts.3.up_proj.weight" in names
    model = load(saved)
    stored = load_file(str(saved / "model.safetensors"))
    torch.testing.assert_close(model.layers[1].mixer.experts.down[5],
                               stored["backbone.layers.1.mixer.experts.5.down_proj.weight"])
    torch.testing.assert_close(model.layers[0].mixer.conv_weight,
                               stored["backbone.layers.0.mixer.conv1d.weight"][:, 0])


def test_fused_sharded_model_prefixed_checkpoint_gives_same_model(saved, tmp_path) -> None:
    tensors = load_file(str(saved / "model.safetensors"))
    fused = fuse_experts(tensors)
    assert not any(".experts.0." in k for k in fused)
    fused = {k.replace("backbone.", "model.", 1): v for k, v in fused.items()}
    fused["mtp.layers.0.mixer.q_proj.weight"] = torch.zeros(3, 3)  # extra: ignored
    write_sharded(fused, tmp_path)
    shutil.copy(saved / "config.json", tmp_path / "config.json")
    a, b = load(saved), load(tmp_path)
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), name
    torch.testing.assert_close(logits_of(a), logits_of(b), rtol=0, atol=0)


def test_missing_tensors_are_all_named(saved, tmp_path) -> None:
    tensors = load_file(str(saved / "model.safetensors"))
    gone = ["backbone.layers.0.mixer.A_log", "backbone.layers.3.mixer.experts.6.up_proj.weight",
            "lm_head.weight"]
    save_file({k: v for k, v in tensors.items() if k not in gone},
              str(tmp_path / "model.safetensors"))
    shutil.copy(saved / "config.json", tmp_path / "config.json")
    with pytest.raises(MissingWeightsError) as err:
        load(tmp_path)
    assert set(err.value.missing) == set(gone)
    for name in gone:
        assert name in str(err.value)


def test_reader_slices_only_requested_ranges(saved) -> None:
    with CheckpointReader(saved, torch.float32, torch.device("cpu")) as reader:
        full = reader.read("backbone.layers.0.mixer.in_proj.weight")
        part = reader.read("backbone.layers.0.mixer.in_proj.weight", 0, [(4, 6), (0, 2)])
        cols = reader.read("model.layers.0.mixer.out_proj.weight", 1, [(8, 16)])
        assert reader.shape("backbone.layers.1.mixer.experts.2.up_proj.weight") == (16, 32)
    torch.testing.assert_close(part, torch.cat([full[4:6], full[0:2]]))
    assert cols.shape == (32, 8)


def test_no_safetensors_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="safetensors"):
        CheckpointReader(tmp_path, torch.float32, torch.device("cpu"))
