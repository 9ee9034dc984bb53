"""Messages on the pipe between the API process and its engine process.

Owns the frozen, picklable envelopes around `engine/protocol.py`'s messages (requests to the
engine, replies from it). Knows nothing of HTTP, asyncio or the engine's internals.
"""

from __future__ import annotations

from dataclasses import dataclass

from hybridpd.engine.protocol import EngineStats, GenerateOutput, GenerateRequest

# ---- API process -> engine process ---------------------------------------------------------


@dataclass(frozen=True)
class AddRequest:
    request: GenerateRequest


@dataclass(frozen=True)
class AbortRequest:
    request_id: str


@dataclass(frozen=True)
class AbortQuery:
    """Abort, and say whether the engine knew the id (answered by AbortReply)."""

    token: int
    request_id: str


@dataclass(frozen=True)
class StatsQuery:
    token: int  # echoed back in StatsReply to match the answer with its question


@dataclass(frozen=True)
class Shutdown:
    pass


# ---- engine process -> API process ---------------------------------------------------------


@dataclass(frozen=True)
class Ready:
    side_channels: tuple[str, ...] = ()  # "host:port" of the instance's one side channel (P/D)


@dataclass(frozen=True)
class StartupFailed:
    traceback: str  # the child's formatted exception
    summary: str = ""  # "<type>: <first line>"
    config_error: bool = False  # a refusal of the configuration (bad value, missing file)


@dataclass(frozen=True)
class Outputs:
    outputs: tuple[GenerateOutput, ...]


@dataclass(frozen=True)
class StatsReply:
    token: int
    stats: EngineStats


@dataclass(frozen=True)
class AbortReply:
    token: int
    found: bool  # the engine held the request (running, waiting or held for a reader)


@dataclass(frozen=True)
class Fatal:
    """The engine loop crashed; the process exits right after sending this."""

    traceback: str  # for the API process's log only
    summary: str  # "<exception type>: <first line of its message>", safe to show clients


ToEngine = AddRequest | AbortRequest | AbortQuery | StatsQuery | Shutdown
FromEngine = Ready | StartupFailed | Outputs | StatsReply | AbortReply | Fatal
