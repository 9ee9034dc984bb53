"""Side channel over real TCP: framing, validation, hostile clients, deadlines, shutdown."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import json  # noqa: E402
import socket  # noqa: E402
import struct  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from hybridpd.disagg.errors import SideChannelError, SideChannelRemoteError  # noqa: E402
from hybridpd.disagg.side_channel import (  # noqa: E402
    MAX_FRAME_BYTES,
    PROTOCOL_VERSION,
    SideChannelServer,
    decode_bytes,
    encode_bytes,
    read_frame,
    side_channel_call,
)

torch.set_num_threads(1)

HOST = "127.0.0.1"
HANG_GUARD_S = 10.0  # a deadline that only a hang reaches: never a bound on how fast
_release = threading.Event()  # lets a "block" request's handler return


def wait_until(predicate: Any, what: str, timeout_s: float = HANG_GUARD_S) -> None:
    """Poll until `predicate()` holds; fail (never hang) if it does not within the guard."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.01)


def _handler(request: dict[str, Any]) -> dict[str, Any]:
    kind = request["type"]
    if kind == "echo":
        payload = decode_bytes(request["blob"])
        return {"blob": encode_bytes(payload[::-1]), "seen_type": kind, "seen_v": request["v"]}
    if kind == "boom":
        raise KeyError("no such lease 42")
    if kind == "sleep":
        time.sleep(float(request["s"]))
        return {}
    if kind == "block":  # answers only once the test sets _release
        _release.wait(HANG_GUARD_S)
        return {}
    if kind == "not_a_dict":
        return [1, 2]  # type: ignore[return-value]
    if kind == "unserializable":
        return {"x": object()}
    raise ValueError(f"unknown type {kind}")


@pytest.fixture
def server() -> Iterator[SideChannelServer]:
    srv = SideChannelServer(HOST, 0, _handler, read_timeout_s=0.5).start()
    yield srv
    srv.stop()


def _frame(obj: Any) -> bytes:
    body = json.dumps(obj).encode()
    return struct.pack(">I", len(body)) + body


def _raw_exchange(port: int, data: bytes, pause_s: float = 0.0) -> dict[str, Any]:
    """Send raw bytes, read the one answer frame and check the server closed the connection."""
    with socket.create_connection((HOST, port), timeout=3) as sock:
        if data:
            sock.sendall(data)
        time.sleep(pause_s)
        answer = read_frame(sock, time.monotonic() + 3)
        assert _closed_by_peer(sock)
    return answer


def _closed_by_peer(sock: socket.socket) -> bool:
    """EOF, or a reset when the server closed with our unread bytes still queued."""
    sock.settimeout(3)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def _echo_ok(port: int) -> None:
    blob = os.urandom(1000)
    got = side_channel_call(HOST, port, {"type": "echo", "blob": encode_bytes(blob)}, 3.0)
    assert decode_bytes(got["blob"]) == blob[::-1]


def test_roundtrip_with_binary_payload(server: SideChannelServer) -> None:
    blob = os.urandom(3 << 20)  # NIXL metadata is far smaller; this checks large frames
    got = side_channel_call(HOST, server.port, {"type": "echo", "blob": encode_bytes(blob)}, 5.0)
    assert got["ok"] is True and got["v"] == PROTOCOL_VERSION
    assert got["seen_type"] == "echo" and got["seen_v"] == PROTOCOL_VERSION
    assert decode_bytes(got["blob"]) == blob[::-1]


def test_handler_exception_becomes_error_response(server: SideChannelServer) -> None:
    with pytest.raises(SideChannelRemoteError, match="no such lease 42") as info:
        side_channel_call(HOST, server.port, {"type": "boom"}, 3.0)
    assert info.value.response["ok"] is False
    with pytest.raises(SideChannelRemoteError, match="not an object"):
        side_channel_call(HOST, server.port, {"type": "not_a_dict"}, 3.0)
    with pytest.raises(SideChannelRemoteError, match="unusable"):
        side_channel_call(HOST, server.port, {"type": "unserializable"}, 3.0)
    _echo_ok(server.port)


@pytest.mark.parametrize(
    ("data", "expect"),
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "exceeds the limit"),
        (struct.pack(">I", 9) + b"{not json", "not UTF-8 JSON"),
        (struct.pack(">I", 4) + b"\xff\xfe\xfd\xfc", "not UTF-8 JSON"),
        (_frame([1, 2, 3]), "JSON object"),
        (_frame({"v": PROTOCOL_VERSION}), '"type"'),
        (_frame({"v": PROTOCOL_VERSION, "type": ""}), '"type"'),
        (_frame({"v": 2, "type": "echo"}), "version 2 is not supported"),
        (_frame({"type": "echo"}), "version None is not supported"),
        (struct.pack(">I", MAX_FRAME_BYTES + 1), "exceeds the limit"),
    ],
)
def test_bad_frames_get_error_and_server_keeps_serving(
    server: SideChannelServer, data: bytes, expect: str
) -> None:
    answer = _raw_exchange(server.port, data)
    assert answer["ok"] is False and answer["v"] == PROTOCOL_VERSION
    assert expect in answer["error"]
    _echo_ok(server.port)


def test_slow_loris_is_cut_off_while_others_are_served(server: SideChannelServer) -> None:
    with socket.create_connection((HOST, server.port), timeout=HANG_GUARD_S) as slow:
        slow.sendall(b"\x00\x00")  # half a header, then nothing
        _echo_ok(server.port)  # served while the slow client holds its connection
        # the server's answer, not our deadline (a hang guard): its read timeout cut us off
        answer = read_frame(slow, time.monotonic() + HANG_GUARD_S)
    assert answer["ok"] is False and "timed out" in answer["error"]
    _echo_ok(server.port)


def test_busy_server_refuses_extra_connections() -> None:
    srv = SideChannelServer(HOST, 0, _handler, read_timeout_s=1.0, max_connections=1).start()
    try:
        with socket.create_connection((HOST, srv.port), timeout=3):
            time.sleep(0.2)  # let the server take the only slot
            with pytest.raises(SideChannelRemoteError, match="busy"):
                side_channel_call(HOST, srv.port, {"type": "echo", "blob": ""}, 3.0)
        time.sleep(1.2)  # the idle connection times out and frees the slot
        _echo_ok(srv.port)
    finally:
        srv.stop()


def test_client_errors_are_clear() -> None:
    probe = socket.socket()
    probe.bind((HOST, 0))
    dead_port = probe.getsockname()[1]
    probe.close()  # nothing listens here now
    with pytest.raises(SideChannelError, match="cannot connect"):
        side_channel_call(HOST, dead_port, {"type": "echo"}, 1.0)
    with pytest.raises(SideChannelError, match='"type"'):
        side_channel_call(HOST, dead_port, {"no_type": 1}, 1.0)
    with pytest.raises(SideChannelError, match="base64"):
        decode_bytes("not base64 !!")


def test_client_call_has_a_deadline(server: SideChannelServer) -> None:
    _release.clear()
    try:  # the server cannot answer before we let it: only the call's own deadline ends it
        with pytest.raises(SideChannelError, match="timed out"):
            side_channel_call(HOST, server.port, {"type": "block"}, 0.3)
    finally:
        _release.set()


def _fake_server(answer: bytes) -> tuple[socket.socket, threading.Thread]:
    listener = socket.create_server((HOST, 0))

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            read_frame(conn, time.monotonic() + 3)
            conn.sendall(answer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener, thread


@pytest.mark.parametrize(
    ("answer", "expect"),
    [
        (b"\x00\x00\x00\x05hello", "not UTF-8 JSON"),
        (_frame({"v": 7, "ok": True}), "version 7"),
        (_frame({"v": PROTOCOL_VERSION}), '"ok"'),
        (b"\x00\x00", "closed"),
    ],
)
def test_malformed_responses_raise(answer: bytes, expect: str) -> None:
    listener, thread = _fake_server(answer)
    try:
        with pytest.raises(SideChannelError, match=expect):
            side_channel_call(HOST, listener.getsockname()[1], {"type": "x"}, 2.0)
    finally:
        thread.join(3)
        listener.close()


def test_stop_cuts_open_connections_joins_threads_and_frees_port() -> None:
    before = set(threading.enumerate())
    # request deadlines far beyond stop's joins: only cutting the idle connection lets stop
    # join its thread (waiting would leave it alive, and the idle client would get no EOF)
    srv = SideChannelServer(HOST, 0, _handler, read_timeout_s=60.0, auth_timeout_s=60.0).start()
    port = srv.port
    idle = socket.create_connection((HOST, port), timeout=HANG_GUARD_S)  # open at stop time
    wait_until(lambda: len(set(threading.enumerate()) - before) >= 2,
               "the server accepted the idle connection (accept + serving thread)")
    srv.stop()
    with idle:
        try:
            data = idle.recv(1)  # the guard's socket timeout raises if the server never cuts
        except ConnectionResetError:
            data = b""
    assert data == b""  # cut by stop, not answered by a read timeout
    assert not [t for t in set(threading.enumerate()) - before if t.is_alive()]
    again = SideChannelServer(HOST, port, _handler).start()  # same port is free again
    try:
        assert again.port == port
        _echo_ok(port)
    finally:
        again.stop()
