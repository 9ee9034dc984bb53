"""Messages that cross the API-process / engine-process boundary (frozen, picklable).

Owns `GenerateRequest`, `GenerateOutput`, the `ErrorKind` of a failed output and the
`EngineCore` protocol the engine process drives. Knows nothing of HTTP (the API maps each
`ErrorKind` to a status: `server/error_status.py`), tensors or NIXL. The P/D hand-off is
typed both ways (`disagg/handoff.py`: `RemoteDecode | RemotePrefill` in, `TransferParams` out);
its JSON form, signature and verification belong to the HTTP edge (`server/handoff_edge.py`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Protocol

from hybridpd.disagg.handoff import Handoff, RemoteDecode, RemotePrefill
from hybridpd.disagg.params import TransferParams
from hybridpd.request import FinishReason, SamplingParams

# leads the error message of a request that failed its queue deadline (it never started)
QUEUE_TIMEOUT_MESSAGE = "queue timeout"


class DuplicateRequestError(ValueError):
    """`add_request` with the id of a request the engine still holds."""


class ErrorKind(str, enum.Enum):
    """Why a request ended with an error output (what failed, not how HTTP says it)."""

    INVALID_REQUEST = "invalid-request"  # refused at admission: it can never run as sent
    DUPLICATE_ID = "duplicate-id"  # its id belongs to a request the engine still holds
    ABORTED = "aborted"  # the client or the system stopped it
    INTERNAL = "internal"  # the model step raised, or the engine process died
    TRANSFER_FAILED = "transfer-failed"  # D could not get P's state (--on-transfer-failure fail)
    QUEUE_TIMEOUT = "queue-timeout"  # it could not start within the queue deadline
    OUTPUT_TIMEOUT = "output-timeout"  # the engine produced nothing for it within the deadline


@dataclass(frozen=True)
class GenerateRequest:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    # P/D: RemoteDecode() to a prefill instance; RemotePrefill(P's verified params) to a
    # decode instance (the HTTP edge parses and verifies `kv_transfer_params` into these)
    handoff: Handoff | None = None

    def __post_init__(self) -> None:
        if self.handoff is not None and not isinstance(self.handoff,
                                                       (RemoteDecode, RemotePrefill)):
            raise TypeError(
                f"GenerateRequest.handoff must be RemoteDecode, RemotePrefill or None, not "
                f"{type(self.handoff).__name__} (kv_transfer_params JSON is parsed and "
                "verified at the HTTP edge: server/handoff_edge.py)")


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # top-n (token_id, logprob), best first
    rank: int | None = None  # prompt logprobs: 1 + how many tokens were more likely


@dataclass(frozen=True)
class GenerateOutput:
    """New tokens of one choice of a request. `finished` ends the request (its last output);
    with n > 1 a choice that ends earlier says so by `choice_finished` (with its
    finish_reason); `finished` implies `choice_finished`."""

    request_id: str
    new_token_ids: tuple[int, ...]
    finished: bool = False
    finish_reason: FinishReason | None = None
    new_logprobs: tuple[TokenLogprob, ...] | None = None
    num_prompt_tokens: int = 0
    # With SamplingParams.prompt_logprobs: one entry per prompt token, the first None (nothing
    # predicts it), each other one that token's logprob given its prefix plus the top-k; sent
    # once, on the request's first output (on P in P/D: P is the one that sees the prompt)
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None
    # Set on a prefill instance's final output: what a decode instance needs to pull the state
    # (unsigned: P's API signs and serialises it)
    kv_transfer_params: TransferParams | None = None
    # Set on a decode instance once its READ finished or failed (bytes, descriptors, seconds...).
    transfer_stats: dict[str, Any] | None = None
    error: str | None = None  # with finish_reason ERROR: a message for the client
    error_kind: ErrorKind = ErrorKind.INTERNAL  # what failed, when `error` is set
    queued_s: float | None = None  # on a request's first output: arrival -> first scheduled
    index: int = 0  # the choice (n / best_of); 0 for n = 1
    choice_finished: bool = False

    def __post_init__(self) -> None:
        if self.finished and not self.choice_finished:
            object.__setattr__(self, "choice_finished", True)


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    pool_total_blocks: int
    pool_free_blocks: int
    counters: dict[str, float] = field(default_factory=dict)  # monotonic counters


class EngineCore(Protocol):
    """What the engine process loop drives. All calls come from one thread."""

    def add_request(self, req: GenerateRequest) -> None:
        """Queue a request. Raises ValueError (clear message) when it can never run."""

    def abort_request(self, request_id: str) -> bool:
        """Stop a request, free everything it holds; False (and nothing done) for unknown ids."""

    def step(self) -> list[GenerateOutput]:
        """One engine iteration; returns new outputs (possibly none)."""

    def has_work(self) -> bool:
        """True while anything is running, waiting or in flight (transfers, leases)."""

    def idle_wait_s(self) -> float | None:
        """How long the driver may block before the next step (`step()` never sleeps): 0 when
        a step would compute, a short poll interval when only transfers or leases are
        outstanding, None when there is nothing at all (block until a request comes)."""

    def stats(self) -> EngineStats: ...

    def shutdown(self) -> None: ...
