"""Failures fail closed (real processes, real NIXL): a dead or frozen P, a mismatched
compatibility hash, garbage handshake answers, a D that never reads, a client that goes away.
With `recompute` D still answers exactly like a co-located instance; with `fail` the client
gets a clear error. Both pools end exactly fully free and both instances keep serving."""

from __future__ import annotations

import http.client
import json
import socket
import time

import pytest

from hybridpd.disagg.side_channel import SideChannelServer

from .cluster import (
    FAST_EXPIRY,
    completion,
    get,
    post,
    side_channel_port,
    start_deployment,
    start_instance,
    start_instances,
    wait_pool_free,
)


def _name(path: str) -> str:
    from pathlib import Path

    return Path(path).name


def _prompt(n: int, salt: int = 0) -> list[int]:
    return [(11 * j + salt) % 300 + 3 for j in range(n)]


def _prefill(p_url: str, name: str, prompt: list[int], max_tokens: int = 10) -> dict:
    status, body = completion(p_url, name, prompt, max_tokens,
                              kv_transfer_params={"do_remote_decode": True})
    assert status == 200, body
    assert body["kv_transfer_params"], body
    return body


def _decode(d_url: str, name: str, prompt: list[int], params: dict, max_tokens: int = 10):
    return completion(d_url, name, prompt, max_tokens,
                      kv_transfer_params={"do_remote_prefill": True, **params})


def _assert_free(*urls: str) -> None:
    for url in urls:
        pool = wait_pool_free(url)
        assert pool["free_blocks"] == pool["total_blocks"], (url, pool)


@pytest.fixture(scope="module")
def decode(e2e_models, logs):
    """One D (FAST_EXPIRY, recompute) for the tests below whose P is new, dies or is foreign:
    each test meets its P for the first time and leaves D's pool free (it asserts so)."""
    d = start_instance(e2e_models["tiny"], "decode", logs, *FAST_EXPIRY)
    yield d
    d.stop()


@pytest.mark.parametrize("cached_peer", [False, True], ids=["before-handshake", "peer-known"])
def test_dead_prefill_recompute_equals_colocated(e2e_models, references, logs, decode,
                                                  cached_peer):
    path = e2e_models["tiny"]
    name = _name(path)
    p = start_instance(path, "prefill", logs, *FAST_EXPIRY)
    d = decode
    try:
        if cached_peer:  # a first request makes D handshake with P and keep the peer
            warm = _prefill(p.url, name, _prompt(9, 1))
            status, _ = _decode(d.url, name, _prompt(9, 1), warm["kv_transfer_params"])
            assert status == 200
        prompt = _prompt(40, 2)
        first = _prefill(p.url, name, prompt)
        p.stop(grace_s=0.1)  # P dies holding the state D is about to read
        status, got = _decode(d.url, name, prompt, first["kv_transfer_params"])
        assert status == 200, got
        assert got["kv_transfer_stats"]["outcome"] == "failed"
        _, want = completion(references["tiny"].url, name, prompt, 10)
        assert first["choices"][0]["token_ids"] + got["choices"][0]["token_ids"] == \
            want["choices"][0]["token_ids"]
        _assert_free(d.url)
        status, again = completion(d.url, name, _prompt(5, 3), 4)  # D keeps serving
        assert status == 200 and len(again["choices"][0]["token_ids"]) == 4
    finally:
        p.stop()


def test_dead_prefill_fail_policy_gives_clear_error(e2e_models, logs):
    path = e2e_models["tiny"]
    name = _name(path)
    p, d = start_instances(logs, (path, "prefill", FAST_EXPIRY),
                           (path, "decode", (*FAST_EXPIRY, "--on-transfer-failure", "fail")))
    try:
        prompt = _prompt(20, 4)
        first = _prefill(p.url, name, prompt)
        p.stop(grace_s=0.1)
        status, body = _decode(d.url, name, prompt, first["kv_transfer_params"])
        assert status >= 500 and "KV transfer" in body["error"]["message"], body
        _assert_free(d.url)
        status, again = completion(d.url, name, _prompt(5, 3), 4)
        assert status == 200
    finally:
        p.stop()
        d.stop()


def test_mismatched_compat_hash_refused_both_keep_serving(e2e_models, references, logs,
                                                          decode, tmp_path):
    from hybridpd.demo.writer import write_demo_model

    other = str(write_demo_model(tmp_path / "tiny", preset="tiny", seed=99).path)  # same shape
    name = _name(e2e_models["tiny"])
    p = start_instance(other, "prefill", logs, *FAST_EXPIRY, "--served-model-name", name)
    d = decode
    try:
        prompt = _prompt(17, 5)
        first = _prefill(p.url, name, prompt)
        status, got = _decode(d.url, name, prompt, first["kv_transfer_params"])
        assert status == 200
        stats = got["kv_transfer_stats"]
        assert stats["outcome"] == "failed" and "compatibility hash" in stats["error"]
        # recomputed locally with D's own weights: D's answer is the co-located one
        full = [*prompt, first["choices"][0]["token_ids"][0]]
        s_want, want = completion(references["tiny"].url, name, full, 9)
        assert s_want == 200, want
        assert got["choices"][0]["token_ids"] == want["choices"][0]["token_ids"]
        assert completion(p.url, name, prompt, 3)[0] == 200
        assert completion(d.url, name, prompt, 3)[0] == 200
        _assert_free(d.url, p.url)  # P frees on D's release message
    finally:
        p.stop()


def test_garbage_handshake_answer_and_garbage_bytes(e2e_models, logs, decode):
    path = e2e_models["tiny"]
    name = _name(path)
    p = start_instance(path, "prefill", logs, *FAST_EXPIRY)
    d = decode
    liar = SideChannelServer("127.0.0.1", 0, lambda msg: {
        "engine_id": "x", "rank": 0, "compat_hash": msg.get("compat_hash"),
        "geometry": {"junk": 1}, "agent_metadata": "bm90IG1ldGFkYXRh"}).start()
    try:
        prompt = _prompt(12, 6)
        first = _prefill(p.url, name, prompt)
        params = dict(first["kv_transfer_params"], side_channel=f"127.0.0.1:{liar.port}",
                      engine_id="x")
        status, got = _decode(d.url, name, prompt, params)
        assert status == 200 and got["kv_transfer_stats"]["outcome"] == "failed"
        # garbage bytes on P's side channel: P answers nothing useful but keeps serving
        with socket.create_connection(("127.0.0.1", side_channel_port(p)), timeout=5) as s:
            s.sendall(b"\xff\x00garbage\r\n" * 50)
        assert completion(p.url, name, prompt, 3)[0] == 200
        second = _prefill(p.url, name, prompt)
        status, ok = _decode(d.url, name, prompt, second["kv_transfer_params"])
        assert status == 200 and ok["kv_transfer_stats"]["outcome"] == "ok"
        _assert_free(d.url, p.url)  # the first request's P blocks: lease expiry (3 s)
    finally:
        liar.stop()
        p.stop()


def test_decode_never_reads_lease_expires(e2e_models, logs):
    path = e2e_models["tiny"]
    name = _name(path)
    p = start_instance(path, "prefill", logs, *FAST_EXPIRY)
    try:
        _prefill(p.url, name, _prompt(30, 7))
        pool = get(p.url + "/v1/pool")
        assert pool["free_blocks"] < pool["total_blocks"]  # held for the reader
        time.sleep(3.5)
        _assert_free(p.url)
        metrics = urllib_text(p.url + "/metrics")
        values = [float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                  if "leases_expired" in line and not line.startswith("#")]
        assert values and max(values) >= 1, metrics
    finally:
        p.stop()


def urllib_text(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


def test_client_disconnect_mid_stream_frees_both(e2e_models, logs):
    path = e2e_models["tiny"]
    name = _name(path)
    dep = start_deployment(path, logs, *FAST_EXPIRY)
    try:
        host, port = dep.url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        body = {"model": name, "prompt": _prompt(50, 8), "max_tokens": 3000, "temperature": 0,
                "ignore_eos": True, "stream": True}
        conn.request("POST", "/v1/completions", json.dumps(body),
                     {"content-type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200
        for _ in range(3):
            assert resp.readline().startswith(b"data: ")
            resp.readline()
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
        _assert_free(*[c.url for c in dep.prefill + dep.decode])
        assert post(dep.url + "/v1/completions", {**body, "stream": False, "max_tokens": 3})[0] \
            == 200
    finally:
        dep.stop()
