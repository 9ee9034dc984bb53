"""Text <-> token ids for a Hugging Face model directory, without importing transformers.

Owns `Tokenizer`: loading `tokenizer.json` with the `tokenizers` library, the named special
tokens of `tokenizer_config.json`, end-of-sequence ids, and rendering chat templates with a
sandboxed jinja2 environment. Must not know models, requests or HTTP.

Fidelity notes (what `transformers` 5.x `AutoTokenizer` does for a generic tokenizer.json
checkpoint, and so do we): BOS/EOS insertion comes from tokenizer.json's post-processor only
(`add_bos_token`/`add_eos_token` in tokenizer_config are ignored when tokenizer.json exists; no
post-processor means no special tokens are added); named special tokens become special (split
out of text, skipped by `decode`). Not reproduced: model-specific tokenizer classes that
rebuild the post-processor, Mistral regex patching, `clean_up_tokenization_spaces`.
Chat prompts already contain their special tokens: encode them with
`add_special_tokens=False` (`encode_chat` does).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken
from tokenizers import Tokenizer as HFTokenizer

NAMED_SPECIAL = ("bos_token", "eos_token", "unk_token", "pad_token")

# Used when the model ships no chat template: optional BOS, then per message
# "<|{role}|>\n{content}\n", then "<|assistant|>\n" when a generation prompt is requested.
FALLBACK_CHAT_TEMPLATE = (
    "{%- if bos_token %}{{ bos_token }}{% endif -%}\n"
    "{%- for message in messages -%}\n"
    "{{- '<|' + message['role'] + '|>\\n' + message['content'] + '\\n' -}}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif -%}\n"
)


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _token_text(value: Any) -> str | None:
    """A special token given as a string or as a serialized AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _as_ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list | tuple) else [int(value)]


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (assistant-mask markers): renders the body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def compile_chat_template(source: str) -> jinja2.Template:
    """Compile a chat template in a sandbox with the helpers HF templates expect."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True,
        extensions=[_GenerationTag, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def validate_messages(messages: Any) -> list[dict[str, Any]]:
    """Check `messages` is a non-empty list of {"role": str, "content": str}; ValueError if not."""
    if not isinstance(messages, list | tuple) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': str, 'content': str}")
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise ValueError(f"messages[{i}] must be an object, got {type(msg).__name__}")
        for key in ("role", "content"):
            if key not in msg:
                raise ValueError(f"messages[{i}] is missing '{key}'")
            if not isinstance(msg[key], str):
                raise ValueError(
                    f"messages[{i}].{key} must be a string, got {type(msg[key]).__name__}"
                )
        if not msg["role"]:
            raise ValueError(f"messages[{i}].role must not be empty")
    return [dict(m) for m in messages]


@dataclass(frozen=True)
class SpecialTokens:
    bos: str | None
    eos: str | None
    unk: str | None
    pad: str | None

    def as_template_vars(self) -> dict[str, str]:
        names = {"bos_token": self.bos, "eos_token": self.eos,
                 "unk_token": self.unk, "pad_token": self.pad}
        return {k: v for k, v in names.items() if v is not None}


class Tokenizer:
    """A loaded tokenizer. Build with `Tokenizer.from_dir(model_dir)`."""

    def __init__(self, backend: HFTokenizer, special: SpecialTokens, chat_template: str | None,
                 extra_eos_ids: Sequence[int] = ()) -> None:
        self._tok = backend
        self.special = special
        self.chat_template = chat_template
        self._template = compile_chat_template(chat_template or FALLBACK_CHAT_TEMPLATE)
        eos = [] if self.eos_token_id is None else [self.eos_token_id]
        self._eos_ids = tuple(dict.fromkeys([*eos, *extra_eos_ids]))

    # ---- construction ----------------------------------------------------------------------
    @classmethod
    def from_dir(cls, model_dir: str | Path) -> Tokenizer:
        d = Path(model_dir)
        if not (d / "tokenizer.json").is_file():
            raise FileNotFoundError(f"no tokenizer.json in {d}")
        backend = HFTokenizer.from_file(str(d / "tokenizer.json"))
        cfg = _read_json(d / "tokenizer_config.json")
        special = SpecialTokens(*(_token_text(cfg.get(k)) for k in NAMED_SPECIAL))
        _register_special_tokens(backend, special, cfg)
        template_file = d / "chat_template.jinja"  # takes priority, as in transformers
        template = (template_file.read_text(encoding="utf-8") if template_file.is_file()
                    else cfg.get("chat_template"))
        if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default")
        extra_eos = [*_as_ids(_read_json(d / "config.json").get("eos_token_id")),
                     *_as_ids(_read_json(d / "generation_config.json").get("eos_token_id"))]
        return cls(backend, special, template, extra_eos)

    # ---- ids -------------------------------------------------------------------------------
    def _id(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self._id(self.special.bos)

    @property
    def eos_token_id(self) -> int | None:
        return self._id(self.special.eos)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """The tokenizer's EOS, then config.json / generation_config.json EOS ids (deduped)."""
        return self._eos_ids

    @property
    def pad_token_id(self) -> int | None:
        return self._id(self.special.pad)

    @property
    def vocab_size(self) -> int:
        """Number of token ids including added/special tokens."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def max_token_bytes(self) -> int:
        """An upper bound on the UTF-8 bytes of input text one token can stand for.

        The longest token string of the vocabulary in UTF-8 (byte-level and byte-fallback
        spellings only overestimate), times 4 when the tokenizer has a normalizer (NFKC,
        accent stripping... can shrink text before it is split). O(vocab); call it once.
        """
        vocab = self._tok.get_vocab(with_added_tokens=True)
        longest = max((len(t.encode("utf-8")) for t in vocab), default=1)
        return max(1, longest) * (4 if self._tok.normalizer is not None else 1)

    # ---- text ------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"text must be a string, got {type(text).__name__}")
        # encode_batch releases the GIL while it works (encode holds it for the whole call), so
        # a huge prompt tokenized on a worker thread never stalls the API's event loop.
        return self._tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def encode_bad_words(self, words: Sequence[str]) -> tuple[tuple[int, ...], ...]:
        """Token id sequences for `bad_words` as vLLM derives them: each word (leading spaces
        stripped) encoded without special tokens, plus its spelling after a space (the word in
        mid-text) when that starts with a different token and has as many tokens."""
        out: list[tuple[int, ...]] = []
        for word in words:
            if not isinstance(word, str):
                raise ValueError(f"bad_words must be strings, got {word!r}")
            bare = tuple(self.encode(word.lstrip(), add_special_tokens=False))
            if not bare:
                raise ValueError(f"bad word {word!r} encodes to no tokens")
            out.append(bare)
            spaced = tuple(self.encode(" " + word.lstrip(), add_special_tokens=False))
            if spaced and spaced[0] != bare[0] and len(spaced) == len(bare):
                out.append(spaced)
        return tuple(out)

    # ---- chat ------------------------------------------------------------------------------
    def apply_chat_template(self, messages: Sequence[dict[str, Any]],
                            add_generation_prompt: bool = True, **template_vars: Any) -> str:
        """Render messages with the model's chat template, as `AutoTokenizer.apply_chat_template
        (tokenize=False)` does (template variables: messages, add_generation_prompt, tools=None,
        documents=None, bos/eos/unk/pad_token, then `template_vars`).

        Without a model template, FALLBACK_CHAT_TEMPLATE is used: BOS (if any), then
        "<|{role}|>\n{content}\n" per message, then "<|assistant|>\n" when
        `add_generation_prompt`. ValueError for malformed messages or when the template
        rejects them (e.g. via `raise_exception`).
        """
        msgs = validate_messages(messages)
        context = {**self.special.as_template_vars(), **template_vars}
        try:
            return self._template.render(messages=msgs, add_generation_prompt=add_generation_prompt,
                                         tools=None, documents=None, **context)
        except jinja2.TemplateError as exc:
            raise ValueError(f"chat template rejected the messages: {exc}") from exc

    def encode_chat(self, messages: Sequence[dict[str, Any]],
                    add_generation_prompt: bool = True, **template_vars: Any) -> list[int]:
        """Prompt ids of a chat: the rendered template, encoded without extra special tokens."""
        text = self.apply_chat_template(messages, add_generation_prompt, **template_vars)
        return self.encode(text, add_special_tokens=False)


def _register_special_tokens(backend: HFTokenizer, special: SpecialTokens,
                             cfg: dict[str, Any]) -> None:
    """Make named and additional special tokens special in the backend (as transformers does)."""
    added = {str(t.content) for t in backend.get_added_tokens_decoder().values()}
    extra = cfg.get("additional_special_tokens") or cfg.get("extra_special_tokens") or []
    wanted = [special.bos, special.eos, special.unk, special.pad,
              *(_token_text(t) for t in (extra if isinstance(extra, list) else []))]
    new = [t for t in dict.fromkeys(wanted) if t is not None and t not in added]
    if new:
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in new])

