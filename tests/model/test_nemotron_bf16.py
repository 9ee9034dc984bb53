"""bfloat16 weights/activations/KV/conv state (fp32 SSM state) on the real pool: the same
schedule as fp32 gives logits that differ by bf16 rounding only."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from nemotron_testlib import BatchBuilder, make_reference, rel_err  # noqa: E402

from hybridpd.cache.geometry import CacheGeometry  # noqa: E402
from hybridpd.cache.tensors import PoolTensors  # noqa: E402
from hybridpd.config import ModelConfig  # noqa: E402
from hybridpd.model.nemotron_h import NemotronHForCausalLM  # noqa: E402

torch.set_num_threads(1)


def run(path, dtype: str) -> tuple[torch.Tensor, NemotronHForCausalLM, PoolTensors]:
    cfg = ModelConfig.from_dir(path, dtype=dtype)
    model = NemotronHForCausalLM(cfg, "cpu")
    model.load_weights(path)
    geometry = CacheGeometry.build(cfg, kernel_block_size=2)
    pool, builder = PoolTensors(geometry, 64), BatchBuilder(geometry, geometry.block_tokens)
    seq = builder.new_seq()
    out = [model(builder.build([(seq, [4, 8, 15, 16, 23, 42, 9, 11, 30])]), pool)]
    for t in (5, 61, 7, 19):
        out.append(model(builder.build([(seq, [t])]), pool))
    return torch.cat(out), model, pool


def test_bf16_matches_fp32_within_rounding(tmp_path) -> None:
    make_reference("ME*M-M", tmp_path, seed=4, n_groups=2)
    fp32, _, _ = run(tmp_path, "float32")
    bf16, model, pool = run(tmp_path, "bfloat16")
    assert bf16.dtype == torch.float32  # logits are always fp32
    assert model.embeddings.dtype == torch.bfloat16
    assert model.layers[1].mixer.gate.weight.dtype == torch.float32  # router stays fp32
    assert pool.kv_view(2).dtype == torch.bfloat16 and pool.ssm_view(0).dtype == torch.float32
    for row in range(fp32.shape[0]):
        err = rel_err(bf16[row], fp32[row])
        assert 0 < err < 5e-2, (row, err)
