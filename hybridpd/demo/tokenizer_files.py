"""Tokenizer files of demo checkpoints: a small byte-level BPE with a ChatML-style template.

Owns the demo vocabulary (special tokens, the 256 byte tokens, a fixed list of merges), the
chat template, and writing `tokenizer.json` + `tokenizer_config.json` so that both our
`hybridpd.tokenizer.Tokenizer` and `transformers.AutoTokenizer` load the directory offline.
Must not know model shapes or weights.

Vocabulary layout (ids): special tokens first (`<unk>` 0, `<s>` 1, `</s>` 2, `<pad>` 3,
`<|im_start|>` 4, `<|im_end|>` 5), then byte b at `BYTE_OFFSET + b`, then one token per merge.
Encoding adds `<s>` in front (post-processor and `add_bos_token`). Chat turns end with
`<|im_end|>`, which is an end-of-sequence id next to `</s>`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

UNK, BOS, EOS, PAD, IM_START, IM_END = (
    "<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"
)
SPECIAL_TOKENS = (UNK, BOS, EOS, PAD, IM_START, IM_END)
BYTE_OFFSET = len(SPECIAL_TOKENS)

# Merge targets, each built left to right from its bytes (all intermediate pieces become tokens).
MERGE_WORDS = (
    " the", " of", " and", " to", " in", " is", " that", " it", " for", " you", " was",
    " with", " on", " as", " are", " be", " this", " have", " not", " at", " or", " by",
    " from", " we", " an", " can", " will", " one", " all", " there", " what", " model",
    " state", " token", " hello", " world", " Mamba", " attention", "ing", "ed", "er", "es",
    "en", "re", "on", "at", "or", "an", "th", "he", "ll", "  ", "    ", "\n\n", ".\n", ", ",
    ". ", "0", "00", "000",
)

CHAT_TEMPLATE = (
    "{{- bos_token -}}\n"
    "{%- for message in messages -%}\n"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}\n"
    "{{- raise_exception('unsupported chat role: ' + message['role']) -}}\n"
    "{%- endif -%}\n"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "{{- '<|im_start|>assistant\\n' -}}\n"
    "{%- endif -%}\n"
)


@dataclass(frozen=True)
class TokenizerInfo:
    """What a config.json needs to know about the written tokenizer."""

    size: int  # number of ids (max id + 1)
    bos_token_id: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int


def byte_to_unicode() -> dict[int, str]:
    """The byte-level alphabet: printable Latin-1 bytes map to themselves, others to 256+n."""
    kept = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in kept}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def build_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Deterministic vocab (special, bytes, merged pieces) and the ordered merge list."""
    alphabet = byte_to_unicode()
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for b in range(256):
        vocab[alphabet[b]] = BYTE_OFFSET + b
    merges: list[tuple[str, str]] = []
    for word in MERGE_WORDS:
        pieces = [alphabet[b] for b in word.encode("utf-8")]
        left = pieces[0]
        for right in pieces[1:]:
            merged = left + right
            if merged not in vocab:
                vocab[merged] = len(vocab)
                merges.append((left, right))
            left = merged
    return vocab, merges


def build_tokenizer() -> Tokenizer:
    """The demo tokenizer as a `tokenizers.Tokenizer` (BOS added by the post-processor)."""
    vocab, merges = build_vocab_and_merges()
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0",
        pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1",
        special_tokens=[(BOS, vocab[BOS])],
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok


def tokenizer_config(model_max_length: int) -> dict[str, object]:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": UNK,
        "pad_token": PAD,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "chat_template": CHAT_TEMPLATE,
    }


def write_tokenizer_files(out_dir: str | Path, model_max_length: int = 4096) -> TokenizerInfo:
    """Write `tokenizer.json` and `tokenizer_config.json` into `out_dir` (must exist)."""
    out = Path(out_dir)
    tok = build_tokenizer()
    tok.save(str(out / "tokenizer.json"))
    cfg = tokenizer_config(model_max_length)
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return describe(tok)


def describe(tok: Tokenizer | None = None) -> TokenizerInfo:
    """Size and special ids of `tok` (the demo tokenizer when None)."""
    tok = tok or build_tokenizer()

    def token_id(token: str) -> int:
        i = tok.token_to_id(token)
        assert i is not None, token  # build_tokenizer added every special token
        return i

    return TokenizerInfo(
        size=tok.get_vocab_size(with_added_tokens=True),
        bos_token_id=token_id(BOS),
        eos_token_ids=(token_id(EOS), token_id(IM_END)),
        pad_token_id=token_id(PAD),
    )
