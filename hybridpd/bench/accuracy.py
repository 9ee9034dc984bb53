"""`hybridpd bench accuracy`: exact-match accuracy of held-out demo tasks through any endpoint.

Owns sending N held-out problems (`demo.tasks.held_out`: seeded, never trained on) as greedy
OpenAI completions at a fixed concurrency, scoring each answer by exact match (the generated
text, which ends at EOS, must equal the true answer), and the report: one line of text, and
JSON with per-task and overall accuracy and every answer (so two deployments can be compared
answer by answer). Must not know the server's internals or the model.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp

from hybridpd.bench.loadgen import fetch_model_name
from hybridpd.demo.tasks import Problem, Task, held_out, parse_tasks


@dataclass(frozen=True)
class Answer:
    task: str
    prompt: str
    answer: str
    output: str | None  # None when the request failed
    correct: bool
    error: str | None = None


@dataclass(frozen=True)
class AccuracyReport:
    model: str
    num: int
    concurrency: int
    seed: int
    seconds: float
    overall: float
    per_task: dict[str, float]
    failed: int
    answers: list[Answer]

    def line(self) -> str:
        right = sum(a.correct for a in self.answers)
        tasks = " ".join(f"{t} {v:.3f}" for t, v in self.per_task.items())
        failed = f", {self.failed} failed" if self.failed else ""
        return (f"accuracy {self.overall:.3f} ({right}/{self.num}) | {tasks} | "
                f"{self.seconds:.1f} s at concurrency {self.concurrency}{failed}")

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "answers": [asdict(a) for a in self.answers]}


async def _ask(session: aiohttp.ClientSession, url: str, model: str, p: Problem,
               max_tokens: int, timeout_s: float) -> Answer:
    body = {"model": model, "prompt": p.prompt, "max_tokens": max_tokens, "temperature": 0.0}
    try:
        async with session.post(url + "/v1/completions", json=body,
                                timeout=aiohttp.ClientTimeout(total=timeout_s)) as r:
            doc = await r.json(content_type=None)
            if r.status != 200:
                raise ValueError(f"HTTP {r.status}: {json.dumps(doc)[:200]}")
        text = doc["choices"][0]["text"]
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError, IndexError,
            TypeError) as exc:
        return Answer(p.task.value, p.prompt, p.answer, None, False, f"{type(exc).__name__}: {exc}")
    return Answer(p.task.value, p.prompt, p.answer, text, text == p.answer)


def score(problems: list[Problem], answers: list[Answer]) -> tuple[float, dict[str, float]]:
    """Overall and per-task (in task order) exact-match accuracy."""
    per_task: dict[str, float] = {}
    for task in Task:
        mine = [a for a in answers if a.task == task.value]
        if mine:
            per_task[task.value] = sum(a.correct for a in mine) / len(mine)
    return sum(a.correct for a in answers) / max(1, len(problems)), per_task


async def measure(url: str, *, num: int = 500, concurrency: int = 16, seed: int = 0,
                  tasks: tuple[Task, ...] = tuple(Task), model: str | None = None,
                  max_tokens: int = 16, request_timeout_s: float = 300.0) -> AccuracyReport:
    """Send `num` held-out problems to `url` and score the answers."""
    if num < 1 or concurrency < 1:
        raise ValueError("num and concurrency must be >= 1")
    model = model or await fetch_model_name(url)
    problems = held_out(num, seed=seed, tasks=tasks)
    gate = asyncio.Semaphore(concurrency)
    t0 = time.monotonic()
    async with aiohttp.ClientSession() as session:

        async def one(p: Problem) -> Answer:
            async with gate:
                return await _ask(session, url, model, p, max_tokens, request_timeout_s)

        answers = list(await asyncio.gather(*(one(p) for p in problems)))
    overall, per_task = score(problems, answers)
    return AccuracyReport(model, num, concurrency, seed, round(time.monotonic() - t0, 2),
                          overall, per_task, sum(a.output is None for a in answers), answers)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL")
    parser.add_argument("--num", type=int, default=500, help="held-out problems to send")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0, help="which held-out problems")
    parser.add_argument("--tasks", default=",".join(t.value for t in Task),
                        help="comma-separated subset of " + ",".join(t.value for t in Task))
    parser.add_argument("--model", default=None, help="model name (default: first of /v1/models)")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--request-timeout", type=float, default=300.0, help="seconds")
    parser.add_argument("--json", default=None, metavar="OUT", help="write the report as JSON")


def main(args: argparse.Namespace) -> int:
    try:
        tasks = parse_tasks(args.tasks)
        if args.num < 1 or args.concurrency < 1 or args.max_tokens < 1:
            raise ValueError("--num, --concurrency and --max-tokens must be >= 1")
    except ValueError as exc:
        print(f"hybridpd bench accuracy: {exc}", file=sys.stderr)
        return 2
    try:
        report = asyncio.run(measure(
            args.url, num=args.num, concurrency=args.concurrency, seed=args.seed, tasks=tasks,
            model=args.model, max_tokens=args.max_tokens,
            request_timeout_s=args.request_timeout))
    except (OSError, ValueError, aiohttp.ClientError) as exc:
        print(f"hybridpd bench accuracy: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 1
    print(report.line(), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_json(), indent=2) + "\n")
        print(f"wrote {args.json}")
    return 1 if report.failed else 0
