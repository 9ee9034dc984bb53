"""The proxy's per-request P/D phases (`pd_timing`) and the handover split in its metrics, over
real HTTP with fake prefill and decode instances (which report TRANSFER_STATS)."""

from __future__ import annotations

import pytest
from fakes import TRANSFER_STATS
from harness import MODEL, LoopThread
from http_util import get, metric_value, parse_sse, post
from test_pd_proxy import Deployment


@pytest.fixture(scope="module")
def dep():
    lt = LoopThread()
    d = Deployment(lt)
    try:
        for role in ("prefill", "decode"):
            d.add(role, delay_s=0.003)
        d.main = d.proxy(d.p_urls, d.d_urls)
        yield d
    finally:
        d.close()
        lt.close()


def _count(text: str, name: str) -> float:
    return metric_value(text, f"{name}_count", model_name=MODEL)


def test_non_stream_answer_carries_the_phases(dep):
    status, body, _ = post(f"{dep.main}/v1/completions",
                           {"model": MODEL, "prompt": "hi", "max_tokens": 6})
    assert status == 200, body
    t = body["pd_timing"]
    assert t["transfer_s"] == TRANSFER_STATS["seconds"]
    assert t["prefill_s"] > 0 and t["decode_s"] > 0 and "handover_s" not in t
    assert body["kv_transfer_stats"] == TRANSFER_STATS  # D's stats untouched


def test_stream_final_chunk_carries_handover_and_metrics_split_it(dep):
    name = "hybridpd_proxy_handover"
    _, before, _ = get(f"{dep.main}/metrics")
    status, text, _ = post(f"{dep.main}/v1/completions", {
        "model": MODEL, "prompt": "hi", "max_tokens": 8, "stream": True})
    assert status == 200
    events = [e for e in parse_sse(text) if isinstance(e, dict)]
    final = [e for e in events if "kv_transfer_stats" in e]
    assert len(final) == 1 and final[0]["kv_transfer_stats"] == TRANSFER_STATS
    t = final[0]["pd_timing"]
    assert t["transfer_s"] == TRANSFER_STATS["seconds"] and t["handover_s"] > 0
    assert t["prefill_s"] > 0
    _, after, _ = get(f"{dep.main}/metrics")
    for metric in ("seconds", "transfer_seconds", "rest_seconds"):
        full = f"{name}_{metric}"
        assert _count(after, full) == _count(before, full) + 1, full
    total = metric_value(after, f"{name}_transfer_seconds_sum", model_name=MODEL)
    assert total >= TRANSFER_STATS["seconds"]
