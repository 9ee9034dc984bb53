"""Backends of the proxy and how one is chosen for a request.

Owns `Backend` (URL, role, health flag, in-flight count) and `Router` (round-robin or
least-loaded among healthy backends of a role). Knows nothing of HTTP or request bodies.
"""

from __future__ import annotations

import contextlib
import enum
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass


class BackendRole(str, enum.Enum):
    PREFILL = "prefill"
    DECODE = "decode"


class RoutingPolicy(str, enum.Enum):
    ROUND_ROBIN = "round-robin"
    LEAST_LOADED = "least-loaded"


class NoBackendError(RuntimeError):
    """No healthy backend of the wanted role."""


@dataclass
class Backend:
    url: str  # base URL, no trailing slash
    role: BackendRole
    healthy: bool = True
    in_flight: int = 0
    last_error: str | None = None


class Router:
    def __init__(
        self, prefill_urls: Sequence[str], decode_urls: Sequence[str],
        policy: RoutingPolicy | str,  # a policy or its name (the CLI's --routing)
    ) -> None:
        if not prefill_urls or not decode_urls:
            raise ValueError("the proxy needs at least one prefill and one decode URL")
        self.policy = RoutingPolicy(policy)
        self.backends = [Backend(u.rstrip("/"), BackendRole.PREFILL) for u in prefill_urls] + [
            Backend(u.rstrip("/"), BackendRole.DECODE) for u in decode_urls
        ]
        self._turns = {role: itertools.count() for role in BackendRole}

    def of_role(self, role: BackendRole) -> list[Backend]:
        return [b for b in self.backends if b.role == role]

    def has_healthy(self, role: BackendRole) -> bool:
        return any(b.healthy for b in self.of_role(role))

    def has_other(self, role: BackendRole, exclude: Sequence[Backend]) -> bool:
        """Whether a healthy backend of `role` outside `exclude` exists."""
        return any(b.healthy and b not in exclude for b in self.of_role(role))

    def pick(self, role: BackendRole, exclude: Sequence[Backend] = ()) -> Backend:
        """A healthy backend of `role` not in `exclude`; raises NoBackendError."""
        pool = self.of_role(role)
        candidates = [b for b in pool if b.healthy and b not in exclude]
        if not candidates:
            raise NoBackendError(f"no healthy {role.value} instance ({len(pool)} configured)")
        start = next(self._turns[role]) % len(candidates)
        rotated = candidates[start:] + candidates[:start]
        if self.policy is RoutingPolicy.LEAST_LOADED:
            return min(rotated, key=lambda b: b.in_flight)  # min keeps the first of ties
        return rotated[0]

    @staticmethod
    @contextlib.contextmanager
    def track(backend: Backend) -> Iterator[Backend]:
        """Count a request as in flight on `backend` for the duration of the block."""
        backend.in_flight += 1
        try:
            yield backend
        finally:
            backend.in_flight -= 1
