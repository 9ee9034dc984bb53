"""Synthetic demo tasks: answers are right, streams are seeded, held-out never meets training."""

from __future__ import annotations

import itertools
import random

import pytest

from hybridpd.demo import tasks as T


def test_answers_are_the_true_answers() -> None:
    rng = random.Random(3)
    for task in T.Task:
        for _ in range(200):
            p = T.draw(task, rng)
            assert p.prompt.endswith("=") and p.answer
            body = p.prompt[:-1]
            if task is T.Task.ADD:
                a, b = body.split("+")
                assert int(p.answer) == int(a) + int(b) and len(a) <= T.MAX_ADD_DIGITS
            elif task is T.Task.COPY:
                assert p.answer == body.removeprefix("copy:")
            elif task is T.Task.REVERSE:
                assert p.answer == body.removeprefix("reverse:")[::-1]
            else:
                head, word = body.split(" in ")
                assert p.answer == str(word.count(head.removeprefix("count ")))


def test_held_out_and_training_streams_are_disjoint_and_seeded() -> None:
    train = {p.prompt for p in itertools.islice(T.stream(T.Split.TRAIN, 0), 20000)}
    held = T.held_out(500, seed=0)
    assert len({p.prompt for p in held}) == 500  # distinct
    assert not train & {p.prompt for p in held}
    assert all(T.split_of(p.prompt) is T.Split.HELD_OUT for p in held)
    assert T.held_out(500, seed=0) == held
    assert T.held_out(500, seed=1) != held
    # tasks taken in turn: the first of each task appear in order
    assert [p.task for p in held[:4]] == list(T.Task)


def test_parse_tasks_names_the_known_ones() -> None:
    assert T.parse_tasks("add, reverse") == (T.Task.ADD, T.Task.REVERSE)
    with pytest.raises(ValueError, match="unknown task 'mul'.*add"):
        T.parse_tasks("add,mul")
    with pytest.raises(ValueError):
        T.held_out(0)
