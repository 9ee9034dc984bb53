"""The side channel: our control plane between instances (handshake, leases), over plain TCP.

Owns the wire format and its server/client. A frame is a 4-byte big-endian length followed by
that many bytes of UTF-8 JSON holding one object; frames above `MAX_FRAME_BYTES` are refused.
Every frame carries `"v": PROTOCOL_VERSION`; requests also carry a string `"type"`. One
connection carries one request and its response, then closes. Responses carry `"ok"`; a
refused request or a handler exception answers `{"v": 1, "ok": false, "error": "..."}`.
Binary payloads (NIXL metadata) travel as base64 strings (`encode_bytes` / `decode_bytes`).

The server is a daemon accept thread plus one short-lived thread per connection (at most
`max_connections` at once), so it can live inside an engine process next to a busy loop. Each
request must arrive whole within `read_timeout_s` (slow clients are cut off); garbage, bad
JSON, wrong versions and oversize frames are answered with an error when possible and the
connection is closed; the server keeps serving others.

Must not know: NIXL, tensors, the engine or what the messages mean (the handler does).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

from hybridpd.disagg.errors import SideChannelError, SideChannelRemoteError

PROTOCOL_VERSION = 1
MAX_FRAME_BYTES = 8 << 20
_HEADER = struct.Struct(">I")
_ACCEPT_POLL_S = 0.1

logger = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], dict[str, Any]]


def encode_bytes(data: bytes) -> str:
    """Binary -> base64 text for a JSON field."""
    return base64.b64encode(bytes(data)).decode("ascii")


def decode_bytes(text: Any) -> bytes:
    """base64 text from a JSON field -> binary; SideChannelError when it is not valid base64."""
    if not isinstance(text, str):
        raise SideChannelError(f"expected a base64 string, got {type(text).__name__}")
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise SideChannelError(f"invalid base64 payload: {exc}") from exc


# ---- frames -----------------------------------------------------------------------------------


def _remaining(deadline: float, what: str) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise SideChannelError(f"timed out {what}")
    return left


def _recv_exact(sock: socket.socket, size: int, deadline: float) -> bytes:
    chunks = bytearray()
    while len(chunks) < size:
        sock.settimeout(_remaining(deadline, "reading a frame"))
        try:
            chunk = sock.recv(min(size - len(chunks), 1 << 20))
        except TimeoutError as exc:
            raise SideChannelError("timed out reading a frame") from exc
        except OSError as exc:
            raise SideChannelError(f"connection error while reading: {exc}") from exc
        if not chunk:
            raise SideChannelError(f"connection closed after {len(chunks)} of {size} bytes")
        chunks += chunk
    return bytes(chunks)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-finite number {name} is not allowed")


def read_frame(sock: socket.socket, deadline: float) -> dict[str, Any]:
    """Read one frame and parse its JSON object; SideChannelError on any violation."""
    (size,) = _HEADER.unpack(_recv_exact(sock, _HEADER.size, deadline))
    if size > MAX_FRAME_BYTES:
        raise SideChannelError(f"frame of {size} bytes exceeds the limit of {MAX_FRAME_BYTES}")
    body = _recv_exact(sock, size, deadline)
    try:
        message = json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as exc:
        raise SideChannelError(f"frame is not UTF-8 JSON: {exc}") from exc
    if not isinstance(message, dict):
        raise SideChannelError(f"frame must hold a JSON object, got {type(message).__name__}")
    return message


def encode_frame(message: dict[str, Any]) -> bytes:
    """Header + JSON body; SideChannelError when unserializable or over `MAX_FRAME_BYTES`."""
    try:
        body = json.dumps(message, separators=(",", ":"), allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise SideChannelError(f"message is not JSON-serializable: {exc}") from exc
    if len(body) > MAX_FRAME_BYTES:
        raise SideChannelError(f"frame of {len(body)} bytes exceeds the limit of {MAX_FRAME_BYTES}")
    return _HEADER.pack(len(body)) + body


def send_frame(sock: socket.socket, frame: bytes, deadline: float) -> None:
    """Send an encoded frame whole before `deadline`; SideChannelError otherwise."""
    sock.settimeout(_remaining(deadline, "writing a frame"))
    try:
        sock.sendall(frame)
    except TimeoutError as exc:
        raise SideChannelError("timed out writing a frame") from exc
    except OSError as exc:
        raise SideChannelError(f"connection error while writing: {exc}") from exc


def _check_version(message: dict[str, Any]) -> None:
    version = message.get("v")
    if version != PROTOCOL_VERSION:
        raise SideChannelError(
            f"side-channel protocol version {version!r} is not supported "
            f"(this side speaks v{PROTOCOL_VERSION})"
        )


def check_request(message: dict[str, Any]) -> None:
    """A valid request has our version and a non-empty string "type"."""
    _check_version(message)
    kind = message.get("type")
    if not isinstance(kind, str) or not kind:
        raise SideChannelError('request needs a non-empty string "type"')


_MAX_ERROR_CHARS = 4000


def error_response(text: str) -> dict[str, Any]:
    """The refusal frame; long messages are cut so that the answer itself always fits."""
    return {"v": PROTOCOL_VERSION, "ok": False, "error": text[:_MAX_ERROR_CHARS]}


# ---- server -----------------------------------------------------------------------------------


class SideChannelServer:
    """Threaded TCP server: one JSON request per connection -> `handler(request)` -> response."""

    def __init__(
        self,
        host: str,
        port: int,
        handler: Handler,
        *,
        read_timeout_s: float = 5.0,
        max_connections: int = 32,
    ) -> None:
        self.host = host
        self._requested_port = port
        self._handler = handler
        self._read_timeout_s = read_timeout_s
        self._slots = threading.BoundedSemaphore(max_connections)
        self._stop = threading.Event()
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._conns: dict[threading.Thread, socket.socket] = {}
        self._conns_lock = threading.Lock()

    @property
    def port(self) -> int:
        """The bound port (the ephemeral one when constructed with port 0)."""
        if self._listener is None:
            raise SideChannelError("side-channel server is not started")
        return int(self._listener.getsockname()[1])

    def start(self) -> SideChannelServer:
        if self._listener is not None:
            raise SideChannelError("side-channel server already started")
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind((self.host, self._requested_port))
        except OSError as exc:
            listener.close()
            raise SideChannelError(
                f"cannot bind side channel to {self.host}:{self._requested_port}: {exc}"
            ) from exc
        listener.listen(64)
        listener.settimeout(_ACCEPT_POLL_S)
        self._listener = listener
        self._stop.clear()
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name=f"side-channel-{self.port}", daemon=True
        )
        self._accept_thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop accepting, cut open connections, join every thread and free the port."""
        if self._listener is None:
            return
        self._stop.set()
        if self._accept_thread is not None:
            self._accept_thread.join(timeout_s)
        self._listener.close()
        with self._conns_lock:
            conns = list(self._conns.items())
        for _, conn in conns:
            _shutdown_quietly(conn)
        deadline = time.monotonic() + timeout_s
        for thread, _ in conns:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._listener = None
        self._accept_thread = None

    def __enter__(self) -> SideChannelServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stop.is_set():
                    return
                time.sleep(_ACCEPT_POLL_S)  # e.g. out of file descriptors: back off
                continue
            if not self._slots.acquire(blocking=False):
                self._reply(conn, error_response("side-channel server busy, retry later"))
                conn.close()
                continue
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            with self._conns_lock:
                self._conns[thread] = conn
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            with conn:
                deadline = time.monotonic() + self._read_timeout_s
                try:
                    request = read_frame(conn, deadline)
                    check_request(request)
                except SideChannelError as exc:
                    self._reply(conn, error_response(str(exc)))
                    return
                self._reply(conn, self._dispatch(request))
        finally:
            with self._conns_lock:
                self._conns.pop(threading.current_thread(), None)
            self._slots.release()

    def _dispatch(self, request: dict[str, Any]) -> dict[str, Any]:
        try:
            result = self._handler(request)
        except Exception as exc:  # the handler's failure is the client's answer, not ours
            logger.warning("side-channel handler failed on %r: %s", request.get("type"), exc)
            return error_response(f"{type(exc).__name__}: {exc}")
        if not isinstance(result, dict):
            return error_response(f"handler returned {type(result).__name__}, not an object")
        return {"ok": True, **result, "v": PROTOCOL_VERSION}

    def _reply(self, conn: socket.socket, response: dict[str, Any]) -> None:
        try:
            frame = encode_frame(response)
        except SideChannelError as exc:
            frame = encode_frame(error_response(f"handler response unusable: {exc}"))
        try:
            send_frame(conn, frame, time.monotonic() + self._read_timeout_s)
        except SideChannelError as exc:
            logger.debug("side-channel reply dropped: %s", exc)


def _shutdown_quietly(conn: socket.socket) -> None:
    try:
        conn.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


# ---- client -----------------------------------------------------------------------------------


def side_channel_call(
    host: str, port: int, msg: dict[str, Any], timeout_s: float
) -> dict[str, Any]:
    """Send one request and return the peer's `ok` response.

    Raises SideChannelError on connect failure, timeout (the whole call), malformed or
    wrong-version responses, and SideChannelRemoteError when the peer answers `ok: false`.
    """
    kind = msg.get("type")
    request = {**msg, "v": PROTOCOL_VERSION}
    check_request(request)
    where = f"side channel {host}:{port} ({kind})"
    deadline = time.monotonic() + timeout_s
    try:
        sock = socket.create_connection((host, port), timeout=timeout_s)
    except OSError as exc:
        raise SideChannelError(f"cannot connect to {where}: {exc}") from exc
    try:
        with sock:
            send_frame(sock, encode_frame(request), deadline)
            response = read_frame(sock, deadline)
    except SideChannelError as exc:
        raise SideChannelError(f"{where}: {exc}") from exc
    return _checked_response(response, where)


def _checked_response(response: dict[str, Any], where: str) -> dict[str, Any]:
    try:
        _check_version(response)
    except SideChannelError as exc:
        raise SideChannelError(f"{where}: bad response: {exc}") from exc
    if not isinstance(response.get("ok"), bool):
        raise SideChannelError(f'{where}: bad response: no boolean "ok" field')
    if not response["ok"]:
        raise SideChannelRemoteError(f"{where} refused: {response.get('error')}", response)
    return response
