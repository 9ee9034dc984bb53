"""Attacks on a real `hybridpd serve` (embedded demo model, CPU), each now failing closed:
a 20 MB text prompt (refused before tokenising; the API process's memory stays put), deeply
nested JSON (400, no traceback), thousands of idle sockets (capped, closed within the idle
timeout, the server stays up and serves), a body that never finishes (408), a request that
cannot start within the queue deadline (503 `queue_timeout`), and /v1/abort without the API
key or for an id that does not exist (401 / 404)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from http_util import get, post, request, wait_until

API_KEY = "test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
IDLE_S = 1.0
BODY_TIMEOUT_S = 1.0
MAX_CONNECTIONS = 300
QUEUE_TIMEOUT_S = 0.5
START_DEADLINE_S = 180.0
RSS_BOUND_BYTES = 500 * 1024 * 1024  # a memory bound, not a time bound
SOCKET_DEADLINE_S = 20.0


class Serve:
    """`hybridpd serve --port 0` in a subprocess; its stderr goes to a file we can inspect."""

    def __init__(self, tmp: Path, *flags: str) -> None:
        self.err_path = tmp / "serve.err"
        self._err = open(self.err_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hybridpd.cli", "serve", "--port", "0", *flags],
            stdout=subprocess.PIPE, stderr=self._err, env=dict(os.environ),
        )
        self.port = self._read_port()
        self.base = f"http://127.0.0.1:{self.port}"

    def _read_port(self) -> int:
        found: list[int] = []

        def read() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                m = re.search(rb"http://127\.0\.0\.1:(\d+)", line)
                if m:
                    found.append(int(m.group(1)))
                    return

        t = threading.Thread(target=read, daemon=True)
        t.start()
        t.join(START_DEADLINE_S)
        if not found:
            self.stop()
            raise RuntimeError(f"serve did not start: {self.err_path.read_text()[-2000:]}")
        return found[0]

    def rss(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._err.close()


@pytest.fixture(scope="module")
def serve(tmp_path_factory):
    s = Serve(tmp_path_factory.mktemp("serve"), "--api-key", API_KEY,
              "--idle-timeout", str(IDLE_S), "--body-timeout", str(BODY_TIMEOUT_S),
              "--max-connections", str(MAX_CONNECTIONS), "--queue-timeout",
              str(QUEUE_TIMEOUT_S), "--max-num-seqs", "1")
    try:
        yield s
    finally:
        s.stop()


def connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=SOCKET_DEADLINE_S)
    s.settimeout(SOCKET_DEADLINE_S)
    return s


def read_all(s: socket.socket) -> bytes:
    data = b""
    try:
        while chunk := s.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def head(path: str, length: int | None, extra: str = "") -> bytes:
    size = f"Content-Length: {length}\r\n" if length is not None else \
        "Transfer-Encoding: chunked\r\n"
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {API_KEY}\r\n{size}{extra}\r\n").encode()


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else -1


def test_a_20mb_text_prompt_is_refused_and_memory_stays_low(serve):
    before = serve.rss()
    prompt = "x" * (20 * 1024 * 1024)
    body = json.dumps({"prompt": prompt, "max_tokens": 1}).encode()
    with connect(serve.port) as s:  # declared length: refused before reading any of it
        s.sendall(head("/v1/completions", len(body)))
        assert status_of(read_all(s)) == 413
    with connect(serve.port) as s:  # chunked, no length: refused at the limit while sending
        s.sendall(head("/v1/completions", None))
        sender = threading.Thread(target=_send_chunked, args=(s, body), daemon=True)
        sender.start()
        answer = read_all(s)
        sender.join(SOCKET_DEADLINE_S)
    assert status_of(answer) == 413 and b"exceeds the limit" in answer
    # under the body limit but longer than the context can hold: 400 before tokenising
    status, err, _ = post(f"{serve.base}/v1/completions",
                          {"prompt": "y" * 1_000_000, "max_tokens": 1}, headers=AUTH)
    assert status == 400 and err["error"]["code"] == "context_length_exceeded", err
    assert err["error"]["param"] == "prompt" and "cannot fit" in err["error"]["message"]
    assert serve.rss() - before < RSS_BOUND_BYTES
    assert post(f"{serve.base}/v1/completions", {"prompt": "hi", "max_tokens": 2},
                headers=AUTH)[0] == 200


def _send_chunked(s: socket.socket, body: bytes) -> None:
    step = 256 * 1024
    try:
        for i in range(0, len(body), step):
            part = body[i:i + step]
            s.sendall(f"{len(part):x}\r\n".encode() + part + b"\r\n")
        s.sendall(b"0\r\n\r\n")
    except OSError:
        pass  # the server answered and closed: what we want


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/v1/abort"])
@pytest.mark.parametrize("depth", [33, 100_000])
def test_deeply_nested_json_is_a_400_without_a_traceback(serve, path, depth):
    raw = b'{"prompt": ' + b"[" * depth + b"]" * depth + b"}"
    status, body, _ = post(f"{serve.base}{path}", raw=raw, headers=AUTH)
    assert status == 400, body
    assert "nested deeper than 32" in body["error"]["message"]
    assert "Traceback" not in serve.stderr()


def test_idle_sockets_are_closed_within_the_idle_timeout_while_others_are_served(serve):
    socks = [connect(serve.port) for _ in range(200)]
    assert post(f"{serve.base}/v1/completions", {"prompt": "hi", "max_tokens": 2},
                headers=AUTH)[0] == 200
    for s in socks:
        s.settimeout(IDLE_S + 9.0)  # deadline: the idle timeout closes them well before
        assert read_all(s) == b""
        s.close()
    assert "Traceback" not in serve.stderr()


def test_2000_connections_are_capped_cleanly_and_the_server_stays_up(tmp_path):
    capped = Serve(tmp_path, "--max-connections", str(MAX_CONNECTIONS), "--idle-timeout",
                   "60")
    try:
        socks = [connect(capped.port) for _ in range(2000)]
        for s in socks[MAX_CONNECTIONS:]:  # past the cap: a 503 at once, then closed
            answer = read_all(s)
            assert status_of(answer) == 503 and b"too_many_connections" in answer
        for s in socks:
            s.close()
        assert wait_until(lambda: get(f"{capped.base}/health")[0] == 200)
        assert post(f"{capped.base}/v1/completions",
                    {"prompt": "hi", "max_tokens": 2})[0] == 200
        err = capped.stderr()
        assert "Traceback" not in err and err.count("connection cap") <= 2  # no log storm
        assert capped.proc.poll() is None
    finally:
        capped.stop()


def test_a_half_sent_head_is_closed_and_a_body_that_never_ends_is_a_408(serve):
    with connect(serve.port) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")  # never finished
        s.settimeout(IDLE_S + 9.0)  # deadline: closed by the idle timeout well before
        assert read_all(s) == b""
    with connect(serve.port) as s:
        s.sendall(head("/v1/completions", 1000) + b'{"prompt": "')  # 990 bytes never come
        s.settimeout(BODY_TIMEOUT_S + 9.0)
        answer = read_all(s)
    assert status_of(answer) == 408 and b"not received within" in answer


def test_a_request_that_cannot_start_in_time_is_a_503_queue_timeout(serve):
    # --max-num-seqs 1: a long request holds the only slot; the next one waits past the deadline
    long_done = threading.Event()

    def long_request() -> None:
        post(f"{serve.base}/v1/completions", {"prompt": "hold", "max_tokens": 3000,
                                               "ignore_eos": True},
             headers={**AUTH, "X-Request-Id": "long-1"})
        long_done.set()

    t = threading.Thread(target=long_request, daemon=True)
    t.start()
    assert wait_until(lambda: _running(serve) == 1)
    status, body, _ = post(f"{serve.base}/v1/completions", {"prompt": "hi", "max_tokens": 2},
                           headers=AUTH)
    assert status == 503 and body["error"]["code"] == "queue_timeout", body
    assert not long_done.is_set()  # the deadline fired while the slot was still taken
    status, body, _ = post(f"{serve.base}/v1/abort", {"request_id": "long-1"}, headers=AUTH)
    assert status == 200 and body["aborted"] is True
    t.join(SOCKET_DEADLINE_S)
    assert long_done.is_set()


def _running(serve: Serve) -> int:
    status, pool, _ = request("GET", f"{serve.base}/v1/pool", headers=AUTH)
    return pool["num_running"] if status == 200 else -1


def test_the_api_key_guards_v1_and_abort_is_truthful(serve):
    assert post(f"{serve.base}/v1/completions", {"prompt": "hi", "max_tokens": 2})[0] == 401
    assert get(f"{serve.base}/v1/models")[0] == 401
    assert get(f"{serve.base}/health")[0] == 200  # probes need no key
    status, body, _ = post(f"{serve.base}/v1/abort", {"request_id": "anyone-1"})
    assert status == 401, body
    status, body, _ = post(f"{serve.base}/v1/abort", {"request_id": "nobody-1"}, headers=AUTH)
    assert status == 404 and body["aborted"] is False


def test_chat_text_and_token_lists_beyond_the_context_are_refused_before_tokenising(serve):
    chat = {"messages": [{"role": "user", "content": "y" * 600_000}], "max_tokens": 1}
    status, body, _ = post(f"{serve.base}/v1/chat/completions", chat, headers=AUTH)
    assert status == 400 and body["error"]["code"] == "context_length_exceeded", body
    assert body["error"]["param"] == "messages"
    ids = {"prompt": [7] * 200_000, "max_tokens": 1}  # 600 KB: judged in the helper process
    status, body, _ = post(f"{serve.base}/v1/completions", ids, headers=AUTH)
    assert status == 400 and "values" in body["error"]["message"], body
    ok = {"prompt": [7] * 100, "max_tokens": 2}
    assert post(f"{serve.base}/v1/completions", ok, headers=AUTH)[0] == 200
