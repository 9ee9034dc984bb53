"""Requests as the engine sees them: sampling parameters, statuses, finish reasons.

Owns the user-facing `SamplingParams` and the engine-side `Request` record. Knows nothing of
tensors, HTTP or NIXL. Statuses and finish reasons are Enums.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from typing import Any

MAX_SEED = 2**63
MAX_SAMPLES = 128  # n and best_of
MIN_SAMPLING_TEMPERATURE = 1e-5  # below it a request is sampled greedily (documented floor)


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens reached (or the model's context limit)
    ABORT = "abort"  # cancelled by the client or the system
    ERROR = "error"  # failed (e.g. KV transfer failed with on-transfer-failure=fail)


class RequestStatus(enum.Enum):
    WAITING = enum.auto()  # queued, owns no blocks
    WAITING_FOR_REMOTE_KV = enum.auto()  # decode side: blocks allocated, READ in flight
    RUNNING = enum.auto()  # scheduled, owns blocks
    PREEMPTED = enum.auto()  # blocks freed, will recompute from scratch
    FINISHED = enum.auto()


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. Validated on construction; raises ValueError with a clear message."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: disabled
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None: no logprobs; 0: sampled token only; n: plus top-n
    min_tokens: int = 0
    n: int = 1  # choices returned; the prompt is prefilled once and its state forked
    best_of: int | None = None  # samples generated (>= n); the n of highest cumulative logprob

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool):
            raise ValueError(f"max_tokens must be an integer, got {self.max_tokens!r}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 0.0 <= float(self.temperature) <= 100.0:
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature}")
        if not 0.0 < float(self.top_p) <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise ValueError(f"top_k must be -1, 0 or a positive integer, got {self.top_k!r}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError(f"logprobs must be in [0, 20], got {self.logprobs}")
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be >= 0, got {self.min_tokens}")
        for name in ("n", "best_of"):
            v = getattr(self, name)
            if v is None and name == "best_of":
                continue
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_SAMPLES:
                raise ValueError(f"{name} must be an integer in [1, {MAX_SAMPLES}], got {v!r}")
        if self.best_of is not None and self.best_of < self.n:
            raise ValueError(f"best_of ({self.best_of}) must be >= n ({self.n})")
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int)
            or not 0 <= self.seed < MAX_SEED
        ):
            raise ValueError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")

    @property
    def num_samples(self) -> int:
        """Sequences generated from the one prefilled prompt: best_of, else n."""
        return self.best_of if self.best_of is not None else self.n

    def for_sample(self, index: int) -> SamplingParams:
        """The parameters of forked sample `index` of an n / best_of request: one sequence,
        seed + index (so sample 0 of a seeded request equals the same request with n = 1), and
        the sampled token's logprob when best_of must rank the samples."""
        seed = None if self.seed is None else (self.seed + index) % MAX_SEED
        ranks = self.best_of is not None and self.best_of > self.n
        logprobs = 0 if ranks and self.logprobs is None else self.logprobs
        return replace(self, n=1, best_of=None, seed=seed, logprobs=logprobs)

    @property
    def greedy(self) -> bool:
        """Temperatures below MIN_SAMPLING_TEMPERATURE sample greedily (dividing logits by a
        smaller one overflows to inf and picked token 0 forever)."""
        return self.temperature < MIN_SAMPLING_TEMPERATURE

    def to_dict(self) -> dict[str, Any]:
        return {
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "seed": self.seed,
            "stop": list(self.stop),
            "stop_token_ids": list(self.stop_token_ids),
            "ignore_eos": self.ignore_eos,
            "logprobs": self.logprobs,
            "min_tokens": self.min_tokens,
            "n": self.n,
            "best_of": self.best_of,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SamplingParams:
        d = dict(d)
        d["stop"] = tuple(d.get("stop") or ())
        d["stop_token_ids"] = tuple(d.get("stop_token_ids") or ())
        return cls(**d)


@dataclass
class Request:
    """Engine-side request state. Mutated only by the scheduler and the engine loop."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_id: int | None = None
    arrival: float = 0.0
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[Any] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose effect is in the cache (KV and SSM state)
    finish_reason: FinishReason | None = None
    num_preemptions: int = 0
    max_tokens: int = 0  # effective output budget (0: params.max_tokens)
    sample_final: bool = True  # False: compute the prompt only, sample nothing (P in n-1 mode)
    remote_tokens: int = 0  # decode side: tokens whose state arrives from a prefill instance
    hold_on_finish: bool = False  # prefill side: keep the blocks for a remote reader
    output_offset: int = 0  # outputs produced elsewhere before ours (1 on D in first-token)

    def __post_init__(self) -> None:
        if self.max_tokens <= 0:
            self.max_tokens = self.params.max_tokens

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_outputs_total(self) -> int:
        """Output tokens of the whole request, including those produced elsewhere."""
        return self.output_offset + len(self.output_token_ids)

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == RequestStatus.FINISHED
