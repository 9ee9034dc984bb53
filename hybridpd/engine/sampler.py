"""Token sampling: greedy, temperature, top-k, top-p, per-request seeds, logprobs.

Owns turning a (B, V) block of float32 logits into one token per row, vectorised over the
batch: one temperature divide, one sort for every row's top-k and top-p masks, one noise draw for
all unseeded rows (seeded rows each draw from their own generator). Knows nothing of the
scheduler or the model. Logprobs are those of the model's raw distribution (before temperature
and truncation), for the sampled token and optionally the top-n. A seeded request draws token
i from a generator seeded by (seed, i), so it is reproducible even after a preemption.
Temperatures below `request.MIN_SAMPLING_TEMPERATURE` (1e-5) are greedy
(`SamplingParams.greedy`): dividing logits by a temperature in (0, 1e-39] overflows to inf/nan,
which used to pick token 0 forever.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hybridpd.request import SamplingParams

_SEED_STRIDE = 1_000_003
_SEED_MOD = 2**63  # torch seeds are signed 64-bit


@dataclass(frozen=True)
class PromptScores:
    """Scores of some prompt rows of one request (host tensors): row i's logprob of its target
    token and, with top-k > 0, the k best (token, logprob) of its distribution."""

    logprobs: torch.Tensor  # (R,) float32
    ranks: torch.Tensor  # (R,) int64: 1 + how many tokens are more likely than the target
    top_ids: torch.Tensor | None  # (R, k) int64
    top_logprobs: torch.Tensor | None  # (R, k) float32


def score_rows(logits: torch.Tensor, targets: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
    """Log-softmax of `logits` (R, V) fp32 at `targets` (R,), its rank and its top-k, on the
    device: (target logprobs (R,), ranks (R,), top logprobs (R, k), top ids (R, k)); k = 0
    gives empty tops."""
    logp = torch.log_softmax(logits, dim=-1)
    chosen = logp.gather(1, targets[:, None])[:, 0]
    ranks = (logp > chosen[:, None]).sum(dim=-1) + 1
    top_lp, top_ids = logp.topk(k, dim=-1)
    return chosen, ranks, top_lp, top_ids


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
        random_rows = [i for i, p in enumerate(params) if not p.greedy]
        if random_rows and len(random_rows) == len(params):
            tokens = self._draw(logits, params, output_index, random_rows)  # (B,)
        else:
            tokens = logits.argmax(dim=-1)  # (B,) greedy default
            if random_rows:
                drawn = self._draw(logits, params, output_index, random_rows)
                tokens[_index(random_rows, logits.device)] = drawn
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
        dev = logits.device
        sub = (logits if len(rows) == logits.shape[0] else logits[_index(rows, dev)]).clone()
        temps = _values([params[i].temperature for i in rows], dev, sub.dtype)  # (R,)
        sub /= temps[:, None]
        top_k = [params[i].top_k for i in rows]
        top_p = [params[i].top_p for i in rows]
        if any(0 < k < sub.shape[1] for k in top_k) or any(p < 1.0 for p in top_p):
            sub = _truncate_rows(sub, top_k, top_p)
        probs = torch.softmax(sub, dim=-1)
        noise = torch.empty_like(probs)  # exponential race: argmax(p / E) ~ Categorical(p)
        unseeded = [j for j, i in enumerate(rows) if params[i].seed is None]
        if len(unseeded) == len(rows):  # one draw for the whole block
            noise.exponential_(generator=self._generator(params[rows[0]], 0, sub))
        elif unseeded:
            block = torch.empty((len(unseeded), probs.shape[1]), device=dev)
            block.exponential_(generator=self._generator(params[rows[unseeded[0]]], 0, sub))
            noise[_index(unseeded, dev)] = block
        for j, i in enumerate(rows):
            if params[i].seed is not None:  # reproducible per (seed, output index)
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


def _index(rows: list[int], device: torch.device) -> torch.Tensor:
    """Row indices on `device` without a blocking host->device copy."""
    return torch.tensor(rows, dtype=torch.int64).to(device, non_blocking=True)


def _values(vals: list, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Per-row values on `device` without a blocking host->device copy."""
    return torch.tensor(vals, dtype=dtype).to(device, non_blocking=True)


def _truncate_rows(sub: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """-inf outside each row's top-k and outside its top-p nucleus (the token crossing p is
    kept); top_k <= 0 or >= V and top_p >= 1 leave a row alone. sub: (R, V)."""
    v = sub.shape[1]
    dev = sub.device
    sorted_vals, order = sub.sort(dim=-1, descending=True)  # (R, V)
    k = _index([kk if 0 < kk < v else v for kk in top_k], dev)  # (R,)
    kth = sorted_vals.gather(1, (k - 1)[:, None])  # (R, 1): ties with the k-th stay in
    sorted_vals = sorted_vals.masked_fill(sorted_vals < kth, float("-inf"))
    p = _values(top_p, dev, sorted_vals.dtype)[:, None]  # (R, 1)
    probs = torch.softmax(sorted_vals, dim=-1)
    drop = (probs.cumsum(dim=-1) - probs >= p) & (p < 1.0)
    sorted_vals = sorted_vals.masked_fill(drop, float("-inf"))
    return torch.empty_like(sub).scatter_(1, order, sorted_vals)

