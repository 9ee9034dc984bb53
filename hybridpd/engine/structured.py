"""Structured output: constrain sampling to a JSON schema, a regex, a list of choices or a grammar.

Owns `StructuredSpec` (what a request asks for: a `StructuredKind` and its text), the engine's
`StructuredOutputs` (the grammar library's view of the vocabulary, built once from the model's
`tokenizer.json`, and compiled grammars cached by spec) and `GrammarMatcher` (one request's
position in its grammar). Per step the engine asks `StructuredOutputs.token_masks` for one
packed bitmask row per sampled structured request (bit t of row r set: token t is allowed);
the sampler applies them in one masked op before sampling (`engine/sampler.py`), and the
engine advances each matcher with its sampled token (`GrammarMatcher.consume`). A grammar that
is complete allows EOS (and only then); a grammar that cannot go on ends the request with
`stop`.

The grammar library is llguidance (an abi3 wheel, no torch or CUDA build needed), imported
only when a request first uses structured output. JSON is compiled compact (no free
whitespace between tokens: a small or random model could otherwise emit whitespace until
`max_tokens`). Must not know HTTP field names (`response_format`, `guided_json`, tools: the
server maps them to a spec), the scheduler or the model.
"""

from __future__ import annotations

import enum
import json
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

GRAMMAR_CACHE_SIZE = 64  # compiled grammars kept per engine (LRU)
MASK_THREADS = 2  # llguidance threads filling a batch's masks


class StructuredKind(str, enum.Enum):
    JSON_OBJECT = "json_object"  # any JSON object
    JSON_SCHEMA = "json_schema"  # a JSON value valid against `value` (a schema, JSON text)
    REGEX = "regex"  # the whole output matches `value`
    CHOICE = "choice"  # the output is exactly one of `choices`
    GRAMMAR = "grammar"  # a Lark (or GBNF) grammar in `value`


class MatchOutcome(enum.Enum):
    ACCEPTED = enum.auto()  # the token fits; the grammar goes on
    COMPLETE = enum.auto()  # the token fits and the grammar can take nothing more
    REJECTED = enum.auto()  # the token does not fit (the mask was not applied)


@dataclass(frozen=True)
class StructuredSpec:
    """What the output must match. Build with the class methods; validated on construction
    (ValueError with a clear message). `value` is compact JSON text for JSON_SCHEMA (equal
    schemas share one compiled grammar; key order is kept: it is the output's), the pattern
    for REGEX, the grammar (Lark or GBNF) for GRAMMAR; CHOICE has `choices`."""

    kind: StructuredKind
    value: str = ""
    choices: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", StructuredKind(self.kind))
        object.__setattr__(self, "choices", tuple(self.choices))
        k = self.kind
        if not isinstance(self.value, str):
            raise ValueError(f"structured {k.value}: value must be a string")
        if k == StructuredKind.JSON_SCHEMA:
            try:
                schema = json.loads(self.value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"json_schema is not valid JSON: {exc}") from None
            if not isinstance(schema, dict | bool):
                raise ValueError("json_schema must be a JSON object (or true/false)")
            # compact, key order kept (properties are generated in the schema's order)
            object.__setattr__(self, "value", json.dumps(schema, separators=(",", ":")))
        elif k in (StructuredKind.REGEX, StructuredKind.GRAMMAR) and not self.value:
            raise ValueError(f"structured {k.value} must not be empty")
        if k == StructuredKind.CHOICE:
            if not self.choices or not all(isinstance(c, str) and c for c in self.choices):
                raise ValueError("choice must be a non-empty list of non-empty strings")
        elif self.choices:
            raise ValueError(f"choices are only for kind 'choice', not {k.value!r}")

    @classmethod
    def json_object(cls) -> StructuredSpec:
        return cls(StructuredKind.JSON_OBJECT)

    @classmethod
    def json_schema(cls, schema: dict[str, Any] | bool | str) -> StructuredSpec:
        return cls(StructuredKind.JSON_SCHEMA, schema if isinstance(schema, str)
                   else json.dumps(schema))

    @classmethod
    def regex(cls, pattern: str) -> StructuredSpec:
        return cls(StructuredKind.REGEX, pattern)

    @classmethod
    def choice(cls, choices: Sequence[str]) -> StructuredSpec:
        if isinstance(choices, str):
            raise ValueError("choice must be a list of strings, not one string")
        return cls(StructuredKind.CHOICE, choices=tuple(choices))

    @classmethod
    def grammar(cls, grammar: str) -> StructuredSpec:
        return cls(StructuredKind.GRAMMAR, grammar)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind.value, "value": self.value, "choices": list(self.choices)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StructuredSpec:
        return cls(StructuredKind(d["kind"]), d.get("value", ""), tuple(d.get("choices") or ()))

    def library_grammar(self) -> str:
        """The llguidance grammar text of this spec (imports the library)."""
        import llguidance

        m = llguidance.LLMatcher
        compact = {"whitespace_flexible": False}
        if self.kind == StructuredKind.JSON_OBJECT:
            return m.grammar_from_json_schema({"type": "object"}, defaults=compact)  # type: ignore[arg-type]
        if self.kind == StructuredKind.JSON_SCHEMA:
            return m.grammar_from_json_schema(self.value, defaults=compact)  # type: ignore[arg-type]
        if self.kind == StructuredKind.REGEX:
            return m.grammar_from_regex(self.value)
        if self.kind == StructuredKind.CHOICE:
            return llguidance.grammar_from("choice", json.dumps(list(self.choices)))
        return llguidance.grammar_from("grammar", self.value)


@dataclass(frozen=True)
class TokenMasks:
    """One step's masks: row r of `bits` (int32, packed, bit t = token t allowed) is for the
    request `request_ids[r]`."""

    request_ids: tuple[str, ...]
    bits: torch.Tensor  # (R, ceil(V / 32)) int32, host


class GrammarMatcher:
    """One request's place in its grammar. Not thread-safe; owned by its `Request`."""

    def __init__(self, matcher: Any) -> None:
        self._m = matcher

    @property
    def library_matcher(self) -> Any:
        return self._m

    def consume(self, token: int) -> MatchOutcome:
        if not self._m.consume_token(int(token)):
            return MatchOutcome.REJECTED
        return MatchOutcome.COMPLETE if self._m.is_stopped() else MatchOutcome.ACCEPTED

    @property
    def error(self) -> str:
        return str(self._m.get_error())


class StructuredOutputs:
    """The engine's structured-output state: the library tokenizer (lazily, from the model
    directory's tokenizer.json), an LRU of compiled grammars, and a mask executor."""

    def __init__(self, model_dir: str, vocab_size: int, eos_token_ids: Sequence[int]) -> None:
        self.model_dir = model_dir
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids)
        self._tokenizer: Any = None
        self._executor: Any = None
        self._compiled: OrderedDict[StructuredSpec, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.stats = {"grammars_compiled": 0, "grammar_cache_hits": 0}

    def _library_tokenizer(self) -> Any:
        if self._tokenizer is None:
            import llguidance

            path = Path(self.model_dir) / "tokenizer.json"
            if not path.is_file():
                raise ValueError(f"structured output needs the model's tokenizer.json; "
                                 f"{self.model_dir} has none")
            self._tokenizer = llguidance.LLTokenizer(
                path.read_text(encoding="utf-8"), n_vocab=self.vocab_size,
                eos_token=self.eos_token_ids or None)
            self._executor = llguidance.LLExecutor(MASK_THREADS)
        return self._tokenizer

    def matcher(self, spec: StructuredSpec) -> GrammarMatcher:
        """A fresh matcher at the start of `spec`'s grammar; ValueError if it does not compile."""
        with self._lock:
            compiled = self._compiled.get(spec)
            if compiled is not None:
                self._compiled.move_to_end(spec)
                self.stats["grammar_cache_hits"] += 1
            else:
                compiled = self._compile(spec)
                self._compiled[spec] = compiled
                if len(self._compiled) > GRAMMAR_CACHE_SIZE:
                    self._compiled.popitem(last=False)
                self.stats["grammars_compiled"] += 1
            return GrammarMatcher(compiled.deep_copy())

    def _compile(self, spec: StructuredSpec) -> Any:
        import llguidance

        tok = self._library_tokenizer()
        try:
            grammar = spec.library_grammar()
        except ValueError as exc:
            raise ValueError(f"invalid {spec.kind.value}: {exc}") from None
        m = llguidance.LLMatcher(tok, grammar, log_level=0)
        if m.is_error():
            raise ValueError(f"invalid {spec.kind.value}: {m.get_error()}")
        return m

    def token_masks(self, rows: Sequence[tuple[str, GrammarMatcher]]) -> TokenMasks | None:
        """Allowed-token bitmasks for these (request id, matcher) rows, filled in parallel."""
        if not rows:
            return None
        import torch

        self._library_tokenizer()
        width = (self.vocab_size + 31) // 32
        bits = torch.full((len(rows), width), -1, dtype=torch.int32)  # contiguous, host
        # llguidance.torch's wrapper of this call would pull in torch.compile at import
        self._executor.unsafe_compute_mask_ptr(
            [(m.library_matcher, i) for i, (_, m) in enumerate(rows)], bits.data_ptr(),
            width * 4, len(rows))
        return TokenMasks(tuple(rid for rid, _ in rows), bits)
