"""hybridpd.tokenizer.Tokenizer agrees with transformers.AutoTokenizer on the demo model."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from hybridpd.demo.writer import write_demo_model  # noqa: E402
from hybridpd.tokenizer import FALLBACK_CHAT_TEMPLATE, Tokenizer  # noqa: E402

torch.set_num_threads(1)

TEXTS = [
    "", " ", "  ", "\n", "\t\t", "\r\n", "hello world", "Hello, World!", " the state of the model",
    "héllo wörld", "naïve café", "日本語のテキスト", "中文 和 English", "שלום עולם", "مرحبا",
    "😀", "👩‍👩‍👧‍👦 family", "🇫🇷🇩🇪", "e\u0301", "zero\u200bwidth", "tab\tand\nnewline\n\n\n",
    "    indented code:\n        return x", "1234567890 000 00", "a" * 300, "it's don't we'll",
    "<s>literal bos</s>", "<|im_start|>user\nhi<|im_end|>", "x<pad>y<unk>z", "<|im_end",
    "\u00a0non-breaking", "\ufffd", "emoji😀in😀words", "trailing spaces   ", "\x00\x01\x7f",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_demo_model(tmp_path_factory.mktemp("tok") / "tiny", "tiny").path


@pytest.fixture(scope="module")
def ours(model_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(model_dir)


@pytest.fixture(scope="module")
def theirs(model_dir: Path):  # noqa: ANN201
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def _random_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    pools = ["abc xyz ", "   \n\t", "éüßçñ", "日本語中文", "😀🎉👍🏽", ".,;:!?'\"-", "0123456789"]
    return ["".join(rng.choice(rng.choice(pools)) for _ in range(rng.randint(1, 40)))
            for _ in range(n)]


@pytest.mark.parametrize("special", [True, False])
def test_encode_matches_auto_tokenizer(ours: Tokenizer, theirs, special: bool) -> None:  # noqa: ANN001
    for text in TEXTS + _random_texts(200):
        expected = theirs(text, add_special_tokens=special)["input_ids"]
        assert ours.encode(text, add_special_tokens=special) == expected, repr(text)


def test_bos_is_added_once_and_specials_in_text_are_tokens(ours: Tokenizer) -> None:
    ids = ours.encode("hi")
    assert ids[0] == ours.bos_token_id == 1 and ids.count(1) == 1
    assert ours.encode("<|im_end|>", add_special_tokens=False) == [5]


@pytest.mark.parametrize("skip", [True, False])
def test_decode_matches_auto_tokenizer(ours: Tokenizer, theirs, skip: bool) -> None:  # noqa: ANN001
    for text in TEXTS + _random_texts(100, seed=1):
        ids = ours.encode(text)
        assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(
            ids, skip_special_tokens=skip), repr(text)
    for text in TEXTS:  # byte-level: lossless round trip (specials in the text are skipped)
        if "<" not in text:
            assert ours.decode(ours.encode(text)) == text


def test_special_ids_and_sizes(ours: Tokenizer, theirs, model_dir: Path) -> None:  # noqa: ANN001
    assert ours.vocab_size == len(theirs)
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (
        theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id)
    config_eos = json.loads((model_dir / "config.json").read_text())["eos_token_id"]
    assert ours.eos_token_ids == tuple(dict.fromkeys([theirs.eos_token_id, *config_eos]))
    assert ours.id_to_token(ours.eos_token_id) == "</s>"


CHATS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "日本 😀"},
     {"role": "assistant", "content": "ok\n\n"}, {"role": "user", "content": "  again "}],
]


@pytest.mark.parametrize("gen", [True, False])
def test_chat_template_matches_auto_tokenizer(ours: Tokenizer, theirs, gen: bool) -> None:  # noqa: ANN001
    for chat in CHATS:
        expected = theirs.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
        assert ours.apply_chat_template(chat, add_generation_prompt=gen) == expected
        ids = ours.encode_chat(chat, add_generation_prompt=gen)
        assert ids == theirs(expected, add_special_tokens=False)["input_ids"]
        assert ids.count(ours.bos_token_id) == 1


def test_chat_template_errors_become_value_errors(ours: Tokenizer) -> None:
    with pytest.raises(ValueError, match="unsupported chat role: tool"):
        ours.apply_chat_template([{"role": "tool", "content": "x"}])
    bad = [
        ([], "non-empty list"),
        ("hi", "non-empty list"),
        ([["user", "hi"]], r"messages\[0\] must be an object"),
        ([{"role": "user"}], r"messages\[0\] is missing 'content'"),
        ([{"content": "x"}], "missing 'role'"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": 3}],
         r"messages\[1\].content must be a string"),
        ([{"role": "", "content": "x"}], "role must not be empty"),
    ]
    for messages, message in bad:
        with pytest.raises(ValueError, match=message):
            ours.apply_chat_template(messages)


def _copy_with(model_dir: Path, dest: Path, **cfg_changes: object) -> Path:
    shutil.copytree(model_dir, dest)
    cfg = json.loads((dest / "tokenizer_config.json").read_text())
    for key, value in cfg_changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (dest / "tokenizer_config.json").write_text(json.dumps(cfg))
    return dest


@pytest.mark.parametrize("flags", [{"add_bos_token": False}, {"add_eos_token": True}])
def test_tokenizer_json_post_processor_wins_over_flags(model_dir: Path, tmp_path: Path,
                                                      flags: dict[str, bool]) -> None:
    from transformers import AutoTokenizer

    d = _copy_with(model_dir, tmp_path / "m", **flags)
    ours, theirs = Tokenizer.from_dir(d), AutoTokenizer.from_pretrained(d)
    for text in ["hello", "", "日本 😀"]:
        assert ours.encode(text) == theirs(text)["input_ids"]
    assert ours.encode("hello")[0] == 1 and ours.encode("hello")[-1] != 2


def test_no_post_processor_means_no_bos(model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    d = _copy_with(model_dir, tmp_path / "m")
    tok_json = json.loads((d / "tokenizer.json").read_text())
    tok_json["post_processor"] = None
    (d / "tokenizer.json").write_text(json.dumps(tok_json))
    ours, theirs = Tokenizer.from_dir(d), AutoTokenizer.from_pretrained(d)
    for text in ["hello", " the end", "😀"]:
        assert ours.encode(text) == theirs(text)["input_ids"]
        assert ours.encode(text) == ours.encode(text, add_special_tokens=False)


def test_chat_template_file_takes_priority(model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    d = _copy_with(model_dir, tmp_path / "m")
    (d / "chat_template.jinja").write_text(
        "{% for m in messages %}[{{ m.role | upper }}] {{ m.content | tojson }}\n{% endfor %}"
        "{% if add_generation_prompt %}[ASSISTANT]{% endif %}")
    chat = CHATS[1]
    expected = AutoTokenizer.from_pretrained(d).apply_chat_template(
        chat, tokenize=False, add_generation_prompt=True)
    got = Tokenizer.from_dir(d).apply_chat_template(chat)
    assert got == expected and got.startswith('[SYSTEM] "Be brief."')


def test_fallback_template_when_none(model_dir: Path, tmp_path: Path) -> None:
    d = _copy_with(model_dir, tmp_path / "m", chat_template=None)
    tok = Tokenizer.from_dir(d)
    assert tok.chat_template is None
    chat = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    assert tok.apply_chat_template(chat) == "<s><|system|>\nS\n<|user|>\nU\n<|assistant|>\n"
    assert tok.apply_chat_template(chat, add_generation_prompt=False).endswith("<|user|>\nU\n")
    assert "<|assistant|>" in FALLBACK_CHAT_TEMPLATE


def test_missing_tokenizer_json_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


def test_named_special_token_missing_from_vocab_is_added(model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    d = _copy_with(model_dir, tmp_path / "m", eos_token="<|eot|>",
                   extra_special_tokens=["<|tool|>"])
    ours, theirs = Tokenizer.from_dir(d), AutoTokenizer.from_pretrained(d)
    assert ours.eos_token_id == theirs.eos_token_id == ours.vocab_size - 2
    assert ours.vocab_size == len(theirs)
    for text in ["a<|eot|>b", "x <|tool|> y"]:
        assert ours.encode(text) == theirs(text)["input_ids"]
        assert ours.decode(ours.encode(text)) == theirs.decode(theirs(text)["input_ids"],
                                                              skip_special_tokens=True)


def test_template_helpers_match_transformers(model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    d = _copy_with(model_dir, tmp_path / "m", chat_template=(
        "{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}"
        "{{ m.content }}{% endgeneration %}{% else %}{{ m | tojson }}{% endif %}\n"
        "{% if loop.index > 2 %}{% break %}{% endif %}{% endfor %}"
        "{{ eos_token }}{{ extra | default('none') }}"))
    ours, theirs = Tokenizer.from_dir(d), AutoTokenizer.from_pretrained(d)
    chat = CHATS[1]
    for kwargs in ({}, {"extra": "X"}):
        expected = theirs.apply_chat_template(chat, tokenize=False, **kwargs)
        assert ours.apply_chat_template(chat, **kwargs) == expected
    assert '"content": "日本 😀"' in expected and "again" not in expected


def test_bad_words_encode_bare_and_after_a_space(ours: Tokenizer) -> None:
    def enc(text: str) -> tuple[int, ...]:
        return tuple(ours.encode(text, add_special_tokens=False))

    # "cat" and " cat" are two tokens each with different first tokens: both spellings are
    # banned; "hello" and " hello" differ in length: only the bare word (vLLM's rule).
    assert len(enc("cat")) == len(enc(" cat")) and enc("cat")[0] != enc(" cat")[0]
    assert len(enc("hello")) != len(enc(" hello"))
    assert ours.encode_bad_words(["  cat", "hello"]) == (enc("cat"), enc(" cat"), enc("hello"))
    with pytest.raises(ValueError, match="encodes to no tokens"):
        ours.encode_bad_words(["   "])
