"""CUDA-graph decode: buckets, refusal off CUDA, and (on a GPU) graph decode equals eager decode
token for token, padded rows included."""

from __future__ import annotations

import pytest
import torch

from hybridpd.engine.args import EngineArgs
from hybridpd.engine.core import Engine
from hybridpd.engine.cuda_graphs import DecodeGraphs, default_buckets
from hybridpd.engine.protocol import GenerateRequest
from hybridpd.request import SamplingParams

from .pd_helpers import greedy, run_all, tokens


def test_default_buckets_cover_every_batch_size() -> None:
    assert default_buckets(1) == (1,)
    assert default_buckets(6) == (1, 2, 4, 6)
    assert default_buckets(64) == (1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64)
    for m in (1, 3, 17, 64):
        buckets = default_buckets(m)
        assert all(any(b >= n for b in buckets) for n in range(1, m + 1))
        assert max(buckets) == m


def test_graphs_refuse_a_cpu_device() -> None:
    with pytest.raises(ValueError, match="need a CUDA device"):
        DecodeGraphs(torch.nn.Identity(), None, 16, 1, 1, torch.device("cpu"), 4, 64)


def test_cpu_engine_runs_eager(tiny_model) -> None:
    eng = Engine(EngineArgs(model_dir=tiny_model, device="cpu", cache_memory=16 << 20))
    assert eng.executor.worker.runner.graphs is None
    eng.shutdown()


def _prompt(n: int, salt: int) -> tuple[int, ...]:
    return tuple((37 * j + 11 * salt) % 300 + 5 for j in range(n))


def _run(model: str, eager: bool, reqs: list[GenerateRequest],
         dtype: str) -> tuple[dict, int]:
    eng = Engine(EngineArgs(model_dir=model, device="cuda", dtype=dtype,
                            cache_memory=64 << 20, max_num_seqs=8, enforce_eager=eager))
    graphs = eng.executor.worker.runner.graphs
    replays = [0]
    if graphs is not None:
        inner = graphs.run

        def counted(rs):
            replays[0] += 1
            return inner(rs)

        graphs.run = counted
    outs = run_all(eng, reqs)
    eng.shutdown()
    return {rid: tokens(o) for rid, o in outs.items()}, replays[0]


@pytest.mark.gpu
@pytest.mark.parametrize("model,dtype", [("tiny_model", "float32"), ("tiny_model", "bfloat16"),
                                         ("small_model", "bfloat16")])  # MoE graphs want bf16
def test_graph_decode_equals_eager(model, dtype, request) -> None:
    path = request.getfixturevalue(model)
    seeded = SamplingParams(max_tokens=20, temperature=0.8, top_p=0.9, seed=7, ignore_eos=True)
    reqs = [GenerateRequest(f"r{i}", _prompt(n, i), greedy(24) if i % 2 else seeded)
            for i, n in enumerate([3, 40, 129, 7, 300])]  # 5 rows: bucket 8, three padded
    eager, none = _run(path, True, reqs, dtype)
    graph, replays = _run(path, False, reqs, dtype)
    assert none == 0 and replays > 10  # the graph path really ran
    assert graph == eager
