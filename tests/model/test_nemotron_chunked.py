"""Model-level state carrying on the real page pool (`cache.tensors.PoolTensors`): a prompt
prefilled in chunks of 1, 7 or all tokens gives the same logits as one pass, and a batch that
mixes decode requests with prefill chunks equals running each request alone."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from nemotron_testlib import BatchBuilder, make_reference, rel_err  # noqa: E402

from hybridpd.cache.geometry import CacheGeometry  # noqa: E402
from hybridpd.cache.tensors import PoolTensors  # noqa: E402
from hybridpd.config import ModelConfig  # noqa: E402
from hybridpd.model.nemotron_h import NemotronHForCausalLM  # noqa: E402

torch.set_num_threads(1)

PATTERN = "ME*M*MM-M"
PROMPT_LEN = 23


@pytest.fixture(scope="module")
def model_and_geometry(tmp_path_factory):
    path = tmp_path_factory.mktemp("chunked")
    make_reference(PATTERN, path, seed=3, n_groups=2, chunk_size=4)
    cfg = ModelConfig.from_dir(path)
    model = NemotronHForCausalLM(cfg, "cpu")
    model.load_weights(path)
    return model, CacheGeometry.build(cfg, kernel_block_size=2)


def fresh(geometry: CacheGeometry) -> tuple[PoolTensors, BatchBuilder]:
    return PoolTensors(geometry, 160), BatchBuilder(geometry, geometry.block_tokens)


def prompt(seed: int, n: int = PROMPT_LEN) -> list[int]:
    return torch.randint(3, 96, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("chunk", [1, 7, PROMPT_LEN])
def test_chunked_prefill_equals_one_pass(model_and_geometry, chunk: int) -> None:
    model, geometry = model_and_geometry
    tokens = prompt(0)
    pool, builder = fresh(geometry)
    whole = model(builder.build([(builder.new_seq(), tokens)]), pool)[0]

    pool, builder = fresh(geometry)
    seq = builder.new_seq()
    for start in range(0, len(tokens), chunk):
        logits = model(builder.build([(seq, tokens[start:start + chunk])]), pool)[0]
    assert geometry.block_tokens < PROMPT_LEN  # the prompt spans several attention blocks
    assert rel_err(logits, whole) < 1e-5
    # a different prompt gives different logits: the comparison is not vacuous
    assert rel_err(model(builder.build([(builder.new_seq(), prompt(1))]), pool)[0], whole) > 1e-2


def test_mixed_decode_and_prefill_batch_equals_separate_runs(model_and_geometry) -> None:
    model, geometry = model_and_geometry
    a, b = prompt(2, 9), prompt(3, 17)
    a_next = [5, 17, 33]  # tokens A decodes while B prefills in chunks of 6, 6, 5

    pool, builder = fresh(geometry)
    seq = builder.new_seq()
    model(builder.build([(seq, a)]), pool)
    alone_a = [model(builder.build([(seq, [t])]), pool)[0] for t in a_next]
    alone_b = model(builder.build([(builder.new_seq(), b)]), pool)[0]

    pool, builder = fresh(geometry)
    sa, sb = builder.new_seq(), builder.new_seq()
    model(builder.build([(sa, a)]), pool)
    for i, t in enumerate(a_next):
        batch = builder.build([(sa, [t]), (sb, b[6 * i:6 * i + 6])])
        assert batch.num_decodes == 1
        logits = model(batch, pool)
        assert rel_err(logits[0], alone_a[i]) < 1e-5
    assert rel_err(logits[1], alone_b) < 1e-5
