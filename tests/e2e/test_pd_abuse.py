"""Abuse of a P/D pair with a deployment secret (real processes, real NIXL, loopback): each
attack from issue 11 now fails closed. P hands off state only to the authenticated proxy; a
consumed hand-off replayed to D is refused and never yields another request's state; forged or
unsigned side-channel frames get no metadata and no acknowledgement; renewals cannot pin P's
pool past the maximum lease lifetime (forged ones do not renew at all); idle connections holding
every side-channel slot do not fail legitimate transfers; P/D roles refuse to start without a
secret unless --insecure-dev."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from hybridpd.disagg.auth import HANDOFF_AUTH_HEADER, sign_handoff_request
from hybridpd.disagg.errors import SideChannelRemoteError
from hybridpd.disagg.side_channel import PROTOCOL_VERSION, encode_frame, read_frame
from hybridpd.disagg.side_channel import side_channel_call as call

from .cluster import (
    completion,
    get,
    post,
    side_channel_port,
    start_instances,
    wait_pool_free,
)

SECRET = "e2e-abuse-secret"
LEASE_S, MAX_LEASE_S = 2.0, 5.0


def _prompt(n: int, salt: int = 0) -> list[int]:
    return [(17 * j + salt) % 300 + 3 for j in range(n)]


@pytest.fixture(scope="module")
def pair(e2e_models, logs):
    path = e2e_models["tiny"]
    lease = ("--lease-s", str(LEASE_S), "--max-lease-s", str(MAX_LEASE_S))
    p, d = start_instances(logs, (path, "prefill", lease), (path, "decode", lease),
                           secret=SECRET)
    try:
        yield p, d, Path(path).name
    finally:
        p.stop()
        d.stop()


def _body(name: str, prompt: list[int], max_tokens: int = 8, **kw) -> dict:
    return {"model": name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True, **kw}


def _prefill(p_url: str, name: str, rid: str, prompt: list[int], header: str | None = "sign"
             ) -> tuple[int, dict]:
    """What the proxy does: P's leg, authenticated with the deployment secret."""
    body = _body(name, prompt, kv_transfer_params={"do_remote_decode": True})
    headers = {"X-Request-Id": rid}
    if header == "sign":
        headers[HANDOFF_AUTH_HEADER] = sign_handoff_request(SECRET, rid, json.dumps(body).encode())
    elif header is not None:
        headers[HANDOFF_AUTH_HEADER] = header
    return post(p_url + "/v1/completions", body, headers=headers)


def _decode(d_url: str, name: str, rid: str, prompt: list[int], kv: dict) -> tuple[int, dict]:
    return post(d_url + "/v1/completions",
                _body(name, prompt, kv_transfer_params={"do_remote_prefill": True, **kv}),
                headers={"X-Request-Id": rid})


def _pd(p_url: str, d_url: str, name: str, rid: str, prompt: list[int]) -> tuple[list[int], dict]:
    status, first = _prefill(p_url, name, rid, prompt)
    assert status == 200, first
    status, rest = _decode(d_url, name, rid, prompt, first["kv_transfer_params"])
    assert status == 200, rest
    return (first["choices"][0]["token_ids"] + rest["choices"][0]["token_ids"],
            rest["kv_transfer_stats"])


def _reference(references, name: str, prompt: list[int]) -> list[int]:
    status, want = completion(references["tiny"].url, name, prompt, 8)
    assert status == 200
    return want["choices"][0]["token_ids"]


def _assert_free(*urls: str, timeout_s: float = 15) -> None:
    for url in urls:
        pool = wait_pool_free(url, timeout_s)
        assert pool["free_blocks"] == pool["total_blocks"], (url, pool)


def _side(child) -> tuple[str, int]:
    return "127.0.0.1", side_channel_port(child)


def test_prefill_hands_off_only_to_the_authenticated_proxy(pair, references):
    p, d, name = pair
    prompt = _prompt(15, 1)
    status, body = _prefill(p.url, name, "h-1", prompt, header=None)
    assert status == 403 and "proxy" in body["error"]["message"]
    forged = sign_handoff_request("not-the-secret", "h-1", b"{}")
    assert _prefill(p.url, name, "h-2", prompt, header=forged)[0] == 403
    other_body = sign_handoff_request(SECRET, "h-3", b'{"prompt": "something else"}')
    assert _prefill(p.url, name, "h-3", prompt, header=other_body)[0] == 403
    got, stats = _pd(p.url, d.url, name, "h-4", prompt)
    assert stats["outcome"] == "ok" and got == _reference(references, name, prompt)
    status, plain = completion(p.url, name, prompt, 4)  # ordinary requests need nothing
    assert status == 200 and "kv_transfer_params" not in plain
    _assert_free(p.url, d.url)


def test_replayed_hand_off_is_refused_and_never_leaks(pair, references):
    p, d, name = pair
    attacker, victim = _prompt(20, 2), _prompt(20, 3)
    status, first = _prefill(p.url, name, "atk", attacker)
    assert status == 200
    kv = first["kv_transfer_params"]
    status, used = _decode(d.url, name, "atk", attacker, kv)
    assert status == 200 and used["kv_transfer_stats"]["outcome"] == "ok"
    _assert_free(p.url)
    status, v_first = _prefill(p.url, name, "vic", victim)  # the victim reuses the blocks
    assert status == 200
    for rid in ("atk", "atk-again"):
        status, replay = _decode(d.url, name, rid, attacker, kv)
        assert 400 <= status < 500 and "already consumed" in replay["error"]["message"]
    status, v_rest = _decode(d.url, name, "vic", victim, v_first["kv_transfer_params"])
    assert status == 200 and v_rest["kv_transfer_stats"]["outcome"] == "ok"
    assert v_first["choices"][0]["token_ids"] + v_rest["choices"][0]["token_ids"] == \
        _reference(references, name, victim)
    _assert_free(p.url, d.url)


@pytest.mark.parametrize("role", ["prefill", "decode"])
def test_forged_side_channel_frames_get_no_metadata_and_no_ack(pair, role):
    p, d, _ = pair
    host, port = _side(p if role == "prefill" else d)
    messages = [{"type": "handshake", "compat_hash": "x" * 64},
                {"type": "renew", "transfer_ids": ["t"]},
                {"type": "release", "transfer_ids": ["t"]},
                {"type": "confirm", "transfer_id": "t"}]
    for msg in messages:
        for secret in (None, "another-deployment"):
            with pytest.raises(SideChannelRemoteError) as info:
                call(host, port, msg, 3.0, secret=secret)
            assert info.value.response["ok"] is False
            assert not {"agent_metadata", "geometry", "state"} & info.value.response.keys()
        with socket.create_connection((host, port), timeout=3) as sock:  # raw bytes too
            sock.sendall(encode_frame({"v": PROTOCOL_VERSION, **msg}))
            answer = read_frame(sock, time.monotonic() + 3)
        assert answer["ok"] is False and "agent_metadata" not in answer


def _renew_until(stop: threading.Event, host: str, port: int, tid: str, secret: str | None,
                 answers: list[bool]) -> None:
    while not stop.wait(0.25):
        try:
            call(host, port, {"type": "renew", "transfer_ids": [tid]}, 2.0, secret=secret)
            answers.append(True)
        except Exception:  # noqa: BLE001 - refused or failed: recorded
            answers.append(False)


@pytest.mark.parametrize("secret", [None, SECRET], ids=["forged-renews", "member-renews"])
def test_renewals_cannot_pin_the_pool(pair, secret):
    """Forged renewals are refused (the lease ends after lease_s); even authenticated ones
    (a compromised member) cannot hold the blocks past the maximum lease lifetime."""
    p, _, name = pair
    status, first = _prefill(p.url, name, f"pin-{secret is None}", _prompt(30, 4))
    assert status == 200
    tid = first["kv_transfer_params"]["transfer_id"]
    held_at_start = get(p.url + "/v1/pool")
    assert held_at_start["free_blocks"] < held_at_start["total_blocks"]
    stop, answers = threading.Event(), []
    renewer = threading.Thread(target=_renew_until, args=(stop, *_side(p), tid, secret, answers),
                               daemon=True)
    start = time.monotonic()
    renewer.start()
    try:
        _assert_free(p.url, timeout_s=MAX_LEASE_S + 10)
        freed_after = time.monotonic() - start
        assert answers and all(a == (secret is not None) for a in answers), answers
    finally:
        stop.set()
        renewer.join(5)
    if secret is not None:  # the renewals were real: the lease outlived lease_s ...
        assert freed_after > LEASE_S
    assert freed_after < MAX_LEASE_S + 10  # ... but not the maximum (checked by the wait)


def test_idle_connections_holding_every_slot_do_not_fail_transfers(pair, references):
    p, d, name = pair
    idle = [socket.create_connection(_side(child), timeout=3)
            for child in (p, d) for _ in range(80)]  # more than each server's 64 slots
    try:
        for i in range(4):
            prompt = _prompt(12 + i, 10 + i)
            got, stats = _pd(p.url, d.url, name, f"slots-{i}", prompt)
            assert stats["outcome"] == "ok", stats
            assert got == _reference(references, name, prompt)
    finally:
        for sock in idle:
            sock.close()
    _assert_free(p.url, d.url)


@pytest.mark.parametrize("role", ["prefill", "decode"])
def test_pd_roles_refuse_to_start_without_a_secret(e2e_models, role):
    env = {k: v for k, v in os.environ.items() if k != "HYBRIDPD_KV_SECRET"}
    done = subprocess.run(
        [sys.executable, "-m", "hybridpd.cli", "serve", "--model", e2e_models["tiny"], "--role",
         role, "--port", "0"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "HYBRIDPD_KV_SECRET" in lines[0] and "--insecure-dev" in lines[0]
