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

Authentication (with a deployment secret; `disagg/auth.py` derives the key): a frame body is
`AUTH_MAGIC` + HMAC-SHA256(key, direction, json) + json, and the JSON carries `"auth"`: `"ts"`
(wall clock) and a fresh `"nonce"`; responses also carry `"re"` (the request's nonce). The server
checks the MAC before parsing anything, refuses timestamps outside the replay window and nonces
it has seen, and only then calls the handler; the client accepts only a response sealed for its
own request. Without a secret (`--insecure-dev`) frames are plain JSON and each side refuses the
other kind with a message naming `HYBRIDPD_KV_SECRET`.

Connection bounds: at most `max_connections` at once and `max_per_peer` from one address; a
connection must deliver its (authenticated) request within `auth_timeout_s`, and a secure
server reads at most `MAX_SECURE_REQUEST_BYTES` before checking the MAC; when a cap is
reached, the oldest connection that has not authenticated (with a secret: at once; without:
after `EVICT_AFTER_S`) is cut to make room, so idle or churning connections cannot hold every
slot; else the newcomer is answered "busy".

Must not know: NIXL, tensors, the engine or what the messages mean (the handler does).
"""

from __future__ import annotations

import base64
import binascii
import enum
import hmac
import json
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hybridpd.disagg.auth import (
    MAC_BYTES,
    AuthError,
    KeyPurpose,
    ReplayGuard,
    check_fresh,
    derive_key,
    mac,
    new_nonce,
)
from hybridpd.disagg.errors import SideChannelAuthError, SideChannelError, SideChannelRemoteError

PROTOCOL_VERSION = 1
MAX_FRAME_BYTES = 8 << 20
MAX_SECURE_REQUEST_BYTES = 1 << 20  # what a secure server reads before the MAC is checked
AUTH_MAGIC = b"HPDA"
AUTH_FIELD = "auth"  # sealed frames: {"ts": wall clock, "nonce": fresh, "re": request nonce}
AUTH_TIMEOUT_S = 2.0  # a connection must deliver its request (authenticated) within this
EVICT_AFTER_S = 0.5  # a connection not authenticated after this may be cut to make room
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


def _read_body(sock: socket.socket, deadline: float, limit: int = MAX_FRAME_BYTES) -> bytes:
    (size,) = _HEADER.unpack(_recv_exact(sock, _HEADER.size, deadline))
    if size > limit:
        raise SideChannelError(f"frame of {size} bytes exceeds the limit of {limit}")
    return _recv_exact(sock, size, deadline)


def _parse(body: bytes) -> dict[str, Any]:
    try:
        message = json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise SideChannelError(f"frame is not UTF-8 JSON: {exc}") from exc
    if not isinstance(message, dict):
        raise SideChannelError(f"frame must hold a JSON object, got {type(message).__name__}")
    return message


def read_frame(sock: socket.socket, deadline: float) -> dict[str, Any]:
    """Read one plain frame and parse its JSON object; SideChannelError on any violation."""
    return _parse(_read_body(sock, deadline))


def _json(message: dict[str, Any]) -> bytes:
    try:
        return json.dumps(message, separators=(",", ":"), allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise SideChannelError(f"message is not JSON-serializable: {exc}") from exc


def _framed(body: bytes) -> bytes:
    if len(body) > MAX_FRAME_BYTES:
        raise SideChannelError(f"frame of {len(body)} bytes exceeds the limit of {MAX_FRAME_BYTES}")
    return _HEADER.pack(len(body)) + body


def encode_frame(message: dict[str, Any]) -> bytes:
    """Header + JSON body; SideChannelError when unserializable or over `MAX_FRAME_BYTES`."""
    return _framed(_json(message))


class Direction(str, enum.Enum):
    REQUEST = "request"
    RESPONSE = "response"


def frame_key(secret: str | None) -> bytes | None:
    """The side-channel key of a deployment secret (None: frames are not authenticated)."""
    return None if not secret else derive_key(secret, KeyPurpose.SIDE_CHANNEL)


def _auth(re: str | None = None) -> dict[str, Any]:
    auth: dict[str, Any] = {"ts": time.time(), "nonce": new_nonce()}
    if re is not None:
        auth["re"] = re
    return auth


def seal(message: dict[str, Any], key: bytes, direction: Direction) -> bytes:
    """An authenticated frame: magic + MAC + JSON (the message must carry `AUTH_FIELD`)."""
    body = _json(message)
    return _framed(AUTH_MAGIC + mac(key, direction.value.encode(), body) + body)


def open_body(body: bytes, key: bytes | None, direction: Direction) -> dict[str, Any]:
    """Check and parse a frame body. With a key: SideChannelAuthError unless the MAC is ours,
    checked before the JSON is even parsed, and the timestamp is inside the replay window."""
    sealed = body.startswith(AUTH_MAGIC)
    if key is None:
        if sealed:
            raise SideChannelAuthError("peer authenticates its side-channel frames; this side "
                                       "has no deployment secret (set HYBRIDPD_KV_SECRET)")
        return _parse(body)
    if not sealed or len(body) < len(AUTH_MAGIC) + MAC_BYTES:
        raise SideChannelAuthError("side-channel frame is not authenticated (the peer has no or "
                                   "another deployment secret: HYBRIDPD_KV_SECRET)")
    given = body[len(AUTH_MAGIC):len(AUTH_MAGIC) + MAC_BYTES]
    payload = body[len(AUTH_MAGIC) + MAC_BYTES:]
    if not hmac.compare_digest(given, mac(key, direction.value.encode(), payload)):
        raise SideChannelAuthError("side-channel frame authentication failed (forged, altered, "
                                   "or sealed with another deployment's secret)")
    message = _parse(payload)
    auth = message.pop(AUTH_FIELD, None)
    ts = auth.get("ts") if isinstance(auth, dict) else None
    nonce = auth.get("nonce") if isinstance(auth, dict) else None
    if not isinstance(ts, int | float) or isinstance(ts, bool) or not isinstance(nonce, str):
        raise SideChannelAuthError(f'authenticated frame lacks "{AUTH_FIELD}" ts and nonce')
    try:
        check_fresh(float(ts), time.time())
    except AuthError as exc:
        raise SideChannelAuthError(f"side-channel frame refused: {exc}") from exc
    message[AUTH_FIELD] = auth
    return message


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


class RateLimitedLog:
    """A warning at most once per `period_s`, with a count of those not logged since: peers
    must not be able to flood the log with refusals."""

    def __init__(self, log: logging.Logger, period_s: float = 10.0) -> None:
        self._log, self._period_s, self._next, self._suppressed = log, period_s, 0.0, 0
        self._lock = threading.Lock()

    def warning(self, fmt: str, *args: object) -> None:
        now = time.monotonic()
        with self._lock:
            if now < self._next:
                self._suppressed += 1
                return
            suppressed, self._suppressed, self._next = self._suppressed, 0, now + self._period_s
        more = f" ({suppressed} more since the last such warning)" if suppressed else ""
        self._log.warning(fmt + "%s", *args, more)


@dataclass
class _Conn:
    sock: socket.socket
    peer: str
    accepted: float
    authenticated: bool = False  # delivered a verified request: never evicted
    evicted: bool = False  # cut to make room: its slot was already given back


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
        secret: str | None = None,
        auth_timeout_s: float = AUTH_TIMEOUT_S,
        max_per_peer: int | None = None,
        evict_after_s: float | None = None,
    ) -> None:
        self.host = host
        self._requested_port = port
        self._handler = handler
        self._read_timeout_s = read_timeout_s
        self._request_timeout_s = min(read_timeout_s, auth_timeout_s)
        self._max_connections = max_connections
        self._max_per_peer = max_per_peer or max_connections
        self._key = frame_key(secret)
        # With a secret a legitimate peer sends its sealed request the moment it connects, so
        # any connection still unauthenticated may be cut; without one nobody can be told apart
        # and a connection gets EVICT_AFTER_S to deliver before it may be.
        if evict_after_s is None:
            evict_after_s = 0.0 if self._key is not None else EVICT_AFTER_S
        self._evict_after_s = evict_after_s
        self._replays = ReplayGuard()
        self._refusals = RateLimitedLog(logger)
        self._stop = threading.Event()
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._conns: dict[threading.Thread, _Conn] = {}
        self._conns_lock = threading.Lock()
        self._live = 0  # connections holding a slot (evicted ones gave theirs back)
        self._per_peer: dict[str, int] = {}

    @property
    def authenticated(self) -> bool:
        return self._key is not None

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
            _shutdown_quietly(conn.sock)
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
                sock, addr = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stop.is_set():
                    return
                time.sleep(_ACCEPT_POLL_S)  # e.g. out of file descriptors: back off
                continue
            conn = _Conn(sock, str(addr[0]), time.monotonic())
            if not self._admit(conn):
                self._reply(sock, error_response("side-channel server busy, retry later"))
                sock.close()
                continue
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            with self._conns_lock:
                self._conns[thread] = conn
            thread.start()

    def _admit(self, conn: _Conn) -> bool:
        """Take a slot for `conn`, cutting the oldest unauthenticated connection when a cap is
        reached (per peer first, then overall); False: no room (answer busy)."""
        with self._conns_lock:
            for same_peer, full in (
                (True, self._per_peer.get(conn.peer, 0) >= self._max_per_peer),
                (False, self._live >= self._max_connections),
            ):
                if not full:
                    continue
                victim = self._evictable(conn.peer if same_peer else None, conn.accepted)
                if victim is None:
                    return False
                self._evict(victim)
            self._live += 1
            self._per_peer[conn.peer] = self._per_peer.get(conn.peer, 0) + 1
            return True

    def _evictable(self, peer: str | None, now: float) -> _Conn | None:
        candidates = [
            c for c in self._conns.values()
            if not c.authenticated and not c.evicted and now - c.accepted >= self._evict_after_s
            and (peer is None or c.peer == peer)
        ]
        return min(candidates, key=lambda c: c.accepted, default=None)

    def _evict(self, victim: _Conn) -> None:  # under _conns_lock
        victim.evicted = True
        self._give_back(victim)
        _shutdown_quietly(victim.sock)

    def _give_back(self, conn: _Conn) -> None:  # under _conns_lock
        self._live -= 1
        left = self._per_peer.get(conn.peer, 1) - 1
        if left > 0:
            self._per_peer[conn.peer] = left
        else:
            self._per_peer.pop(conn.peer, None)

    def _serve(self, conn: _Conn) -> None:
        try:
            with conn.sock:
                self._serve_one(conn)
        finally:
            with self._conns_lock:
                self._conns.pop(threading.current_thread(), None)
                if not conn.evicted:
                    self._give_back(conn)

    def _serve_one(self, conn: _Conn) -> None:
        deadline = conn.accepted + self._request_timeout_s
        request_nonce = ""
        try:
            limit = MAX_FRAME_BYTES if self._key is None else MAX_SECURE_REQUEST_BYTES
            body = _read_body(conn.sock, deadline, limit)
            request = open_body(body, self._key, Direction.REQUEST)
            check_request(request)
            if self._key is not None:
                request_nonce = str(request.pop(AUTH_FIELD)["nonce"])
                self._replays.check_and_remember(request_nonce)
        except (SideChannelError, AuthError) as exc:
            if isinstance(exc, SideChannelAuthError | AuthError):
                self._refusals.warning("side channel refused a frame from %s: %s", conn.peer,
                                       exc)
            self._reply(conn.sock, error_response(str(exc)))  # plain: it reveals nothing
            return
        with self._conns_lock:
            if conn.evicted:
                return
            conn.authenticated = True
        response = self._dispatch(request)
        if self._key is None:
            self._reply(conn.sock, response)
            return
        try:
            frame = seal({**response, AUTH_FIELD: _auth(request_nonce)}, self._key,
                         Direction.RESPONSE)
        except SideChannelError as exc:
            frame = seal({**error_response(f"handler response unusable: {exc}"),
                          AUTH_FIELD: _auth(request_nonce)}, self._key, Direction.RESPONSE)
        self._send(conn.sock, frame)

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
        self._send(conn, frame)

    def _send(self, conn: socket.socket, frame: bytes) -> None:
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
    host: str, port: int, msg: dict[str, Any], timeout_s: float, secret: str | None = None
) -> dict[str, Any]:
    """Send one request and return the peer's `ok` response.

    With `secret` the request is sealed and only a response sealed for it is accepted.
    Raises SideChannelError on connect failure, timeout (the whole call), malformed,
    unauthenticated or wrong-version responses, and SideChannelRemoteError when the peer
    answers `ok: false`.
    """
    kind = msg.get("type")
    request = {**msg, "v": PROTOCOL_VERSION}
    check_request(request)
    key = frame_key(secret)
    where = f"side channel {host}:{port} ({kind})"
    nonce = ""
    if key is not None:
        auth = _auth()
        nonce = auth["nonce"]
        frame = seal({**request, AUTH_FIELD: auth}, key, Direction.REQUEST)
    else:
        frame = encode_frame(request)
    deadline = time.monotonic() + timeout_s
    try:
        sock = socket.create_connection((host, port), timeout=timeout_s)
    except OSError as exc:
        raise SideChannelError(f"cannot connect to {where}: {exc}") from exc
    try:
        with sock:
            send_frame(sock, frame, deadline)
            body = _read_body(sock, deadline)
    except SideChannelError as exc:
        raise SideChannelError(f"{where}: {exc}") from exc
    if key is not None and not body.startswith(AUTH_MAGIC):
        return _refused_in_plain(body, where)
    try:
        response = open_body(body, key, Direction.RESPONSE)
    except SideChannelError as exc:
        raise type(exc)(f"{where}: {exc}") from exc
    if key is not None and response.pop(AUTH_FIELD).get("re") != nonce:
        raise SideChannelAuthError(f"{where}: response was sealed for another request")
    return _checked_response(response, where)


def _refused_in_plain(body: bytes, where: str) -> dict[str, Any]:
    """A secure client got an unsealed answer: a refusal is believed (it only makes us fail
    closed), anything else is not."""
    try:
        response = _parse(body)
    except SideChannelError:
        response = {}
    if response.get("ok") is False:
        raise SideChannelRemoteError(f"{where} refused: {response.get('error')}", response)
    raise SideChannelAuthError(f"{where}: response is not authenticated (the peer has no or "
                               "another deployment secret: HYBRIDPD_KV_SECRET)")


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
