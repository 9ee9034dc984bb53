"""Token sampling: logit processing, greedy, temperature, min-p, top-k, top-p, seeds, logprobs.

Owns turning a (B, V) block of float32 logits into one token per row, vectorised over the
batch: one temperature divide, one sort for every row's top-k and top-p masks, one noise draw for
all unseeded rows (seeded rows each draw from their own generator). Knows nothing of the
scheduler or the model. Logprobs are those of the model's raw distribution (before temperature
and truncation), for the sampled token and optionally the top-n. A seeded request draws token
i from a generator seeded by (seed, i), so it is reproducible even after a preemption.
Temperatures below `request.MIN_SAMPLING_TEMPERATURE` (1e-5) are greedy
(`SamplingParams.greedy`): dividing logits by a temperature in (0, 1e-39] overflows to inf/nan,
which used to pick token 0 forever.

Logit processing (`process_logits`, before greedy or sampling, in vLLM's order): the
allowed-token mask (one (B, V) mask), bad words and logit_bias (one scatter each), then the
repetition, frequency and presence penalties over the token counts `HistoryRows` carries (kept
on the device by `engine/token_history.py`). Every per-row parameter is one tensor per step; a
batch where no row asks for a feature skips it entirely, so plain batches pay nothing. min_p
is applied after temperature, with top-k/top-p. Logprobs stay those of the raw model output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hybridpd.request import SamplingParams

_SEED_STRIDE = 1_000_003
_SEED_MOD = 2**63  # torch seeds are signed 64-bit
_NEG_INF = float("-inf")


@dataclass(frozen=True)
class HistoryRows:
    """The token history of the batch rows whose params need it (`needs_history`)."""

    rows: tuple[int, ...]  # batch rows, in order
    output_counts: torch.Tensor  # (R, V) int32: occurrences in the output so far
    prompt_seen: torch.Tensor  # (R, V) bool: occurs in the prompt
    tails: tuple[tuple[int, ...], ...]  # per row: its last output tokens (host)


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
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        output_index: list[int],
        history: HistoryRows | None = None,
    ) -> SampleResult:
        """logits: (B, V) float32 on the model's device. One host sync. `history` is needed
        when a row uses penalties or multi-token bad words (`SamplingParams.needs_history`)."""
        raw = logits
        if any(p.processes_logits for p in params):
            logits = process_logits(logits, params, history)
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
        logp = torch.log_softmax(raw, dim=-1)  # (B, V): the model's own distribution
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
        min_p = [params[i].min_p for i in rows]
        if any(m > 0.0 for m in min_p):
            sub = _min_p_rows(sub, min_p)
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



# ---- logit processing (before greedy and sampling) -------------------------------------------
def process_logits(
    logits: torch.Tensor, params: list[SamplingParams], history: HistoryRows | None
) -> torch.Tensor:
    """A processed copy of `logits` (B, V): allowed-token mask and bad words, logit_bias,
    then repetition / frequency / presence penalties. Each step runs only if a row uses it."""
    out = logits.clone()
    _apply_bans(out, params, history)
    _apply_logit_bias(out, params)
    if any(p.uses_penalties for p in params):
        if history is None:
            raise ValueError("penalties need the rows' token history (HistoryRows)")
        _apply_penalties(out, params, history)
    return out


def _apply_bans(out: torch.Tensor, params: list[SamplingParams],
                history: HistoryRows | None) -> None:
    """-inf outside allowed_token_ids, and on each bad word's last token where the output so
    far ends with the rest of the word (single-token words: always). In place."""
    allowed_rows = [i for i, p in enumerate(params) if p.allowed_token_ids is not None]
    ban_rows: list[int] = []
    ban_toks: list[int] = []
    tails = {} if history is None else dict(zip(history.rows, history.tails))
    for i, p in enumerate(params):
        for w in p.bad_words_token_ids:
            if len(w) > 1:
                if i not in tails:
                    raise ValueError("multi-token bad words need the rows' token history")
                tail = tails[i]
                if len(tail) < len(w) - 1 or tuple(tail[len(tail) - len(w) + 1:]) != w[:-1]:
                    continue
            ban_rows.append(i)
            ban_toks.append(w[-1])
    dev = out.device
    if allowed_rows:  # one (B, V) mask: True outside each row's allowed set
        ban = torch.zeros(out.shape, dtype=torch.bool, device=dev)
        ban[_index(allowed_rows, dev)] = True
        rows = [i for i in allowed_rows for _ in params[i].allowed_token_ids or ()]
        toks = [t for i in allowed_rows for t in params[i].allowed_token_ids or ()]
        ban[_index(rows, dev), _index(toks, dev)] = False
        out.masked_fill_(ban, _NEG_INF)
    if ban_rows:
        out.index_put_((_index(ban_rows, dev), _index(ban_toks, dev)),
                       torch.full((), _NEG_INF, dtype=out.dtype, device=dev))


def _apply_logit_bias(out: torch.Tensor, params: list[SamplingParams]) -> None:
    """Add each row's logit_bias to its tokens' logits: one scatter for the batch. In place."""
    rows = [i for i, p in enumerate(params) for _ in p.logit_bias]
    if not rows:
        return
    dev = out.device
    toks = [t for p in params for t, _ in p.logit_bias]
    bias = _values([b for p in params for _, b in p.logit_bias], dev, out.dtype)
    out.index_put_((_index(rows, dev), _index(toks, dev)), bias, accumulate=True)


def _apply_penalties(out: torch.Tensor, params: list[SamplingParams],
                     history: HistoryRows) -> None:
    """vLLM/OpenAI penalties on the history rows, in place: repetition (tokens of prompt or
    output: positive logits / rp, negative * rp), then frequency (- f * count in the output)
    and presence (- p if in the output)."""
    dev = out.device
    rows = history.rows
    idx = _index(list(rows), dev)
    sub = out[idx]  # (R, V)
    in_output = history.output_counts > 0
    rp_vals = [params[i].repetition_penalty for i in rows]
    if any(r != 1.0 for r in rp_vals):
        rp = _values(rp_vals, dev, sub.dtype)[:, None]  # (R, 1)
        seen = in_output | history.prompt_seen
        sub = torch.where(seen, torch.where(sub > 0, sub / rp, sub * rp), sub)
    freq_vals = [params[i].frequency_penalty for i in rows]
    if any(f != 0.0 for f in freq_vals):
        freq = _values(freq_vals, dev, sub.dtype)[:, None]
        sub = sub - freq * history.output_counts.to(sub.dtype)
    pres_vals = [params[i].presence_penalty for i in rows]
    if any(p != 0.0 for p in pres_vals):
        pres = _values(pres_vals, dev, sub.dtype)[:, None]
        sub = sub - pres * in_output.to(sub.dtype)
    out[idx] = sub


def _min_p_rows(sub: torch.Tensor, min_p: list[float]) -> torch.Tensor:
    """-inf where a token's probability < min_p * the row's top probability, i.e. where its
    logit < max logit + log(min_p); min_p 0 leaves a row alone. sub: (R, V), temperature
    applied."""
    mp = _values(min_p, sub.device, sub.dtype)[:, None]  # (R, 1)
    floor = sub.max(dim=-1, keepdim=True).values + torch.log(mp)  # log(0) = -inf: no cut
    return sub.masked_fill(sub < floor, _NEG_INF)
