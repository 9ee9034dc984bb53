"""Pool sizing on a GPU (`engine/worker.py: pool_budget`), with CUDA's memory queries faked:
with `--gpu-memory-utilization` the pool is the instance's share of *total* memory minus what
the process already holds, whatever is free (instances sharing a GPU do not race)."""

from __future__ import annotations

import pytest
import torch

from hybridpd.engine.args import EngineArgs
from hybridpd.engine.worker import pool_budget

GIB = 2**30
CUDA = torch.device("cuda", 0)


@pytest.fixture
def gpu(monkeypatch):
    state = {"free": 100 * GIB, "total": 140 * GIB, "held": 16 * GIB}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d=None: (state["free"], state["total"]))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d=None: state["held"])
    return state


def test_share_of_total_memory_does_not_depend_on_free_memory(gpu):
    args = EngineArgs(model_dir="/m", gpu_memory_utilization=0.4)
    first = pool_budget(args, CUDA)
    assert first == int(140 * GIB * 0.4) - 16 * GIB
    gpu["free"] = 30 * GIB  # another instance on the GPU took its share meanwhile
    assert pool_budget(args, CUDA) == first


def test_without_a_share_the_default_follows_free_memory(gpu):
    args = EngineArgs(model_dir="/m")
    assert pool_budget(args, CUDA) == int(100 * GIB * 0.85)
    assert pool_budget(EngineArgs(model_dir="/m", cache_memory=GIB,
                                  gpu_memory_utilization=0.4), CUDA) == GIB


def test_a_share_smaller_than_the_weights_is_a_clear_error(gpu):
    gpu["held"] = 60 * GIB
    with pytest.raises(ValueError, match="raise the share"):
        pool_budget(EngineArgs(model_dir="/m", gpu_memory_utilization=0.4), CUDA)
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        EngineArgs(model_dir="/m", gpu_memory_utilization=1.5)
