"""Where benchmark prompts come from: random token ids with length ranges, a ShareGPT-format JSON
file, or a jsonl file of prompts.

Owns `BenchPrompt` (one prompt and its output length) and the three loaders, each reproducible
from a seed and raising `DatasetError` (one line for the user) on a bad file. Must not know
HTTP, the server, or statistics.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india",
         "juliet", "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo")


class DatasetError(ValueError):
    """A dataset file is missing or malformed; the message names the file and the entry."""


@dataclass(frozen=True)
class BenchPrompt:
    prompt: list[int] | str  # token ids (completions) or text
    output_len: int


def random_prompts(num: int, input_len: tuple[int, int], output_len: tuple[int, int],
                   seed: int, token_id_range: tuple[int, int] = (10, 250),
                   as_text: bool = False) -> list[BenchPrompt]:
    """`num` prompts with lengths uniform in the inclusive ranges: token ids, or words."""
    rng = random.Random(seed)
    low, high = token_id_range
    out = []
    for _ in range(num):
        n_in = rng.randint(*input_len)
        n_out = rng.randint(*output_len)
        if as_text:
            prompt: list[int] | str = " ".join(rng.choice(WORDS) for _ in range(n_in))
        else:
            prompt = [rng.randrange(low, high) for _ in range(n_in)]
        out.append(BenchPrompt(prompt, n_out))
    return out


def _load_json(path: str | Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DatasetError(f"dataset {path} does not exist") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"dataset {path} is not JSON: {exc}") from None


def sharegpt_prompts(path: str | Path, num: int, seed: int, default_output_len: int,
                     count_tokens: Callable[[str], int] | None = None) -> list[BenchPrompt]:
    """The first human turn of conversations with a reply, shuffled by `seed`; the output
    length is the reply's token count when `count_tokens` is given, else the default."""
    data = _load_json(path)
    if not isinstance(data, list):
        raise DatasetError(f"{path}: a ShareGPT file is a JSON list of conversations")
    pairs = []
    for i, conv in enumerate(data):
        turns = conv.get("conversations") if isinstance(conv, dict) else None
        if not isinstance(turns, list):
            raise DatasetError(f"{path}: entry {i} has no 'conversations' list")
        if len(turns) < 2 or not all(isinstance(t, dict) for t in turns[:2]):
            continue  # no reply to size the output by
        ask, reply = turns[0].get("value"), turns[1].get("value")
        if isinstance(ask, str) and ask and isinstance(reply, str):
            pairs.append((ask, reply))
    if not pairs:
        raise DatasetError(f"{path}: no conversation with a prompt and a reply")
    random.Random(seed).shuffle(pairs)
    out = []
    for k in range(num):
        ask, reply = pairs[k % len(pairs)]
        n_out = max(1, count_tokens(reply)) if count_tokens is not None else default_output_len
        out.append(BenchPrompt(ask, n_out))
    return out


def jsonl_prompts(path: str | Path, num: int, default_output_len: int) -> list[BenchPrompt]:
    """One prompt per line: a JSON string, or {"prompt": text | [ids], "max_tokens": n}.
    Cycled when `num` exceeds the file."""
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        raise DatasetError(f"dataset {path} does not exist") from None
    items = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path}:{i}: not JSON ({exc})") from None
        items.append(_jsonl_item(row, f"{path}:{i}", default_output_len))
    if not items:
        raise DatasetError(f"{path}: no prompts")
    return [items[k % len(items)] for k in range(num)]


def _jsonl_item(row: Any, where: str, default_output_len: int) -> BenchPrompt:
    if isinstance(row, str):
        row = {"prompt": row}
    if not isinstance(row, dict):
        raise DatasetError(f"{where}: a line is a string or an object with 'prompt'")
    prompt = row.get("prompt")
    ids = isinstance(prompt, list) and all(isinstance(t, int) and t >= 0 for t in prompt)
    if not (isinstance(prompt, str) and prompt) and not (ids and prompt):
        raise DatasetError(f"{where}: 'prompt' must be non-empty text or token ids")
    n_out = row.get("max_tokens", default_output_len)
    if not isinstance(n_out, int) or n_out < 1:
        raise DatasetError(f"{where}: 'max_tokens' must be an integer >= 1")
    return BenchPrompt(prompt, n_out)
