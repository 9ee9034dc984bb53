"""Requests as the engine sees them: sampling parameters, statuses, finish reasons.

Owns the user-facing `SamplingParams` and the engine-side `Request` record. Knows nothing of
tensors, HTTP or NIXL. Statuses and finish reasons are Enums.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from typing import Any

from hybridpd.engine.structured import StructuredSpec

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
    structured: StructuredSpec | None = None  # constrain the output (engine/structured.py)
    n: int = 1  # choices returned; the prompt is prefilled once and its state forked
    best_of: int | None = None  # samples generated (>= n); the n of highest cumulative logprob
    # None: no prompt logprobs; k: per prompt token (from the 2nd on) its logprob given its
    # prefix plus the top-k (vLLM semantics); computed only for requests that ask
    prompt_logprobs: int | None = None
    # Logit processing (OpenAI / vLLM names and ranges; applied before greedy or sampling).
    presence_penalty: float = 0.0  # minus this for every token already in the output
    frequency_penalty: float = 0.0  # minus this times the token's count in the output
    repetition_penalty: float = 1.0  # prompt + output tokens: positive / rp, negative * rp
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)
    min_p: float = 0.0  # drop tokens whose probability < min_p * the top probability
    bad_words_token_ids: tuple[tuple[int, ...], ...] = ()  # last token banned after its prefix
    allowed_token_ids: tuple[int, ...] | None = None  # None: all; else only these

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool):
            raise ValueError(f"max_tokens must be an integer, got {self.max_tokens!r}")
        if self.max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0 (0: score the prompt only, sample "
                             f"nothing), got {self.max_tokens}")
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
        if self.max_tokens == 0 and self.min_tokens > 0:
            raise ValueError(f"min_tokens ({self.min_tokens}) needs max_tokens >= min_tokens; "
                             "max_tokens=0 samples nothing")
        if self.prompt_logprobs is not None and (
            isinstance(self.prompt_logprobs, bool) or not isinstance(self.prompt_logprobs, int)
            or not 0 <= self.prompt_logprobs <= 20
        ):
            raise ValueError(f"prompt_logprobs must be an integer in [0, 20], "
                             f"got {self.prompt_logprobs!r}")
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int)
            or not 0 <= self.seed < MAX_SEED
        ):
            raise ValueError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        if self.structured is not None and not isinstance(self.structured, StructuredSpec):
            raise ValueError("structured must be a StructuredSpec")
        self._check_logit_processing()

    def _check_logit_processing(self) -> None:
        """Normalise the logit-processing fields to tuples and check their ranges."""
        for name in ("presence_penalty", "frequency_penalty"):
            v = _number(name, getattr(self, name))
            if not -2.0 <= v <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {v}")
        rp = _number("repetition_penalty", self.repetition_penalty)
        if not 0.0 < rp <= 100.0:
            raise ValueError(f"repetition_penalty must be in (0, 100], got {rp}")
        mp = _number("min_p", self.min_p)
        if not 0.0 <= mp <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {mp}")
        raw_bias: Any = self.logit_bias
        items = raw_bias.items() if isinstance(raw_bias, dict) else raw_bias
        bias: dict[int, float] = {}
        for pair in items:
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise ValueError(f"logit_bias entries must be (token id, bias), got {pair!r}")
            tok = _token_id("logit_bias", pair[0])
            b = _number(f"logit_bias[{tok}]", pair[1])
            if not -100.0 <= b <= 100.0:
                raise ValueError(f"logit_bias[{tok}] must be in [-100, 100], got {b}")
            bias[tok] = b
        object.__setattr__(self, "logit_bias", tuple(sorted(bias.items())))
        words = []
        for w in self.bad_words_token_ids:
            if isinstance(w, (str, bytes)) or not hasattr(w, "__iter__"):
                raise ValueError(f"bad_words_token_ids entries must be token id lists, got {w!r}")
            ids = tuple(_token_id("bad_words_token_ids", t) for t in w)
            if not ids:
                raise ValueError("bad_words_token_ids must not contain an empty word")
            words.append(ids)
        object.__setattr__(self, "bad_words_token_ids", tuple(words))
        if self.allowed_token_ids is not None:
            allowed = tuple(_token_id("allowed_token_ids", t) for t in self.allowed_token_ids)
            if not allowed:
                raise ValueError("allowed_token_ids must not be empty (leave it out for all)")
            object.__setattr__(self, "allowed_token_ids", allowed)
            banned = {w[0] for w in words if len(w) == 1}
            if banned.issuperset(allowed):
                raise ValueError("allowed_token_ids are all bad words: nothing could be sampled")

    def check_token_ids(self, vocab_size: int) -> None:
        """logit_bias, bad_words_token_ids and allowed_token_ids name tokens of the vocabulary:
        a ValueError names the first field with an id outside [0, vocab_size)."""
        fields = {
            "logit_bias": [t for t, _ in self.logit_bias],
            "bad_words_token_ids": [t for w in self.bad_words_token_ids for t in w],
            "allowed_token_ids": list(self.allowed_token_ids or ()),
        }
        for name, ids in fields.items():
            bad = [t for t in ids if t >= vocab_size]
            if bad:
                raise ValueError(f"{name} token ids out of range [0, {vocab_size}): {bad[:5]}")

    @property
    def uses_penalties(self) -> bool:
        """Does sampling need the request's token counts (presence / frequency / repetition)?"""
        return (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.repetition_penalty != 1.0)

    @property
    def needs_history(self) -> bool:
        """Does the sampler need the request's tokens (penalties, multi-token bad words)?"""
        return self.uses_penalties or any(len(w) > 1 for w in self.bad_words_token_ids)

    @property
    def processes_logits(self) -> bool:
        """Does any logit processor apply to this request (before greedy or sampling)?"""
        return (self.uses_penalties or bool(self.logit_bias) or bool(self.bad_words_token_ids)
                or self.allowed_token_ids is not None)

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
            "structured": None if self.structured is None else self.structured.to_dict(),
            "n": self.n,
            "best_of": self.best_of,
            "prompt_logprobs": self.prompt_logprobs,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "repetition_penalty": self.repetition_penalty,
            "logit_bias": [[t, b] for t, b in self.logit_bias],
            "min_p": self.min_p,
            "bad_words_token_ids": [list(w) for w in self.bad_words_token_ids],
            "allowed_token_ids": (None if self.allowed_token_ids is None
                                  else list(self.allowed_token_ids)),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SamplingParams:
        d = dict(d)
        d["stop"] = tuple(d.get("stop") or ())
        d["stop_token_ids"] = tuple(d.get("stop_token_ids") or ())
        if d.get("structured") is not None:
            d["structured"] = StructuredSpec.from_dict(d["structured"])
        d["logit_bias"] = tuple(tuple(p) for p in d.get("logit_bias") or ())
        d["bad_words_token_ids"] = tuple(tuple(w) for w in d.get("bad_words_token_ids") or ())
        if d.get("allowed_token_ids") is not None:
            d["allowed_token_ids"] = tuple(d["allowed_token_ids"])
        return cls(**d)


def _number(name: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
        raise ValueError(f"{name} must be a number, got {v!r}")
    return float(v)


def _token_id(name: str, v: Any) -> int:
    """A token id: a non-negative integer (JSON object keys arrive as decimal strings)."""
    if isinstance(v, str) and v.strip().lstrip("-").isdigit():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"{name} token ids must be non-negative integers, got {v!r}")
    return v


@dataclass
class Request:
    """Engine-side request state. Mutated only by the scheduler and the engine loop."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_id: int | None = None
    arrival: float = 0.0
    status: RequestStatus = RequestStatus.WAITING
    # outputs so far, the whole request's (on D in first-token mode P's first token first)
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[Any] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose effect is in the cache (KV and SSM state)
    finish_reason: FinishReason | None = None
    num_preemptions: int = 0
    max_tokens: int = 0  # effective output budget (0: params.max_tokens)
    sample_final: bool = True  # False: compute the prompt only, sample nothing (P in n-1 mode,
    #                            max_tokens = 0)
    # prompt_logprobs: the whole prompt (P in n-1 mode computes one token less, yet scores all)
    # and the scores so far (entry i: token i + 1 given tokens 0..i; kept across preemption)
    scored_token_ids: list[int] = field(default_factory=list)
    prompt_scores: list[Any] = field(default_factory=list)
    grammar: Any = None  # structured output: its GrammarMatcher (engine/structured.py)
    history_synced: bool = False  # the runner has this request's token history (scheduler)
    first_scheduled: float | None = None  # monotonic time it first left the waiting queue

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
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == RequestStatus.FINISHED
