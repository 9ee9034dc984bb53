"""`hybridpd bench` against a fake OpenAI server that streams with known delays."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
from collections.abc import Iterator

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
from aiohttp import web  # noqa: E402

from hybridpd.bench import cli  # noqa: E402
from hybridpd.bench.loadgen import Endpoint, LoadSpec, run_load  # noqa: E402
from hybridpd.bench.metrics import RequestResult, Slo, summarize  # noqa: E402
from hybridpd.cli import build_parser  # noqa: E402

TTFT_S = 0.05
ITL_S = 0.01


class FakeServer:
    """Streams `max_tokens` one-token chunks: TTFT_S before the first, ITL_S between the rest."""

    def __init__(self, usage: bool = True) -> None:
        self.usage = usage
        self.bodies: list[dict] = []
        self.in_flight = 0
        self.max_in_flight = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/completions", self.stream)
        app.router.add_post("/v1/chat/completions", self.stream)
        app.router.add_get("/v1/models", self.models)
        return app

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "fake-model"}]})

    async def stream(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            chat = "messages" in body
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            n = body["max_tokens"]
            for i in range(n):
                await asyncio.sleep(TTFT_S if i == 0 else ITL_S)
                choice = {"delta": {"content": f"t{i}"}} if chat else {"text": f"t{i}"}
                await resp.write(f"data: {json.dumps({'choices': [choice]})}\n\n".encode())
            if self.usage:  # a usage-only chunk, as OpenAI sends with include_usage
                usage = {"prompt_tokens": 0, "completion_tokens": n, "total_tokens": n}
                await resp.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
                                 .encode())
            await resp.write(b"data: [DONE]\n\n")
            return resp
        finally:
            self.in_flight -= 1


async def _serve(fake: FakeServer, spec_kw: dict, concurrency: int):
    runner = web.AppRunner(fake.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        spec = LoadSpec(url=f"http://127.0.0.1:{port}", model="fake-model", **spec_kw)
        return await run_load(spec, concurrency)
    finally:
        await runner.cleanup()


def _run(fake: FakeServer, concurrency: int, **kw) -> tuple[list[RequestResult], float]:
    spec_kw = dict(endpoint=Endpoint.COMPLETIONS, num_requests=6, prompt_len=12, output_len=5,
                   seed=3)
    spec_kw.update(kw)
    return asyncio.run(_serve(fake, spec_kw, concurrency))


@pytest.mark.parametrize("usage", [True, False])
def test_measures_injected_delays(usage: bool) -> None:
    fake = FakeServer(usage=usage)
    results, duration = _run(fake, concurrency=2)
    assert len(results) == 6 and all(r.ok for r in results)
    for r in results:
        assert r.output_tokens == 5
        # the server sleeps before each chunk, so no chunk arrives early; a late one may
        # shorten the gap to the next (client-side buffering), so only sums are bounded below
        assert r.ttft_s >= TTFT_S
        assert len(r.itls_s) == 4 and min(r.itls_s) >= 0
        assert r.ttft_s + sum(r.itls_s) >= TTFT_S + 4 * ITL_S
        assert r.e2e_s >= r.ttft_s + sum(r.itls_s) - 1e-9
        assert r.tpot_s == pytest.approx((r.e2e_s - r.ttft_s) / 4)
    assert fake.max_in_flight == 2
    # 6 requests, 2 at a time, each >= TTFT + 4 ITL: at least 3 rounds
    assert duration >= 3 * (TTFT_S + 4 * ITL_S)

    s = summarize(results, duration, 2)
    assert s.completed == 6 and s.failed == 0 and s.total_output_tokens == 30
    assert s.itl.count == 24 and s.tpot.count == 6
    assert s.ttft.percentiles_ms[50] >= TTFT_S * 1e3
    assert s.ttft.percentiles_ms[50] <= s.ttft.percentiles_ms[90] <= s.ttft.percentiles_ms[99]
    assert s.output_throughput == pytest.approx(30 / duration)
    assert s.output_tps_per_user == pytest.approx(1e3 / s.tpot.mean_ms)
    assert s.goodput is None


def test_request_bodies() -> None:
    fake = FakeServer()
    _run(fake, concurrency=6)
    assert fake.max_in_flight == 6
    assert len(fake.bodies) == 6
    prompts = [b["prompt"] for b in fake.bodies]
    for b in fake.bodies:
        assert b["stream"] is True and b["ignore_eos"] is True and b["temperature"] == 0
        assert b["max_tokens"] == 5 and b["model"] == "fake-model"
        assert len(b["prompt"]) == 12 and all(10 <= t < 250 for t in b["prompt"])
    assert len({tuple(p) for p in prompts}) == 6  # random, not repeated

    again = FakeServer()
    _run(again, concurrency=6)  # same seed: same prompts
    assert sorted(map(tuple, prompts)) == sorted(tuple(b["prompt"]) for b in again.bodies)


def test_chat_endpoint() -> None:
    fake = FakeServer(usage=False)
    results, _ = _run(fake, concurrency=3, endpoint=Endpoint.CHAT, num_requests=3)
    assert all(r.ok and r.output_tokens == 5 for r in results)
    msgs = fake.bodies[0]["messages"]
    assert msgs[0]["role"] == "user" and len(msgs[0]["content"].split()) == 12


def test_goodput_follows_slo() -> None:
    results, duration = _run(FakeServer(), concurrency=3)
    strict = summarize(results, duration, 3, Slo(ttft_ms=TTFT_S * 1e3 * 0.5))
    assert strict.goodput == 0 and strict.slo_attainment == 0
    loose = summarize(results, duration, 3, Slo(ttft_ms=10_000, tpot_ms=10_000))
    assert loose.slo_attainment == 1 and loose.goodput == pytest.approx(6 / duration)
    tight_tpot = summarize(results, duration, 3, Slo(tpot_ms=ITL_S * 1e3 * 0.5))
    assert tight_tpot.goodput == 0


def test_connection_refused_is_a_failed_result() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once we leave: nobody listens
    spec = LoadSpec(url=f"http://127.0.0.1:{port}", endpoint=Endpoint.COMPLETIONS, model="m",
                    num_requests=2, prompt_len=3, output_len=2, request_timeout_s=5)
    results, _ = asyncio.run(run_load(spec, 2))
    assert [r.ok for r in results] == [False, False] and all(r.error for r in results)


@pytest.fixture()
def server_url() -> Iterator[str]:
    """The fake server on its own thread and event loop, for the synchronous CLI."""
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(FakeServer().app())
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    port = site._server.sockets[0].getsockname()[1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{port}"
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=10)


def test_cli_sweep_writes_json(server_url: str, tmp_path, capsys) -> None:
    out = tmp_path / "bench.json"
    plot = tmp_path / "sweep.png"
    argv = ["bench", "--url", server_url, "--num-requests", "4", "--concurrency", "1", "4",
            "--prompt-len", "8", "--output-len", "3", "--slo-ttft-ms", "5000",
            "--json", str(out), "--plot", str(plot)]
    import sys

    old = sys.argv
    sys.argv = ["hybridpd", *argv]
    try:
        args = build_parser().parse_args()
    finally:
        sys.argv = old
    assert cli.main(args) == 0
    doc = json.loads(out.read_text())
    assert doc["config"]["model"] == "fake-model"  # from /v1/models
    assert [r["summary"]["concurrency"] for r in doc["runs"]] == [1, 4]
    for run in doc["runs"]:
        assert run["summary"]["completed"] == 4 and run["summary"]["total_output_tokens"] == 12
        assert run["summary"]["slo_attainment"] == 1
        assert all(r["ttft_s"] >= TTFT_S for r in run["requests"])
    printed = capsys.readouterr().out
    assert "concurrency 4" in printed and "TTFT" in printed
    assert plot.exists() or "matplotlib is not installed" in printed


def test_cli_rejects_bad_arguments(capsys) -> None:
    import argparse

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["--concurrency", "0"])
    assert cli.main(args) == 2
    assert "concurrency" in capsys.readouterr().out
