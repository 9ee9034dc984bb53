"""Model runner: one scheduled step -> one forward pass -> sampled tokens.

Owns turning a `SchedulerOutput` into a `ForwardBatch` (index tensors on the device, decode
requests first), running the model over the page pool and sampling. Decode-only steps replay a
captured CUDA graph (`engine/cuda_graphs.py`) when graphs were captured; mixed and prefill steps
run eagerly. On the sampling rank it keeps the token history penalties and bad words need
(`engine/token_history.py`, only once a request needs it). Knows nothing of request lifecycles
or transfers. One device->host sync per step (the sampled tokens).

Prompt logprobs: a request whose chunk has `score_targets` gets logits for those prompt rows
too (they are appended to `logits_indices` after the B last rows); their log-softmax is taken
in slices of `SCORE_SLICE` rows so a long chunk never holds (chunk, vocab) logits at once.
Steps without such a request run exactly as before (no extra rows, graphs allowed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, cast

import numpy as np
import torch

from hybridpd.engine.cuda_graphs import DecodeGraphs
from hybridpd.engine.sampler import AllowedTokens, PromptScores, Sampler, SampleResult, score_rows
from hybridpd.engine.scheduler import ScheduledRequest, SchedulerOutput
from hybridpd.engine.structured import TokenMasks
from hybridpd.engine.token_history import TokenHistory
from hybridpd.model.forward_batch import CacheViews, ForwardBatch

SCORE_SLICE = 256  # prompt rows per LM-head + log-softmax slice (bounds the logits' memory)


class ScoringModel(Protocol):
    """What prompt scoring needs of the model beyond `forward` (`NemotronHForCausalLM`)."""

    def forward_hidden(self, batch: ForwardBatch, cache: CacheViews) -> torch.Tensor: ...

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class StepResult:
    order: tuple[str, ...]  # request ids in batch order (rows of `sample`)
    sampled: tuple[str, ...]  # request ids that got a token, in `sample` row order
    sample: SampleResult | None
    scores: dict[str, PromptScores] | None = None  # prompt logprobs of this step's chunks


class ModelRunner:
    def __init__(
        self,
        model: torch.nn.Module,
        cache: CacheViews,
        block_tokens: int,
        num_attn_groups: int,
        num_mamba_groups: int,
        device: torch.device,
        sampler: Sampler,
    ) -> None:
        self.model = model
        self.cache = cache
        self.block_tokens = block_tokens
        self.num_attn_groups = num_attn_groups
        self.num_mamba_groups = num_mamba_groups
        self.device = device
        self.sampler = sampler
        self.graphs: DecodeGraphs | None = None
        self.history: TokenHistory | None = None  # made when a request first needs one

    def capture_decode_graphs(self, max_num_seqs: int, max_model_len: int,
                              buckets: tuple[int, ...] | None = None) -> DecodeGraphs:
        """Capture decode graphs (call once, after the pool is sized); later decode-only steps
        that fit a bucket replay them."""
        graphs = DecodeGraphs(self.model, self.cache, self.block_tokens, self.num_attn_groups,
                              self.num_mamba_groups, self.device, max_num_seqs, max_model_len,
                              buckets)
        graphs.capture()
        self.graphs = graphs
        return graphs

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, sample: bool = True) -> StepResult:
        if out.copies:
            self.copy_blocks(out.copies)
        reqs = sorted(out.scheduled, key=lambda s: not s.is_decode)  # stable: decodes first
        if not reqs:
            return StepResult((), (), None)
        scores: dict[str, PromptScores] | None = None
        if any(r.score_targets for r in reqs):
            model = cast(ScoringModel, self.model)
            hidden = model.forward_hidden(self.build_batch(reqs, scored=True), self.cache)
            logits = model.compute_logits(hidden[: len(reqs)])  # (B, V) float32
            if sample:  # rank 0 only, like the sampled tokens
                scores = self._score(reqs, hidden[len(reqs):])
        elif self.graphs is not None and self.graphs.can_run(reqs):
            logits = self.graphs.run(reqs)  # (B, V) float32
        else:
            logits = self.model(self.build_batch(reqs), self.cache)  # (B, V) float32
        tracked = sample and self._track_history(out, logits.shape[1])
        # an n / best_of prompt's logits row is sampled once per sample (its own seed each)
        rows = [i for i, r in enumerate(reqs) if r.sample for _ in range(r.num_samples)]
        order = tuple(r.request_id for r in reqs)
        if not rows or not sample:
            return StepResult(order, (), None, scores)
        picked = logits[rows] if rows != list(range(len(reqs))) else logits
        params = [p for r in reqs if r.sample for p in r.sample_params()]
        index = [reqs[i].output_index for i in rows]
        history = None
        if tracked:
            assert self.history is not None  # _track_history made it
            history = self.history.rows([reqs[i] for i in rows])
        extra: dict[str, Any] = {}  # only what a step uses: samplers wrapped by tests keep theirs
        if history is not None:
            extra["history"] = history
        if out.token_masks is not None:  # structured output
            extra["allowed"] = _mask_rows(out.token_masks, [reqs[i].request_id for i in rows])
        result = self.sampler.sample(picked, params, index, **extra)
        return StepResult(order, tuple(reqs[i].request_id for i in rows), result, scores)

    def copy_blocks(self, copies: tuple[tuple[int, int], ...]) -> None:
        """Copy whole blocks (every shared tensor's page) src -> dst: a forked sample's
        partial attention blocks and Mamba state (conv + SSM). One gather and one scatter."""
        copy = getattr(self.cache, "copy_blocks", None)
        if copy is None:
            raise TypeError(f"{type(self.cache).__name__} cannot copy blocks (forks need it)")
        copy([c[0] for c in copies], [c[1] for c in copies])

    def _track_history(self, out: SchedulerOutput, vocab: int) -> bool:
        """Count this step's tokens for requests whose sampling needs their history
        (penalties, multi-token bad words), on every step of the sampling rank, sampled or
        not. False (and no cost) until some request needs it."""
        if self.history is None:
            if not any(s.params.needs_history for s in out.scheduled):
                return False
            self.history = TokenHistory(vocab, self.device)
        self.history.update(out)
        return True

    def _score(self, reqs: list[ScheduledRequest], hidden: torch.Tensor
               ) -> dict[str, PromptScores]:
        """Per scoring request: log-softmax of its prompt rows at their targets, plus top-k.
        `hidden` (R, hidden) holds the scored rows of every such request, in batch order."""
        scored = [r for r in reqs if r.score_targets]
        targets = torch.tensor([t for r in scored for t in r.score_targets], dtype=torch.int64)
        targets = targets.to(self.device, non_blocking=True)  # (R,)
        k = max(int(r.params.prompt_logprobs or 0) for r in scored)
        parts = []
        for a in range(0, hidden.shape[0], SCORE_SLICE):
            logits = cast(ScoringModel, self.model).compute_logits(hidden[a : a + SCORE_SLICE])
            parts.append(score_rows(logits, targets[a : a + SCORE_SLICE], k))
        chosen, ranks, top_lp, top_ids = (torch.cat(x).cpu() for x in zip(*parts))
        out: dict[str, PromptScores] = {}
        a = 0
        for r in scored:
            n, kr = len(r.score_targets), int(r.params.prompt_logprobs or 0)
            out[r.request_id] = PromptScores(
                chosen[a : a + n],
                ranks[a : a + n],
                top_ids[a : a + n, :kr] if kr else None,
                top_lp[a : a + n, :kr] if kr else None,
            )
            a += n
        return out

    def build_batch(self, reqs: list[ScheduledRequest], scored: bool = False) -> ForwardBatch:
        """The step's batch; with `scored`, `logits_indices` holds each request's last row
        then, request by request, the rows whose prompt logprobs are due."""
        n_new = np.array([len(r.token_ids) for r in reqs], dtype=np.int64)  # (B,)
        ctx = np.array([r.num_computed for r in reqs], dtype=np.int64)  # (B,)
        qsl = np.zeros(len(reqs) + 1, dtype=np.int64)  # (B+1,)
        np.cumsum(n_new, out=qsl[1:])
        ids = np.fromiter((t for r in reqs for t in r.token_ids), np.int64, int(qsl[-1]))  # (T,)
        tok_req = np.repeat(np.arange(len(reqs)), n_new)  # (T,) row of each token
        positions = ctx[tok_req] + (np.arange(len(ids)) - qsl[:-1][tok_req])  # (T,)
        tables = [self._block_table(reqs, g) for g in range(self.num_attn_groups)]
        slots = [self._slots(t, tok_req, positions) for t in tables]
        states = [
            np.array([r.mamba_block_ids[g] for r in reqs], dtype=np.int64)  # (B,)
            for g in range(self.num_mamba_groups)
        ]
        dev = self.device

        def t(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(a).to(dev, non_blocking=True)

        num_decodes = sum(1 for r in reqs if r.is_decode)
        return ForwardBatch(
            input_ids=t(ids),
            positions=t(positions),
            query_start_loc=t(qsl),
            context_lens=t(ctx),
            seq_lens=t(ctx + n_new),
            has_initial_state=t(ctx > 0),
            logits_indices=t(self._logit_rows(reqs, qsl) if scored else qsl[1:] - 1),
            attn_block_tables=tuple(t(x) for x in tables),
            attn_slot_mappings=tuple(t(x) for x in slots),
            mamba_state_ids=tuple(t(x) for x in states),
            num_decodes=num_decodes,
            max_query_len=int(n_new.max()),
            max_seq_len=int((ctx + n_new).max()),
            query_start_loc_host=tuple(qsl.tolist()),
        )

    @staticmethod
    def _logit_rows(reqs: list[ScheduledRequest], qsl: np.ndarray) -> np.ndarray:
        rows = [qsl[1:] - 1]  # (B,) each request's last row, then the scored rows
        for i, r in enumerate(reqs):
            if r.score_targets:
                first = int(qsl[i]) + r.score_from
                rows.append(np.arange(first, first + len(r.score_targets), dtype=np.int64))
        return np.concatenate(rows)

    def _block_table(self, reqs: list[ScheduledRequest], group: int) -> np.ndarray:
        width = max(len(r.attn_block_ids[group]) for r in reqs)
        table = np.zeros((len(reqs), max(width, 1)), dtype=np.int64)  # (B, max_blocks)
        for i, r in enumerate(reqs):
            ids = r.attn_block_ids[group]
            table[i, : len(ids)] = ids
        return table

    def _slots(self, table: np.ndarray, tok_req: np.ndarray, pos: np.ndarray) -> np.ndarray:
        bt = self.block_tokens
        return table[tok_req, pos // bt] * bt + pos % bt  # (T,)


def _mask_rows(masks: TokenMasks, sampled_ids: list[str]) -> AllowedTokens:
    """The structured-output masks of this step, addressed by row of the sampled block; an
    n / best_of prompt's row is sampled once per sample, and each of those rows gets its mask."""
    which = {rid: j for j, rid in enumerate(masks.request_ids)}
    pairs = [(i, which[rid]) for i, rid in enumerate(sampled_ids) if rid in which]
    if [j for _, j in pairs] == list(range(len(masks.request_ids))):
        return AllowedTokens(tuple(i for i, _ in pairs), masks.bits)
    picks = torch.tensor([j for _, j in pairs], dtype=torch.long)
    return AllowedTokens(tuple(i for i, _ in pairs), masks.bits.index_select(0, picks))
