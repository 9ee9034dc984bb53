"""Co-located tensor parallelism on CPU (gloo): TP = 2 and 4 give TP = 1's greedy tokens."""

from __future__ import annotations

import pytest
import torch

from hybridpd.engine.args import EngineArgs
from hybridpd.engine.core import Engine
from hybridpd.engine.protocol import GenerateRequest

from .pd_helpers import greedy, run_all, tokens


@pytest.fixture(scope="module")
def tp_model(tmp_path_factory) -> str:
    """A tiny model whose shapes divide by 4, with fewer KV heads than 4 (replication)."""
    from hybridpd.demo.writer import write_demo_model

    return str(write_demo_model(tmp_path_factory.mktemp("tp") / "m", preset="tiny",
                                seed=11).path)


def _run(model: str, tp: int, prompts: list[tuple[int, ...]], device: str = "cpu"
         ) -> list[list[int]]:
    eng = Engine(EngineArgs(model_dir=model, device=device, tp_size=tp, cache_memory=8 << 20,
                            max_num_batched_tokens=64))
    try:
        reqs = [GenerateRequest(f"r{i}", p, greedy(16)) for i, p in enumerate(prompts)]
        outs = run_all(eng, reqs)
        assert eng.blocks.num_free == eng.blocks.num_usable
        return [tokens(outs[r.request_id]) for r in reqs]
    finally:
        eng.shutdown()


@pytest.mark.parametrize("tp", [2, 4])
def test_tp_matches_tp1(tp_model, tp, device):
    if device.type == "cuda" and torch.cuda.device_count() < tp:
        pytest.skip(f"needs {tp} GPUs")
    torch.manual_seed(0)
    prompts = [tuple(int(x) for x in torch.randint(3, 300, (n,))) for n in (1, 9, 70)]
    dev = "cuda" if device.type == "cuda" else "cpu"
    assert _run(tp_model, tp, prompts, dev) == _run(tp_model, 1, prompts, dev)


@pytest.mark.parametrize(("tp", "numbers"), [(3, "3"), (8, "8")])
def test_impossible_tp_is_refused_at_startup_naming_the_numbers(tp_model, tp, numbers):
    with pytest.raises(ValueError) as err:
        Engine(EngineArgs(model_dir=tp_model, device="cpu", tp_size=tp, cache_memory=8 << 20))
    msg = str(err.value)
    assert numbers in msg and any(w in msg for w in ("divisible", "multiple", "divide")), msg


@pytest.mark.timeout(300)  # a hang guard: a dead rank must fail the step, not hang it
def test_dead_rank_fails_the_engine_loudly_not_silently(tp_model):
    eng = Engine(EngineArgs(model_dir=tp_model, device="cpu", tp_size=2, cache_memory=8 << 20))
    try:
        eng.executor.procs[0].kill()
        eng.executor.procs[0].join(10)
        eng.add_request(GenerateRequest("x", (5, 6, 7), greedy(3)))
        with pytest.raises(RuntimeError, match="ranks died"):
            for _ in range(10):
                eng.step()
    finally:
        eng.executor.rank0.close()
