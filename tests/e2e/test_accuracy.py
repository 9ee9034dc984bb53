"""Task accuracy as a test of every path: the shipped trained model answers the same held-out
problems identically (every answer, so the same exact-match figure) co-located, through a
1P1D deployment and through P_TP 1 -> D_TP 2, at concurrency 16 (real processes, real NIXL)."""

from __future__ import annotations

import asyncio

import pytest

from hybridpd.bench.accuracy import AccuracyReport, measure
from hybridpd.demo.embedded import embedded_model_dir

from .cluster import start_deployment, start_instance, wait_pool_free

NUM, CONCURRENCY = 64, 16


def _measure(url: str) -> AccuracyReport:
    return asyncio.run(measure(url, num=NUM, concurrency=CONCURRENCY, seed=0))


@pytest.fixture(scope="module")
def colocated(logs) -> AccuracyReport:
    child = start_instance(str(embedded_model_dir()), "both", logs)
    try:
        return _measure(child.url)
    finally:
        child.stop()


@pytest.mark.parametrize(("p_tp", "d_tp"), [(1, 1), (1, 2)], ids=["1P1D", "P1-D2"])
def test_pd_accuracy_equals_colocated(p_tp, d_tp, colocated, logs):
    import torch

    if torch.cuda.is_available() and max(p_tp, d_tp) > torch.cuda.device_count():
        pytest.skip(f"instances run on CUDA here: TP {max(p_tp, d_tp)} needs as many GPUs")
    assert colocated.failed == 0 and colocated.num == NUM
    assert colocated.overall >= 0.9, colocated.line()  # the model has learned its tasks
    dep = start_deployment(str(embedded_model_dir()), logs, prefill_tp=p_tp, decode_tp=d_tp)
    try:
        got = _measure(dep.url)
        assert got.failed == 0, got.line()
        assert [a.output for a in got.answers] == [a.output for a in colocated.answers]
        assert got.overall == colocated.overall and got.per_task == colocated.per_task
        for child in dep.prefill + dep.decode:
            pool = wait_pool_free(child.url)
            assert pool["free_blocks"] == pool["total_blocks"], (child.name, pool)
    finally:
        dep.stop()
