"""Tensor specs match transformers' NemotronHForCausalLM; seeded init has the promised ranges."""

from __future__ import annotations

import math
import os
import re

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from hybridpd.demo.presets import PRESETS, get_preset, hf_config, resolve_vocab_size  # noqa: E402
from hybridpd.demo.weights import (  # noqa: E402
    CHUNK_ELEMS,
    Init,
    TensorSpec,
    draw_chunks,
    materialize,
    tensor_specs,
)

torch.set_num_threads(1)


def _config(name: str, num_layers: int | None = None) -> dict:
    p = get_preset(name)
    return hf_config(p, vocab_size=resolve_vocab_size(p, 380), bos_token_id=1,
                     eos_token_ids=[2, 5], pad_token_id=3, num_layers=num_layers)


def _expected_after_conversion(specs: list[TensorSpec]) -> dict[str, tuple[int, ...]]:
    """Checkpoint names -> model names/shapes per transformers' nemotron_h conversion mapping."""
    out: dict[str, tuple[int, ...]] = {}
    experts: dict[str, list[tuple[int, ...]]] = {}
    for s in specs:
        name = s.name.replace("backbone.", "model.", 1)
        m = re.fullmatch(r"(.*\.experts)\.\d+\.(up_proj|down_proj)\.weight", name)
        if m:
            experts.setdefault(f"{m[1]}.{m[2]}", []).append(s.shape)
        else:
            out[name] = s.shape
    for name, shapes in experts.items():
        assert len(set(shapes)) == 1
        out[name] = (len(shapes), *shapes[0])
    return out


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_specs_match_transformers_model_full_depth(name: str) -> None:
    from transformers import NemotronHConfig, NemotronHForCausalLM

    raw = _config(name)
    cfg = NemotronHConfig(**{k: v for k, v in raw.items() if k != "model_type"})
    with torch.device("meta"):
        model = NemotronHForCausalLM(cfg)
    theirs = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    ours = _expected_after_conversion(tensor_specs(raw))
    assert ours.keys() == theirs.keys()
    assert ours == theirs
    if get_preset(name).has_moe:
        gate = [s for s in tensor_specs(raw) if s.name.endswith(".gate.weight")]
        assert gate and all(s.dtype == "float32" for s in gate)


def test_param_count_of_real_shapes() -> None:
    # DESIGN.md: 8.1B, 8.9B, 31.6B parameters.
    for name, billions in (("nemotron-h-8b", 8.1), ("nemotron-nano-9b-v2", 8.9),
                           ("nemotron-3-nano-30b-a3b", 31.6)):
        total = sum(s.numel for s in tensor_specs(_config(name)))
        assert abs(total / 1e9 - billions) < 0.1, (name, total)


def _spec(name: str, init: Init, n: int = 5000, std: float = 0.0) -> TensorSpec:
    return TensorSpec(name, (n,), "float32", init, std)


def test_mamba_parameter_ranges() -> None:
    a_log = materialize(_spec("x.A_log", Init.A_LOG), seed=0)
    assert a_log.min() >= 0.0 and a_log.max() <= math.log(16.0) + 1e-6
    assert a_log.std() > 0.3  # spread over the range, not a constant
    dt = torch.nn.functional.softplus(materialize(_spec("x.dt_bias", Init.DT_BIAS), seed=0))
    assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 0.1 * 1.001
    assert dt.min() < 2e-3 and dt.max() > 0.05
    d = materialize(_spec("x.D", Init.ONE_PLUS_NORMAL, std=0.1), seed=0)
    assert abs(d.mean().item() - 1.0) < 0.01 and 0.05 < d.std().item() < 0.15


def test_linear_std_scales_with_fan_in() -> None:
    specs = {s.name: s for s in tensor_specs(_config("tiny"))}
    w = materialize(specs["backbone.layers.0.mixer.in_proj.weight"], seed=3)
    assert abs(w.std().item() - 1 / math.sqrt(64)) < 0.01
    out = specs["backbone.layers.0.mixer.out_proj.weight"]
    assert out.std == pytest.approx(1 / math.sqrt(128) / math.sqrt(8))


def test_draws_are_seeded_per_tensor_and_chunked_consistently() -> None:
    spec = _spec("a", Init.NORMAL, n=CHUNK_ELEMS + 7, std=1.0)
    chunks = list(draw_chunks(spec, seed=1))
    assert [c.numel() for c in chunks] == [CHUNK_ELEMS, 7]
    again = torch.cat(list(draw_chunks(spec, seed=1)))
    assert torch.equal(torch.cat(chunks), again)
    assert not torch.equal(again, torch.cat(list(draw_chunks(spec, seed=2))))
    other_name = TensorSpec("b", spec.shape, "float32", Init.NORMAL, 1.0)
    assert not torch.equal(again, torch.cat(list(draw_chunks(other_name, seed=1))))
    bf16 = TensorSpec("a", spec.shape, "bfloat16", Init.NORMAL, 1.0)
    first = next(iter(draw_chunks(bf16, seed=1)))
    assert first.dtype == torch.bfloat16
    assert torch.allclose(first.float(), chunks[0], rtol=1e-2, atol=1e-2)
