"""Exceptions of the disaggregation transport: NIXL transfers and the side channel.

Owns the error types that callers (sender, receiver, engine) catch to fail closed. Kept apart
from `nixl_agent.py` so that code can catch them without importing NIXL. Must not know NIXL,
sockets or tensors.
"""

from __future__ import annotations

from typing import Any


class TransferError(RuntimeError):
    """A NIXL operation failed or was refused (bad metadata, bad ranges, dead peer, ...)."""


class TransferTimeout(TransferError):
    """A transfer did not complete before its deadline; it was aborted (see the message)."""


class SideChannelError(RuntimeError):
    """A side-channel call failed: connect error, timeout, malformed or oversize frame."""


class SideChannelRemoteError(SideChannelError):
    """The peer answered `{"ok": false, ...}`; `.response` holds its whole answer."""

    def __init__(self, message: str, response: dict[str, Any]) -> None:
        super().__init__(message)
        self.response = response


class SideChannelAuthError(SideChannelError):
    """A side-channel frame failed authentication (no, bad or stale MAC, replayed nonce)."""


class HandoffRefused(ValueError):
    """A decode instance refuses a hand-off: already consumed, too old, or not for this prompt."""
