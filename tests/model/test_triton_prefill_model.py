"""The model on the Triton prefill kernels equals the model on the references.

A tiny Nemotron-H (attention, Mamba and MoE layers) over the real unified page pool
(`cache.tensors.PoolTensors`, Mamba bytes inside the attention pages), with the seam's prefill
ops and the KV write replaced by the Triton ones (`kernels/triton_prefill.py`,
`kernels/triton_kv.py`; CPU interpreter here, CUDA on a GPU), fp32: a prompt prefilled in
chunks (cached prefixes, continuing Mamba states), then a step mixing decode rows with a fresh
prefill and a continuing one — logits equal the reference path's at every step. Skipped
without triton.
"""

from __future__ import annotations

import os
from dataclasses import fields, replace

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

pytest.importorskip("triton")

from nemotron_testlib import BatchBuilder, make_reference, rel_err  # noqa: E402

from hybridpd.cache.geometry import CacheGeometry  # noqa: E402
from hybridpd.cache.tensors import PoolTensors  # noqa: E402
from hybridpd.config import ModelConfig  # noqa: E402
from hybridpd.kernels import triton_prefill  # noqa: E402
from hybridpd.kernels.ops import REFERENCE_OPS  # noqa: E402
from hybridpd.kernels.triton_kv import write_kv_triton  # noqa: E402
from hybridpd.model.nemotron_h import NemotronHForCausalLM  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TRITON_PREFILL = replace(REFERENCE_OPS, name="triton-prefill",
                         prefill_attention=triton_prefill.prefill_attention,
                         conv1d_prefill=triton_prefill.conv1d_prefill,
                         ssd_prefill=triton_prefill.ssd_prefill, write_kv=write_kv_triton)


@pytest.fixture(scope="module")
def model_and_geometry(tmp_path_factory):
    path = tmp_path_factory.mktemp("triton_prefill")
    make_reference("ME*M*M-", path, seed=5, n_groups=2, chunk_size=4)
    cfg = ModelConfig.from_dir(path)
    model = NemotronHForCausalLM(cfg, DEV)
    model.load_weights(path)
    return model, CacheGeometry.build(cfg, kernel_block_size=2)


def _tokens(seed: int, n: int) -> list[int]:
    return torch.randint(3, 96, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _on_device(batch):
    """The builder's CPU batch with every tensor moved to DEV."""
    moved = {}
    for f in fields(batch):
        v = getattr(batch, f.name)
        if isinstance(v, torch.Tensor):
            moved[f.name] = v.to(DEV)
        elif isinstance(v, tuple) and v and isinstance(v[0], torch.Tensor):
            moved[f.name] = tuple(t.to(DEV) for t in v)
    return replace(batch, **moved)


def _run(model, geometry, ops):
    """Logits of every step of a fixed schedule, on a fresh pool, with op table `ops`."""
    model.ops = ops
    pool = PoolTensors(geometry, 64, device=DEV)
    builder = BatchBuilder(geometry, geometry.block_tokens)
    a, b, c = builder.new_seq(), builder.new_seq(), builder.new_seq()
    pa, pb, pc = _tokens(0, 19), _tokens(1, 11), _tokens(2, 9)
    steps = [[(a, pa[:7])], [(a, pa[7:]), (b, pb[:5])],  # chunked prefill; a continues
             [(a, [4]), (b, pb[5:]), (c, pc)],  # decode row + continuing + fresh prefill
             [(a, [9]), (b, [12]), (c, [30])]]  # decode only (the decode ops either way)
    return [model(_on_device(builder.build(work)), pool) for work in steps]


def test_triton_prefill_ops_equal_reference_path(model_and_geometry):
    model, geometry = model_and_geometry
    assert geometry.block_tokens < 19  # the first prompt spans several attention blocks
    before = model.ops
    try:
        ref = _run(model, geometry, REFERENCE_OPS)
        out = _run(model, geometry, TRITON_PREFILL)
    finally:
        model.ops = before
    for step, (o, r) in enumerate(zip(out, ref)):
        assert o.shape == r.shape
        assert rel_err(o, r) < 1e-4, f"step {step}"
