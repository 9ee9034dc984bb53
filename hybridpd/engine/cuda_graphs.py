"""CUDA graphs for decode-only steps: capture once per batch-size bucket, replay per step.

Owns the persistent input buffers of captured decode steps (one pinned host staging buffer and
one device buffer of the same int64 layout: token ids, positions, context and sequence lengths,
per attention group a fixed-width block table and a slot mapping, per Mamba group the state
ids), the bucket choice, capture (after the pool is sized: graphs read views of the one pool
buffer, never copies, so NIXL writes land where replayed kernels read) and replay. A step of n
decodes runs the smallest bucket b >= n; rows n..b-1 are padding pointed at the null block 0 (KV
slot 0 of block 0, state id 0, block table of zeros, sequence length 1), never at a live slot,
and their logits are dropped. One host->device copy per step; the caller's sampling is the one
device->host sync. Knows nothing of request lifecycles or sampling; only `ScheduledRequest`'s
index fields.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TypeVar

import numpy as np
import torch

from hybridpd.engine.scheduler import ScheduledRequest
from hybridpd.model.forward_batch import CacheViews, ForwardBatch

log = logging.getLogger(__name__)

NULL_BLOCK = 0

# the host staging buffer (numpy view) or the device buffer: the layout helpers return views of
# whichever they are given
_Buf = TypeVar("_Buf", np.ndarray, torch.Tensor)


def default_buckets(max_num_seqs: int) -> tuple[int, ...]:
    """1, 2, 4, 8, then every 8 up to max_num_seqs (max_num_seqs itself always included)."""
    sizes = [b for b in (1, 2, 4) if b < max_num_seqs]
    sizes += list(range(8, max_num_seqs, 8))
    return tuple(sorted(set(sizes) | {max_num_seqs}))


class DecodeGraphs:
    """Captured decode steps over persistent buffers, one graph per batch-size bucket."""

    def __init__(self, model: torch.nn.Module, cache: CacheViews, block_tokens: int,
                 num_attn_groups: int, num_mamba_groups: int, device: torch.device,
                 max_num_seqs: int, max_model_len: int,
                 buckets: Sequence[int] | None = None) -> None:
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {device}")
        if not getattr(model, "graph_safe", True):
            raise ValueError("this model's decode step syncs with the host (MoE outside bf16 "
                             "has no grouped GEMM here): it cannot be captured")
        self.model = model
        self.cache = cache
        self.block_tokens = block_tokens
        self.num_attn_groups = num_attn_groups
        self.num_mamba_groups = num_mamba_groups
        self.device = device
        self.width = max(1, -(-max_model_len // block_tokens))  # block-table columns
        self.buckets = tuple(sorted(set(buckets or default_buckets(max_num_seqs))))
        if not self.buckets or self.buckets[0] < 1:
            raise ValueError(f"bad decode graph buckets {self.buckets}")
        m, w, a, g = self.buckets[-1], self.width, num_attn_groups, num_mamba_groups
        self.max_batch = m
        # packed int64 layout: ids | positions | ctx | seq_lens | slots[a] | states[g] | tables[a]
        self._rows = 4 + a + g
        size = m * self._rows + a * m * w
        self._host = torch.zeros(size, dtype=torch.int64, pin_memory=True)
        self._np = self._host.numpy()
        self._dev = torch.zeros(size, dtype=torch.int64, device=device)
        self._copied = torch.cuda.Event()
        self._qsl = torch.arange(m + 1, dtype=torch.int64, device=device)
        self._has_init = torch.ones(m, dtype=torch.bool, device=device)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    # ---- layout --------------------------------------------------------------------------
    def _row(self, buf: _Buf, i: int) -> _Buf:
        m = self.max_batch
        return buf[i * m:(i + 1) * m]

    def _table(self, buf: _Buf, group: int) -> _Buf:
        m, w = self.max_batch, self.width
        start = m * self._rows + group * m * w
        return buf[start:start + m * w].reshape(m, w)

    def _batch(self, b: int) -> ForwardBatch:
        """The ForwardBatch of bucket b: views of the device buffer (stable addresses)."""
        d, a = self._dev, self.num_attn_groups
        seq_lens = self._row(d, 3)[:b]
        return ForwardBatch(
            input_ids=self._row(d, 0)[:b],
            positions=self._row(d, 1)[:b],
            query_start_loc=self._qsl[:b + 1],
            context_lens=self._row(d, 2)[:b],
            seq_lens=seq_lens,
            has_initial_state=self._has_init[:b],
            logits_indices=self._qsl[:b],
            attn_block_tables=tuple(self._table(d, j)[:b] for j in range(a)),
            attn_slot_mappings=tuple(self._row(d, 4 + j)[:b] for j in range(a)),
            mamba_state_ids=tuple(self._row(d, 4 + a + j)[:b]
                                  for j in range(self.num_mamba_groups)),
            num_decodes=b,
            max_query_len=1,
            max_seq_len=self.width * self.block_tokens,
        )

    def _fill(self, reqs: Sequence[ScheduledRequest], b: int) -> None:
        """Stage rows [0, b): the requests, then padding at the null block; copy to device."""
        self._copied.synchronize()  # the previous step's copy has left the staging buffer
        h, a, n, bt = self._np, self.num_attn_groups, len(reqs), self.block_tokens
        ids, pos, ctx, seq = (self._row(h, i) for i in range(4))
        for i, r in enumerate(reqs):
            ids[i] = r.token_ids[0]
            pos[i] = r.num_computed
        ctx[:n] = pos[:n]
        seq[:n] = pos[:n] + 1
        ids[n:b] = 0
        pos[n:b] = 0
        ctx[n:b] = 0
        seq[n:b] = 1  # padded rows attend one (null) slot: no empty softmax
        for j in range(a):
            table = self._table(h, j)
            table[:b] = NULL_BLOCK
            for i, r in enumerate(reqs):
                blocks = r.attn_block_ids[j]
                table[i, :len(blocks)] = blocks
            slots = self._row(h, 4 + j)
            p = pos[:n]
            slots[:n] = table[np.arange(n), p // bt] * bt + p % bt
            slots[n:b] = NULL_BLOCK * bt
        for j in range(self.num_mamba_groups):
            states = self._row(h, 4 + a + j)
            for i, r in enumerate(reqs):
                states[i] = r.mamba_block_ids[j]
            states[n:b] = NULL_BLOCK
        self._dev.copy_(self._host, non_blocking=True)
        self._copied.record()

    # ---- capture and replay --------------------------------------------------------------
    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, largest first, sharing one memory pool."""
        self._fill((), self.max_batch)  # every row padding: warm-up and capture touch block 0
        pool = torch.cuda.graph_pool_handle()
        for b in reversed(self.buckets):
            batch = self._batch(b)
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):  # warm-up: lazy inits and Triton compiles stay out
                for _ in range(2):
                    self.model(batch, self.cache)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = self.model(batch, self.cache)  # (b, V) static output
            self._graphs[b] = (graph, logits)
        torch.cuda.synchronize(self.device)
        log.info("captured decode graphs for batch sizes %s (block table width %d)",
                 self.buckets, self.width)

    @property
    def captured(self) -> tuple[int, ...]:
        return tuple(sorted(self._graphs))

    def bucket_for(self, n: int) -> int | None:
        for b in self.buckets:
            if b >= n:
                return b
        return None

    def can_run(self, reqs: Sequence[ScheduledRequest]) -> bool:
        """A decode-only step that fits a captured bucket and the fixed table width."""
        if not reqs or len(reqs) > self.max_batch or not self._graphs:
            return False
        return all(r.is_decode and all(len(t) <= self.width for t in r.attn_block_ids)
                   for r in reqs)

    def run(self, reqs: Sequence[ScheduledRequest]) -> torch.Tensor:
        """Replay the step; (len(reqs), V) float32 logits (a view of the graph's output)."""
        b = self.bucket_for(len(reqs))
        if b is None or b not in self._graphs:
            raise ValueError(f"no captured decode graph for batch {len(reqs)}")
        self._fill(reqs, b)
        graph, logits = self._graphs[b]
        graph.replay()
        return logits[:len(reqs)]
