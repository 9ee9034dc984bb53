"""Synthetic tasks the trained demo model learns, and the train / held-out split between them.

Owns the prompt format of every task (plain text a person can check: `417+285=` -> `702`,
`reverse:KQZT=` -> `TZQK`, ...), drawing seeded problems, and the split: a problem is held out
when a hash of its prompt falls in the held-out bucket, so the training stream and every
evaluation set are disjoint whatever their seeds. Must not know tokenizers, models or HTTP.
"""

from __future__ import annotations

import enum
import random
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

HELD_OUT_BUCKETS = 10  # one prompt in ten (by hash) is never trained on
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"  # upper case: the demo tokenizer has no merges for them
COUNT_LETTERS = "ABCD"
MAX_ADD_DIGITS = 3
MIN_STR, MAX_STR = 2, 7


class Task(enum.Enum):
    ADD = "add"  # 417+285=  -> 702
    COPY = "copy"  # copy:KQZT=  -> KQZT
    REVERSE = "reverse"  # reverse:KQZT=  -> TZQK
    COUNT = "count"  # count A in BACAA=  -> 3


class Split(enum.Enum):
    TRAIN = "train"
    HELD_OUT = "held-out"


@dataclass(frozen=True)
class Problem:
    task: Task
    prompt: str
    answer: str


def _number(rng: random.Random) -> int:
    digits = rng.randint(1, MAX_ADD_DIGITS)
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


def _word(rng: random.Random, alphabet: str) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(MIN_STR, MAX_STR)))


def draw(task: Task, rng: random.Random) -> Problem:
    """One problem of `task` (either split)."""
    if task is Task.ADD:
        a, b = _number(rng), _number(rng)
        return Problem(task, f"{a}+{b}=", str(a + b))
    if task is Task.COPY:
        w = _word(rng, LETTERS)
        return Problem(task, f"copy:{w}=", w)
    if task is Task.REVERSE:
        w = _word(rng, LETTERS)
        return Problem(task, f"reverse:{w}=", w[::-1])
    assert task is Task.COUNT, task
    letter, w = rng.choice(COUNT_LETTERS), _word(rng, COUNT_LETTERS)
    return Problem(task, f"count {letter} in {w}=", str(w.count(letter)))


def split_of(prompt: str) -> Split:
    """Which split a prompt belongs to (fixed by its text alone)."""
    held = zlib.crc32(prompt.encode()) % HELD_OUT_BUCKETS == 0
    return Split.HELD_OUT if held else Split.TRAIN


def stream(split: Split, seed: int, tasks: Sequence[Task] = tuple(Task)) -> Iterator[Problem]:
    """An endless seeded stream of `split` problems, tasks taken in turn."""
    if not tasks:
        raise ValueError("at least one task is needed")
    rng = random.Random(f"{split.value}:{seed}")
    while True:
        for task in tasks:
            while True:
                p = draw(task, rng)
                if split_of(p.prompt) is split:
                    yield p
                    break


def held_out(num: int, seed: int = 0, tasks: Sequence[Task] = tuple(Task)) -> list[Problem]:
    """`num` distinct held-out problems (tasks in turn), the same list for the same seed."""
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    out: list[Problem] = []
    seen: set[str] = set()
    for p in stream(Split.HELD_OUT, seed, tasks):
        if p.prompt not in seen:
            seen.add(p.prompt)
            out.append(p)
            if len(out) == num:
                return out
    raise AssertionError("unreachable: the stream is endless")


def parse_tasks(names: str) -> tuple[Task, ...]:
    """'add,copy' -> (Task.ADD, Task.COPY); ValueError naming the known tasks otherwise."""
    known = {t.value: t for t in Task}
    out = []
    for name in (n.strip() for n in names.split(",")):
        if name not in known:
            raise ValueError(f"unknown task {name!r}; choose from {sorted(known)}")
        out.append(known[name])
    return tuple(out)
