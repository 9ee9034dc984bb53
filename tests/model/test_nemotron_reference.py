"""Our NemotronHForCausalLM against transformers' (fp32 CPU, tiny random weights):
prompt logits of a varlen batch, then 64 greedy decode steps of two requests batched together."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from nemotron_testlib import (  # noqa: E402
    BatchBuilder,
    SimpleCache,
    make_reference,
    rel_err,
)

from hybridpd.cache.geometry import CacheGeometry  # noqa: E402
from hybridpd.config import ModelConfig  # noqa: E402
from hybridpd.model.nemotron_h import NemotronHForCausalLM  # noqa: E402

torch.set_num_threads(1)

PATTERNS = {
    "dense": ("M*M-M-", {}),
    "moe": ("ME*EM", {}),
    "attention_first": ("*M-M", {}),
    "attention_last": ("M-M*", {}),
    "multi_group": ("M*M*MM*M-", {"n_groups": 2}),
}
DECODE_STEPS = 64


def load_ours(model_dir) -> tuple[NemotronHForCausalLM, SimpleCache, BatchBuilder]:
    cfg = ModelConfig.from_dir(model_dir)
    model = NemotronHForCausalLM(cfg, "cpu")
    model.load_weights(model_dir)
    geometry = CacheGeometry.build(cfg)
    block_tokens = 4  # small, so requests span several attention blocks
    return model, SimpleCache(geometry, cfg, 96, block_tokens), BatchBuilder(geometry, block_tokens)


def hf_greedy(ref, prompt: list[int]) -> tuple[list[int], list[torch.Tensor]]:
    ref.generation_config.eos_token_id = None
    out = ref.generate(torch.tensor([prompt]), max_new_tokens=DECODE_STEPS, do_sample=False,
                       output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    return out.sequences[0, len(prompt):].tolist(), [x[0].float() for x in out.logits]


@pytest.mark.parametrize("name", list(PATTERNS))
def test_matches_transformers_prompt_and_greedy_decode(name: str, tmp_path) -> None:
    pattern, overrides = PATTERNS[name]
    ref = make_reference(pattern, tmp_path, seed=len(name), **overrides)
    model, cache, builder = load_ours(tmp_path)
    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, 96, (n,), generator=gen).tolist() for n in (13, 6)]

    expected = [hf_greedy(ref, p) for p in prompts]
    seqs = [builder.new_seq() for _ in prompts]
    logits = model(builder.build(list(zip(seqs, prompts))), cache)  # (2, vocab)
    assert logits.dtype == torch.float32 and logits.shape == (2, 96)
    for r in range(2):
        assert rel_err(logits[r], expected[r][1][0]) < 1e-4
        # the step is not degenerate: different requests get different logits
    assert rel_err(logits[0], logits[1]) > 1e-2

    ours_tokens: list[list[int]] = [[], []]
    for step in range(DECODE_STEPS):
        next_ids = logits.argmax(-1).tolist()
        for r in range(2):
            assert rel_err(logits[r], expected[r][1][step]) < 1e-4, (name, step, r)
            ours_tokens[r].append(next_ids[r])
        if step + 1 < DECODE_STEPS:
            batch = builder.build([(seqs[r], [next_ids[r]]) for r in range(2)])
            assert batch.num_decodes == 2
            logits = model(batch, cache)
    for r in range(2):
        assert ours_tokens[r] == expected[r][0]
    assert len(set(ours_tokens[0] + ours_tokens[1])) > 1
