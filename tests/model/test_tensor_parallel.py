"""Tensor parallelism: 2 and 4 gloo ranks, each loading only its shard and running its own page
pool (local geometry), produce the TP=1 logits for prompts, decode steps and a mixed batch.
At TP=4 with 2 KV heads every KV head is replicated on two ranks."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import time  # noqa: E402
from datetime import timedelta  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from nemotron_testlib import BatchBuilder, make_reference, rel_err  # noqa: E402

from hybridpd.cache.geometry import CacheGeometry  # noqa: E402
from hybridpd.cache.tensors import PoolTensors  # noqa: E402
from hybridpd.config import ModelConfig  # noqa: E402
from hybridpd.engine.tp_executor import _rendezvous  # noqa: E402
from hybridpd.model.nemotron_h import NemotronHForCausalLM  # noqa: E402
from hybridpd.model.parallel import TPGroup  # noqa: E402
from hybridpd.process_start import start_process  # noqa: E402

torch.set_num_threads(1)

PATTERN = "ME*M*M-M"
SHAPES = dict(mamba_num_heads=8, mamba_head_dim=4, n_groups=4, num_attention_heads=4,
              num_key_value_heads=2, intermediate_size=48, chunk_size=4)
DEADLINE = timedelta(seconds=120)
JOIN_S = 240.0  # every rank's exit, after the collectives' own DEADLINE


def run_schedule(model_dir: Path, tp: TPGroup) -> torch.Tensor:
    """Prompts of 2 requests, 4 batched decode steps, then a decode + prefill-chunk batch."""
    cfg = ModelConfig.from_dir(model_dir)
    model = NemotronHForCausalLM(cfg, "cpu", tp)
    model.load_weights(model_dir)
    geometry = CacheGeometry.build(cfg, tp.size, tp.rank, kernel_block_size=2)
    pool, builder = PoolTensors(geometry, 96), BatchBuilder(geometry, geometry.block_tokens)
    gen = torch.Generator().manual_seed(5)
    a, b, c = (torch.randint(3, 96, (n,), generator=gen).tolist() for n in (11, 5, 8))
    sa, sb, sc = builder.new_seq(), builder.new_seq(), builder.new_seq()
    out = [model(builder.build([(sa, a), (sb, b)]), pool)]
    for step in range(4):
        out.append(model(builder.build([(sa, [10 + step]), (sb, [40 + step])]), pool))
    out.append(model(builder.build([(sa, [7]), (sc, c)]), pool))
    return torch.cat(out)  # (12, vocab)


def _worker(rank: int, size: int, port: int, model_dir: str, out_dir: str) -> None:
    """One rank; `port` is the rendezvous store the test process bound (port 0: no race)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=_rendezvous(size, port), rank=rank, world_size=size,
                            timeout=DEADLINE)
    try:
        logits = run_schedule(Path(model_dir), TPGroup(rank, size))
        torch.save(logits, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    path = tmp_path_factory.mktemp("tp_model")
    make_reference(PATTERN, path, seed=21, **SHAPES)
    return path, run_schedule(path, TPGroup(0, 1))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("size", [2, 4])
def test_tp_ranks_match_tp1(reference, size: int, tmp_path) -> None:
    model_dir, expected = reference
    store = _rendezvous(size)  # hosted here on a port it bound itself; the ranks connect to it
    # started as the executor starts ranks (forked from its preloaded forkserver)
    procs = [start_process(_worker, (rank, size, store.port, str(model_dir), str(tmp_path)),
                           f"tp-test-rank{rank}", daemon=True) for rank in range(size)]
    deadline = time.monotonic() + JOIN_S
    try:
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        assert [p.exitcode for p in procs] == [0] * size
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    del store
    for rank in range(size):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got.shape == expected.shape
        for row in range(expected.shape[0]):
            assert rel_err(got[row], expected[row]) < 1e-4, (rank, row)
    assert rel_err(expected[0], expected[1]) > 1e-2  # requests differ: not a vacuous check


def test_shards_are_local_sizes(reference) -> None:
    model_dir, _ = reference
    cfg = ModelConfig.from_dir(model_dir)
    model = NemotronHForCausalLM(cfg, "cpu", TPGroup(rank=3, size=4))
    mamba, attn = model.layers[0].mixer, model.layers[2].mixer
    assert (mamba.num_heads, mamba.n_groups, mamba.conv_weight.shape[0]) == (2, 1, 8 + 2 * 8)
    assert (attn.num_heads, attn.num_kv_heads) == (1, 1)
    assert attn.k_proj.out_shard.ranges == ((8, 16),)  # rank 3 of 4 holds KV head 1
    with pytest.raises(ValueError, match="n_groups"):
        NemotronHForCausalLM(cfg.with_overrides(n_groups=2), "cpu", TPGroup(rank=0, size=4))
