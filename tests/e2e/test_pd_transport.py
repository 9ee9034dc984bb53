"""Never silently slow, end to end (real processes, NIXL over UCX loopback): after one P/D
request D's /metrics and the response's `kv_transfer_stats` name the pair's transport and its
calibrated bandwidth; a pair made to look slow (a floor no CPU pair reaches) is warned about in
D's log and still used; with `--kv-require-fast-transport` it is refused and the request is
recomputed on D with exactly the co-located output."""

from __future__ import annotations

import re
import urllib.request
from pathlib import Path

import pytest

from .cluster import completion, start_deployment, wait_pool_free

UNREACHABLE_GBPS = "1e9"


def _metrics(url: str) -> str:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        return r.read().decode()


def _log(dep) -> str:
    return Path(dep.decode[0].log_path).read_text()


@pytest.fixture(scope="module")
def slow_pair(e2e_models, logs):
    dep = start_deployment(e2e_models["tiny"], logs, "--kv-transport-floor-gbps",
                           UNREACHABLE_GBPS)
    yield dep
    dep.stop()


def test_stats_and_metrics_name_the_transport_and_slow_pairs_are_warned(slow_pair, e2e_models):
    name = Path(e2e_models["tiny"]).name
    prompt = [(7 * j) % 200 + 3 for j in range(30)]
    status, body = completion(slow_pair.url, name, prompt, 6)
    assert status == 200, body
    stats = body["kv_transfer_stats"]
    assert stats["outcome"] == "ok"  # slow is a warning, not a failure
    assert stats["transport"].startswith("ucx:") and stats["calibrated_gbps"] > 0
    assert stats["topology"] == "same-host-cpu" and stats["transport_verdict"] == "slow"
    text = _metrics(slow_pair.decode[0].url)
    m = re.search(r'^hybridpd_kv_peer_bandwidth_gbps\{([^}]*)\} (\S+)$', text, re.M)
    assert m is not None, text
    assert f'transport="{stats["transport"]}"' in m.group(1) and 'peer="' in m.group(1)
    assert float(m.group(2)) == pytest.approx(stats["calibrated_gbps"])
    log = _log(slow_pair)
    assert re.search(r"kv handshake with \S+: transport ucx:\S+ .*GB/s", log), log[-2000:]
    assert "KV transfers from" in log and "Fix:" in log


def test_required_fast_transport_refuses_and_recompute_equals_colocated(
        e2e_models, references, logs):
    path = e2e_models["tiny"]
    name = Path(path).name
    dep = start_deployment(path, logs, "--kv-transport-floor-gbps", UNREACHABLE_GBPS,
                           "--kv-require-fast-transport")
    try:
        for i, n in enumerate((9, 30)):
            prompt = [(11 * j + i) % 250 + 3 for j in range(n)]
            status, got = completion(dep.url, name, prompt, 8)
            assert status == 200, got
            stats = got["kv_transfer_stats"]
            assert stats["outcome"] == "failed" and "Refusing the pair" in stats["error"]
            _, want = completion(references["tiny"].url, name, prompt, 8)
            assert got["choices"][0]["token_ids"] == want["choices"][0]["token_ids"]
        assert "Refusing the pair" in _log(dep)
        recomputed = re.search(
            r'^hybridpd_engine_requests_recomputed_total\{model_name="[^"]+"\} (\S+)$',
            _metrics(dep.decode[0].url), re.M)
        assert recomputed is not None and float(recomputed.group(1)) == 2
        for c in dep.prefill + dep.decode:  # P released the refused hand-offs
            pool = wait_pool_free(c.url)
            assert pool["free_blocks"] == pool["total_blocks"]
    finally:
        dep.stop()
