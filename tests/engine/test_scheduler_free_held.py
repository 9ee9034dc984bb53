"""The scheduler is the one owner of block lifetime: blocks a finished request kept for a
remote reader (P's lease, D's quarantine) are freed through `Scheduler.free_held`, never while
the request is still scheduled."""

from __future__ import annotations

import pytest

from hybridpd.cache.pool import BlockPool
from hybridpd.engine.block_manager import BlockManager
from hybridpd.engine.scheduler import Scheduler
from hybridpd.request import FinishReason, Request, SamplingParams


def _scheduled(prompt_len: int = 6) -> tuple[Scheduler, BlockManager]:
    blocks = BlockManager(BlockPool(16), 1, 1, 4)
    sched = Scheduler(blocks, max_num_batched_tokens=64, max_num_seqs=4)
    sched.add(Request("r", list(range(3, 3 + prompt_len)), SamplingParams(max_tokens=4)))
    assert sched.schedule().scheduled  # the prompt got blocks
    return sched, blocks


def test_held_blocks_stay_until_free_held() -> None:
    sched, blocks = _scheduled()
    free_before = blocks.num_free
    sched.finish("r", FinishReason.LENGTH, keep_blocks=True)
    assert blocks.holds("r") and blocks.num_free == free_before  # held for the reader
    sched.free_held("r")
    assert not blocks.holds("r") and blocks.num_free == blocks.num_usable


def test_free_held_refuses_a_scheduled_request() -> None:
    sched, blocks = _scheduled()
    with pytest.raises(ValueError, match="still scheduled"):
        sched.free_held("r")
    assert blocks.holds("r") and "r" in sched.requests  # nothing was freed
