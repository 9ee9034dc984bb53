"""The whole engine (scheduler, runner, pool, sampler) against transformers' NemotronH on
every available device: two requests batched, prompt + 64 greedy tokens identical, logits of
every step within 1e-4 (relative) of the fp32 CPU reference."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from hybridpd.engine.args import EngineArgs
from hybridpd.engine.core import Engine
from hybridpd.engine.protocol import GenerateRequest

from .pd_helpers import greedy, run_all, tokens

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))
from nemotron_testlib import make_reference, rel_err  # noqa: E402

STEPS = 64


def _hf_greedy(ref, prompt: list[int]) -> tuple[list[int], list[torch.Tensor]]:
    ref.generation_config.eos_token_id = None
    out = ref.generate(torch.tensor([prompt]), max_new_tokens=STEPS, do_sample=False,
                       output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    return out.sequences[0, len(prompt):].tolist(), [x[0].float() for x in out.logits]


@pytest.mark.parametrize("pattern", ["M*M-M-", "ME*EM"])
def test_engine_matches_transformers(pattern, tmp_path, device):
    ref = make_reference(pattern, tmp_path, seed=len(pattern))
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 96, (n,), generator=gen).tolist() for n in (21, 5)]
    expected = [_hf_greedy(ref, p) for p in prompts]

    eng = Engine(EngineArgs(model_dir=str(tmp_path), device=str(device), dtype="float32",
                            cache_memory=8 << 20, kernel_block_size=4))
    sampler = eng.executor.worker.runner.sampler
    inner = sampler.sample

    def sample(logits, params, output_index):  # (2, V): rows in batch order, "a" then "b"
        out = inner(logits, params, output_index)
        sample.rows.append(logits.detach().float().cpu().clone())
        return out

    sample.rows = []
    sampler.sample = sample
    outs = run_all(eng, [GenerateRequest("a", tuple(prompts[0]), greedy(STEPS)),
                         GenerateRequest("b", tuple(prompts[1]), greedy(STEPS))])
    eng.shutdown()
    for rid, (want_tokens, _) in zip("ab", expected):
        assert tokens(outs[rid]) == want_tokens
    # every step batched both requests, in arrival order (the runner's sort is stable)
    assert len(sample.rows) == STEPS
    for step, rows in enumerate(sample.rows):
        assert rows.shape[0] == 2
        for k in range(2):
            assert rel_err(rows[k], expected[k][1][step]) < 1e-4, (step, k)
