"""`hybridpd bench` for GPU deployments: token counts from the server (a model whose tokens have
no text is measured exactly), datasets, Poisson rates, warm-up exclusion, per-GPU throughput,
the proxy's P/D phases as percentiles, and the Pareto plot over several result files."""

from __future__ import annotations

import asyncio
import json
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
from aiohttp import web  # noqa: E402

from hybridpd.bench import cli, datasets  # noqa: E402
from hybridpd.bench.loadgen import Endpoint, LoadSpec, run_load  # noqa: E402
from hybridpd.bench.metrics import summarize  # noqa: E402
from hybridpd.bench.report import load_curves, write_json  # noqa: E402

TIMING = {"prefill_s": 0.25, "handover_s": 0.04, "transfer_s": 0.01}


class TextlessServer:
    """Streams one token per chunk with *no text* (what a random model's tokens often decode
    to), token ids when asked, usage when `usage`, and P/D phases on the final chunk."""

    def __init__(self, usage: bool = True, ids: bool = True) -> None:
        self.usage, self.ids = usage, ids
        self.bodies: list[dict] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/completions", self.stream)
        return app

    async def stream(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        n = body["max_tokens"]
        for i in range(n):
            await asyncio.sleep(0.001)
            choice: dict = {"text": "", "finish_reason": "length" if i == n - 1 else None}
            if self.ids and body.get("return_token_ids"):
                choice["token_ids"] = [100 + i]
            chunk: dict = {"choices": [choice]}
            if i == n - 1:
                chunk["kv_transfer_stats"] = {"seconds": TIMING["transfer_s"], "outcome": "ok"}
                chunk["pd_timing"] = TIMING
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
        if self.usage:
            usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": n}
            await resp.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        return resp


async def _serve(fake, spec_kw: dict, concurrency: int, rate: float | None = None):
    runner = web.AppRunner(fake.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        spec = LoadSpec(url=f"http://127.0.0.1:{port}", model="m", endpoint=Endpoint.COMPLETIONS,
                        **{"num_requests": 5, "prompt_len": 4, "output_len": 6, **spec_kw})
        return await run_load(spec, concurrency, rate)
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("usage,source", [(True, "usage"), (False, "token_ids")])
def test_tokens_without_text_are_counted_exactly(usage, source):
    fake = TextlessServer(usage=usage)
    results, duration = asyncio.run(_serve(fake, {}, 2))
    assert all(r.ok for r in results), [r.error for r in results]
    assert [r.output_tokens for r in results] == [6] * 5
    assert all(r.token_source == source and len(r.itls_s) == 5 for r in results)
    assert all(b["return_token_ids"] is True for b in fake.bodies)
    s = summarize(results, duration, 2, num_gpus=2)
    assert s.completed == 5 and s.failed == 0 and s.total_output_tokens == 30
    assert s.output_throughput_per_gpu == pytest.approx(s.output_throughput / 2)


def test_a_stream_without_any_token_report_fails_clearly():
    results, _ = asyncio.run(_serve(TextlessServer(usage=False, ids=False), {}, 2))
    assert not any(r.ok for r in results)
    assert all("no tokens" in r.error for r in results)


def test_phases_become_percentiles():
    results, duration = asyncio.run(_serve(TextlessServer(), {}, 2))
    assert results[0].phases == {**TIMING, "d_first_token_s": pytest.approx(0.03)}
    phases = summarize(results, duration, 2).phases
    assert set(phases) == {"prefill_s", "handover_s", "transfer_s", "d_first_token_s"}
    assert phases["prefill_s"].count == 5
    assert phases["prefill_s"].percentiles_ms[50] == pytest.approx(250.0)
    assert phases["d_first_token_s"].percentiles_ms[99] == pytest.approx(30.0)


def test_warmup_is_sent_first_and_excluded():
    fake = TextlessServer()
    results, _ = asyncio.run(_serve(fake, {"warmup": 3}, 2))
    assert len(fake.bodies) == 5 + 3 and len(results) == 5


def test_poisson_rate_sends_every_request():
    fake = TextlessServer()
    results, duration = asyncio.run(_serve(fake, {"num_requests": 6}, 4, rate=200.0))
    assert len(results) == 6 and all(r.ok for r in results) and len(fake.bodies) == 6
    assert summarize(results, duration, 4, request_rate=200.0).request_rate == 200.0
    with pytest.raises(ValueError, match="rate"):
        asyncio.run(_serve(fake, {}, 1, rate=0.0))


def test_dataset_random_ranges_are_reproducible_and_bounded():
    a = datasets.random_prompts(50, (3, 9), (2, 5), seed=4)
    assert a == datasets.random_prompts(50, (3, 9), (2, 5), seed=4)
    assert {len(p.prompt) for p in a} <= set(range(3, 10)) and len({len(p.prompt) for p in a}) > 1
    assert {p.output_len for p in a} <= {2, 3, 4, 5}
    fake = TextlessServer()
    asyncio.run(_serve(fake, {"dataset": tuple(a[:5])}, 2))
    assert sorted(len(b["prompt"]) for b in fake.bodies) == sorted(len(p.prompt) for p in a[:5])
    assert sorted(b["max_tokens"] for b in fake.bodies) == sorted(p.output_len for p in a[:5])


def test_sharegpt_and_jsonl_files(tmp_path):
    share = tmp_path / "share.json"
    share.write_text(json.dumps([
        {"conversations": [{"from": "human", "value": "hello there"},
                           {"from": "gpt", "value": "a b c d"}]},
        {"conversations": [{"from": "human", "value": "only a prompt"}]},
    ]))
    got = datasets.sharegpt_prompts(share, 3, seed=0, default_output_len=7,
                                    count_tokens=lambda t: len(t.split()))
    assert [(p.prompt, p.output_len) for p in got] == [("hello there", 4)] * 3
    lines = tmp_path / "p.jsonl"
    lines.write_text('"plain text"\n{"prompt": [5, 6, 7], "max_tokens": 3}\n\n')
    got = datasets.jsonl_prompts(lines, 3, default_output_len=9)
    assert [(p.prompt, p.output_len) for p in got] == [
        ("plain text", 9), ([5, 6, 7], 3), ("plain text", 9)]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": ""}\n')
    with pytest.raises(datasets.DatasetError, match="bad.jsonl:1"):
        datasets.jsonl_prompts(bad, 1, 4)
    with pytest.raises(datasets.DatasetError, match="does not exist"):
        datasets.sharegpt_prompts(tmp_path / "none.json", 1, 0, 4)


def _result_file(path, label: str, gpus: int, tps: float) -> None:
    from hybridpd.bench.metrics import RequestResult

    runs = []
    for c in (1, 4):
        rs = [RequestResult(True, 4, 5, ttft_s=0.1, e2e_s=0.1 + 4 * 0.01 * c)] * c
        runs.append((summarize(rs, c * tps, c, num_gpus=gpus), rs))
    write_json(path, {"label": label, "num_gpus": gpus}, runs)


def test_pareto_plot_has_one_curve_per_result_file(tmp_path, capsys):
    a, b = tmp_path / "pd.json", tmp_path / "colo.json"
    _result_file(a, "1P1D", 2, 1.0)
    _result_file(b, "", 1, 1.0)
    curves = load_curves([a, b])
    assert [c[0] for c in curves] == ["1P1D", "colo"]
    (_, pd_pts), (_, colo_pts) = curves
    assert [p[1] for p in pd_pts] == pytest.approx([p[1] / 2 for p in colo_pts])  # per GPU
    out = tmp_path / "pareto.png"
    parser = __import__("argparse").ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["--from-json", str(a), str(b), "--plot", str(out)])
    assert cli.main(args) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "2 curves" in capsys.readouterr().out
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert cli.main(parser.parse_args(["--from-json", str(bad), "--plot", str(out)])) == 2
