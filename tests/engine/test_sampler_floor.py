"""The sampler's temperature floor: a tiny positive temperature is greedy, never token 0."""

from __future__ import annotations

import pytest
import torch

from hybridpd.engine.sampler import Sampler
from hybridpd.request import MIN_SAMPLING_TEMPERATURE, SamplingParams


@pytest.mark.parametrize("temperature", [1e-45, 1e-39, 1e-20, MIN_SAMPLING_TEMPERATURE / 2])
def test_temperature_below_the_floor_is_greedy(temperature: float) -> None:
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    logits[:, 0] = -5.0  # token 0 is never the best: the old overflow picked it anyway
    params = [SamplingParams(temperature=temperature, seed=7)] * 3
    out = Sampler(seed=0).sample(logits, params, [0, 1, 2])
    assert out.token_ids.tolist() == logits.argmax(dim=-1).tolist()


def test_temperature_at_the_floor_still_samples_finite_tokens() -> None:
    logits = torch.zeros(2, 8)
    logits[:, 3] = 1.0
    params = [SamplingParams(temperature=MIN_SAMPLING_TEMPERATURE, seed=3)] * 2
    out = Sampler(seed=0).sample(logits, params, [0, 1])
    assert out.token_ids.tolist() == [3, 3]  # so sharp that it is the argmax, not token 0


def test_ordinary_temperature_is_still_random() -> None:
    logits = torch.zeros(1, 1000)
    seen = {int(Sampler(seed=0).sample(logits, [SamplingParams(temperature=1.0, seed=s)], [0])
                .token_ids[0]) for s in range(20)}
    assert len(seen) > 1
