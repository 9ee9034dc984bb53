"""Token sampling: greedy, temperature, top-k, top-p, per-request seeds, logprobs.

Owns turning a (B, V) block of float32 logits into one token per row. Knows nothing of the
scheduler or the model. Logprobs are those of the model's raw distribution (before temperature
and truncation), for the sampled token and optionally the top-n. A seeded request draws token
i from a generator seeded by (seed, i), so it is reproducible even after a preemption.
Temperatures below `MIN_SAMPLING_TEMPERATURE` (1e-5) are greedy: dividing logits by a
temperature in (0, 1e-39] overflows to inf/nan, which used to pick token 0 forever.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hybridpd.request import SamplingParams

_SEED_STRIDE = 1_000_003
_SEED_MOD = 2**63  # torch seeds are signed 64-bit
MIN_SAMPLING_TEMPERATURE = 1e-5  # below it a request is sampled greedily (documented floor)


@dataclass(frozen=True)
class SampleResult:
    token_ids: torch.Tensor  # (B,) int64 on the host
    logprobs: torch.Tensor | None  # (B,) float32, host, when any row asked for logprobs
    top_ids: torch.Tensor | None  # (B, n_max) int64, host
    top_logprobs: torch.Tensor | None  # (B, n_max) float32, host


class Sampler:
    def __init__(self, seed: int = 0) -> None:
        self._seed = seed
        self._generators: dict[str, torch.Generator] = {}

    def sample(
        self, logits: torch.Tensor, params: list[SamplingParams], output_index: list[int]
    ) -> SampleResult:
        """logits: (B, V) float32 on the model's device. One host sync."""
        tokens = logits.argmax(dim=-1)  # (B,) greedy default
        random_rows = [i for i, p in enumerate(params) if p.temperature >= MIN_SAMPLING_TEMPERATURE]
        if random_rows:
            drawn = self._draw(logits, params, output_index, random_rows)
            tokens[random_rows] = drawn
        want = [p.logprobs for p in params if p.logprobs is not None]
        if not want:
            return SampleResult(tokens.cpu(), None, None, None)
        logp = torch.log_softmax(logits, dim=-1)  # (B, V)
        chosen = logp.gather(1, tokens[:, None])[:, 0]
        n_max = max(want)
        top_lp, top_ids = (logp.topk(n_max, dim=-1) if n_max > 0 else (None, None))
        return SampleResult(
            tokens.cpu(),
            chosen.cpu(),
            None if top_ids is None else top_ids.cpu(),
            None if top_lp is None else top_lp.cpu(),
        )

    def _draw(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        output_index: list[int],
        rows: list[int],
    ) -> torch.Tensor:
        sub = logits[rows].clone()  # (R, V)
        temps = torch.tensor([params[i].temperature for i in rows], device=sub.device)
        sub /= temps[:, None]
        for j, i in enumerate(rows):  # truncation masks: one row each, O(R) host work
            _truncate_(sub[j], params[i].top_k, params[i].top_p)
        probs = torch.softmax(sub, dim=-1)
        noise = torch.empty_like(probs)  # exponential race: argmax(p / E) ~ Categorical(p)
        for j, i in enumerate(rows):
            noise[j].exponential_(generator=self._generator(params[i], output_index[i], sub))
        return (probs / noise).argmax(dim=-1)

    def _generator(self, p: SamplingParams, index: int, like: torch.Tensor) -> torch.Generator:
        dev = like.device
        if p.seed is None:
            key = f"global:{dev}"
            if key not in self._generators:
                self._generators[key] = torch.Generator(dev).manual_seed(self._seed)
            return self._generators[key]
        return torch.Generator(dev).manual_seed((p.seed * _SEED_STRIDE + index) % _SEED_MOD)


def _truncate_(row: torch.Tensor, top_k: int, top_p: float) -> None:
    """In place: -inf outside the top-k and outside the top-p nucleus. row: (V,)"""
    if top_k and 0 < top_k < row.numel():
        kth = row.topk(top_k).values[-1]
        row[row < kth] = float("-inf")
    if top_p < 1.0:
        sorted_vals, order = row.sort(descending=True)
        cum = torch.softmax(sorted_vals, dim=-1).cumsum(dim=-1)
        drop = cum - torch.softmax(sorted_vals, dim=-1) >= top_p  # keep the token crossing p
        row[order[drop]] = float("-inf")
