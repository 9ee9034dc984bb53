"""Authenticated side channel over real TCP: sealed frames, forged / unsigned / stale /
replayed frames refused before the handler runs, responses bound to their request, and idle
connections unable to hold every slot."""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from hybridpd.disagg.auth import new_nonce
from hybridpd.disagg.errors import SideChannelAuthError, SideChannelError, SideChannelRemoteError
from hybridpd.disagg.side_channel import (
    MAX_SECURE_REQUEST_BYTES,
    PROTOCOL_VERSION,
    Direction,
    SideChannelServer,
    _read_body,
    encode_frame,
    frame_key,
    open_body,
    read_frame,
    seal,
    side_channel_call,
)

HOST = "127.0.0.1"
SECRET = "deployment-secret"


class Recorder:
    """A handler that answers with a secret-looking payload and records what reached it."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def __call__(self, msg: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            self.calls.append(msg)
        return {"agent_metadata": "SECRET-METADATA", "echo": msg.get("x")}


@pytest.fixture
def secure() -> Iterator[tuple[SideChannelServer, Recorder]]:
    handler = Recorder()
    srv = SideChannelServer(HOST, 0, handler, secret=SECRET, read_timeout_s=1.0).start()
    yield srv, handler
    srv.stop()


def _sealed_request(secret: str, **fields: Any) -> bytes:
    msg = {"v": PROTOCOL_VERSION, "auth": {"ts": time.time(), "nonce": new_nonce()}, **fields}
    key = frame_key(secret)
    assert key is not None
    return seal(msg, key, Direction.REQUEST)


def _exchange(port: int, frame: bytes) -> bytes:
    with socket.create_connection((HOST, port), timeout=3) as sock:
        sock.sendall(frame)
        return _read_body(sock, time.monotonic() + 3)


def test_sealed_roundtrip_and_response_is_sealed(secure) -> None:
    srv, handler = secure
    got = side_channel_call(HOST, srv.port, {"type": "handshake", "x": 7}, 3.0, secret=SECRET)
    assert got["ok"] is True and got["echo"] == 7
    assert handler.calls[0]["type"] == "handshake" and "auth" not in handler.calls[0]
    assert "auth" not in got


@pytest.mark.parametrize("kind", ["handshake", "renew", "release", "confirm"])
def test_unsigned_frames_get_no_metadata_and_no_ack(secure, kind: str) -> None:
    srv, handler = secure
    body = _exchange(srv.port, encode_frame({"v": PROTOCOL_VERSION, "type": kind,
                                             "transfer_ids": ["t"]}))
    answer = open_body(body, None, Direction.RESPONSE)  # a plain refusal
    assert answer["ok"] is False and "not authenticated" in answer["error"]
    assert "agent_metadata" not in answer and b"SECRET-METADATA" not in body
    with pytest.raises(SideChannelRemoteError, match="HYBRIDPD_KV_SECRET"):
        side_channel_call(HOST, srv.port, {"type": kind}, 3.0)  # an insecure client
    assert handler.calls == []


def test_frames_sealed_with_another_secret_or_altered_are_refused(secure) -> None:
    srv, handler = secure
    with pytest.raises(SideChannelRemoteError, match="authentication failed"):
        side_channel_call(HOST, srv.port, {"type": "handshake"}, 3.0, secret="other-secret")
    frame = bytearray(_sealed_request(SECRET, type="handshake", x=1))
    frame[-3] ^= 0x01  # one bit of the JSON flipped after sealing
    answer = open_body(_exchange(srv.port, bytes(frame)), None, Direction.RESPONSE)
    assert answer["ok"] is False and "authentication failed" in answer["error"]
    assert handler.calls == []


def test_replayed_and_stale_frames_are_refused(secure) -> None:
    srv, handler = secure
    frame = _sealed_request(SECRET, type="handshake", x=1)
    key = frame_key(SECRET)
    first = open_body(_exchange(srv.port, frame), key, Direction.RESPONSE)
    assert first["ok"] is True
    again = open_body(_exchange(srv.port, frame), None, Direction.RESPONSE)  # captured, resent
    assert again["ok"] is False and "replayed" in again["error"]
    assert "agent_metadata" not in again
    stale = seal({"v": PROTOCOL_VERSION, "type": "handshake",
                  "auth": {"ts": time.time() - 3600, "nonce": new_nonce()}},
                 key, Direction.REQUEST)  # type: ignore[arg-type]
    old = open_body(_exchange(srv.port, stale), None, Direction.RESPONSE)
    assert old["ok"] is False and "replay window" in old["error"]
    assert len(handler.calls) == 1


def test_secure_server_reads_little_before_the_mac(secure) -> None:
    srv, handler = secure
    with socket.create_connection((HOST, srv.port), timeout=3) as sock:
        sock.sendall(struct.pack(">I", MAX_SECURE_REQUEST_BYTES + 1))
        answer = read_frame(sock, time.monotonic() + 3)
    assert answer["ok"] is False and "exceeds the limit" in answer["error"]
    assert handler.calls == []


def test_client_refuses_unsealed_or_misbound_answers() -> None:
    key = frame_key(SECRET)
    assert key is not None
    answers = [
        encode_frame({"v": PROTOCOL_VERSION, "ok": True, "agent_metadata": "x"}),  # plain ok
        seal({"v": PROTOCOL_VERSION, "ok": True, "auth": {
            "ts": time.time(), "nonce": new_nonce(), "re": "another-request"}},
             key, Direction.RESPONSE),  # replayed response
        seal({"v": PROTOCOL_VERSION, "ok": True, "auth": {"ts": time.time(), "nonce": new_nonce()}},
             key, Direction.REQUEST),  # a request's seal is not a response's
    ]
    for answer in answers:
        listener = socket.create_server((HOST, 0))

        def serve(reply: bytes = answer, listener: socket.socket = listener) -> None:
            conn, _ = listener.accept()
            with conn:
                _read_body(conn, time.monotonic() + 3)
                conn.sendall(reply)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            with pytest.raises(SideChannelAuthError):
                side_channel_call(HOST, listener.getsockname()[1], {"type": "handshake"}, 3.0,
                                  secret=SECRET)
        finally:
            thread.join(3)
            listener.close()


def test_insecure_side_refuses_sealed_frames_clearly() -> None:
    srv = SideChannelServer(HOST, 0, Recorder()).start()
    try:
        with pytest.raises(SideChannelError, match="HYBRIDPD_KV_SECRET"):
            side_channel_call(HOST, srv.port, {"type": "handshake"}, 3.0, secret=SECRET)
    finally:
        srv.stop()


@pytest.mark.parametrize("per_peer", [None, 4])
def test_idle_connections_cannot_hold_every_slot(per_peer: int | None) -> None:
    """An attacker holding every slot (and more, per peer) with idle connections: each
    legitimate call cuts the oldest unauthenticated one and is served."""
    handler = Recorder()
    srv = SideChannelServer(HOST, 0, handler, secret=SECRET, max_connections=8,
                            max_per_peer=per_peer, evict_after_s=0.0,
                            read_timeout_s=30.0, auth_timeout_s=30.0).start()
    idle = [socket.create_connection((HOST, srv.port), timeout=3) for _ in range(12)]
    try:
        for i in range(20):
            got = side_channel_call(HOST, srv.port, {"type": "confirm", "x": i}, 3.0,
                                    secret=SECRET)
            assert got["ok"] is True and got["echo"] == i
        assert len(handler.calls) == 20
    finally:
        for sock in idle:
            sock.close()
        srv.stop()


def test_recent_unauthenticated_connections_are_not_cut() -> None:
    """Within `evict_after_s` a full server answers busy rather than cut a connection that may
    still be delivering its request."""
    srv = SideChannelServer(HOST, 0, Recorder(), secret=SECRET, max_connections=1,
                            evict_after_s=60.0, read_timeout_s=30.0, auth_timeout_s=30.0).start()
    try:
        with socket.create_connection((HOST, srv.port), timeout=3):
            deadline = time.monotonic() + 5
            while True:  # until the server has taken the idle connection's slot
                try:
                    side_channel_call(HOST, srv.port, {"type": "x"}, 3.0, secret=SECRET)
                except SideChannelRemoteError as exc:
                    assert "busy" in str(exc)
                    break
                assert time.monotonic() < deadline, "the idle connection never took the slot"
    finally:
        srv.stop()


def test_churning_connections_do_not_starve_authenticated_calls() -> None:
    """An attacker that keeps opening fresh connections (so that none is ever old) still cannot
    make a secure server refuse authenticated calls: unauthenticated ones are cut at once."""
    srv = SideChannelServer(HOST, 0, Recorder(), secret=SECRET, max_connections=16).start()
    stop, opened = threading.Event(), [0]

    def churn() -> None:
        socks: list[socket.socket] = []
        while not stop.is_set():
            try:
                socks.append(socket.create_connection((HOST, srv.port), timeout=1))
                opened[0] += 1
            except OSError:
                pass
            if len(socks) > 100:
                for sock in socks[:50]:
                    sock.close()
                del socks[:50]
        for sock in socks:
            sock.close()

    attackers = [threading.Thread(target=churn, daemon=True) for _ in range(2)]
    for t in attackers:
        t.start()
    try:
        deadline = time.monotonic() + 10
        while opened[0] < 100:  # the flood is on: more connections than slots
            assert time.monotonic() < deadline, "the attacker never got going"
            time.sleep(0.01)
        for i in range(50):
            got = side_channel_call(HOST, srv.port, {"type": "confirm", "x": i}, 3.0,
                                    secret=SECRET)
            assert got["echo"] == i
    finally:
        stop.set()
        for t in attackers:
            t.join(5)
        srv.stop()


def test_refusals_are_logged_at_a_bounded_rate(secure, caplog) -> None:
    srv, _ = secure
    with caplog.at_level("WARNING", logger="hybridpd.disagg.side_channel"):
        for _ in range(20):
            _exchange(srv.port, encode_frame({"v": PROTOCOL_VERSION, "type": "handshake"}))
    refused = [r for r in caplog.records if "refused a frame" in r.getMessage()]
    assert len(refused) == 1  # 20 forged frames, one warning (the next one counts the rest)
