"""`hybridpd bench accuracy` against a fake OpenAI server that knows some answers."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
from aiohttp import web  # noqa: E402

from hybridpd.bench.accuracy import measure  # noqa: E402
from hybridpd.demo.tasks import Task, draw, held_out  # noqa: E402


class Oracle:
    """Answers additions and copies right, reversals wrong, counts with HTTP 500."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []
        self.in_flight = self.max_in_flight = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/completions", self.complete)
        app.router.add_get("/v1/models", self.models)
        return app

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "oracle"}]})

    async def complete(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.bodies.append(body)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(0.01)
            prompt = body["prompt"]
            if prompt.startswith("count "):
                return web.json_response({"error": {"message": "boom"}}, status=500)
            if "+" in prompt:
                a, b = prompt[:-1].split("+")
                text = str(int(a) + int(b))
            elif prompt.startswith("copy:"):
                text = prompt[5:-1]
            else:
                text = prompt[8:-1]  # reverse: not reversed
            return web.json_response({"choices": [{"index": 0, "text": text}]})
        finally:
            self.in_flight -= 1


async def _run(oracle: Oracle, **kw):
    runner = web.AppRunner(oracle.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        return await measure(f"http://127.0.0.1:{port}", **kw)
    finally:
        await runner.cleanup()


def test_scores_each_task_and_counts_failures() -> None:
    oracle = Oracle()
    report = asyncio.run(_run(oracle, num=40, concurrency=4, seed=2))
    problems = held_out(40, seed=2)
    assert [a.prompt for a in report.answers] == [p.prompt for p in problems]
    palindromes = sum(p.task is Task.REVERSE and p.answer == p.answer[::-1] for p in problems)
    assert report.per_task["add"] == 1.0 and report.per_task["copy"] == 1.0
    assert report.per_task["reverse"] == palindromes / 10
    assert report.per_task["count"] == 0.0 and report.failed == 10
    assert report.overall == (20 + palindromes) / 40
    assert all(a.error and "HTTP 500" in a.error for a in report.answers if a.task == "count")
    assert oracle.max_in_flight <= 4 and len(oracle.bodies) == 40
    body = oracle.bodies[0]
    assert body["model"] == "oracle" and body["temperature"] == 0.0 and "stream" not in body
    line = report.line()
    assert line.startswith(f"accuracy {report.overall:.3f} ({20 + palindromes}/40)")
    assert "10 failed" in line


def test_held_out_prompts_never_come_from_the_training_stream() -> None:
    import random

    rng = random.Random(0)
    drawn = {draw(t, rng).prompt for _ in range(3000) for t in Task}
    held = {p.prompt for p in held_out(500)}
    from hybridpd.demo.tasks import Split, split_of

    assert all(split_of(p) is Split.HELD_OUT for p in held)
    assert {p for p in drawn if split_of(p) is Split.TRAIN}.isdisjoint(held)


def test_cli_writes_json_and_one_line(tmp_path: Path) -> None:
    oracle = Oracle()
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(oracle.app())
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    port = site._server.sockets[0].getsockname()[1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    out = tmp_path / "acc.json"
    try:
        cli = subprocess.run(
            [sys.executable, "-m", "hybridpd.cli", "bench", "accuracy", "--url",
             f"http://127.0.0.1:{port}", "--num", "8", "--tasks", "add,copy", "--json",
             str(out)], capture_output=True, text=True, timeout=120)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout.splitlines()[0].startswith("accuracy 1.000 (8/8) | add 1.000 copy 1.000")
    doc = json.loads(out.read_text())
    assert doc["overall"] == 1.0 and doc["num"] == 8 and len(doc["answers"]) == 8


@pytest.mark.parametrize("argv", [["--num", "0"], ["--tasks", "mul"]])
def test_bad_arguments_are_one_line(argv: list[str]) -> None:
    cli = subprocess.run([sys.executable, "-m", "hybridpd.cli", "bench", "accuracy", *argv],
                         capture_output=True, text=True, timeout=60)
    assert cli.returncode == 2 and len(cli.stderr.strip().splitlines()) == 1
