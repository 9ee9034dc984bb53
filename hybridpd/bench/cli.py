"""`hybridpd bench`: argument parsing and the sweep over concurrency levels.

Owns the command line only; measuring is `loadgen`, statistics are `metrics`, output is
`report`. Must not know the server's internals.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import sys
from dataclasses import asdict

import aiohttp

from hybridpd.bench.loadgen import Endpoint, LoadSpec, fetch_model_name, run_load
from hybridpd.bench.metrics import RequestResult, Slo, Summary, summarize
from hybridpd.bench.report import format_summary, plot_sweep, write_json

# `hybridpd bench NAME ...`: other measurements, each a module with add_arguments / main
BENCH_SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "accuracy": ("hybridpd.bench.accuracy", "exact-match accuracy of held-out demo tasks"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    name = sys.argv[2] if len(sys.argv) > 2 else None
    if name in BENCH_SUBCOMMANDS:  # `hybridpd bench accuracy ...`: that module owns the rest
        module, help_text = BENCH_SUBCOMMANDS[name]
        sub = parser.add_subparsers(dest="bench_command")
        p = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_arguments(p)
        p.set_defaults(_module=module)
        return
    parser.epilog = "also: " + ", ".join(f"`hybridpd bench {n}` ({h})"
                                          for n, (_, h) in BENCH_SUBCOMMANDS.items())
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL")
    parser.add_argument("--endpoint", choices=[e.value for e in Endpoint], default="completions")
    parser.add_argument("--model", default=None, help="model name (default: first of /v1/models)")
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1],
                        help="one level, or several for a sweep")
    parser.add_argument("--prompt-len", type=int, default=128,
                        help="prompt tokens (completions) or words (chat)")
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--token-id-range", type=int, nargs=2, default=[10, 250],
                        metavar=("LOW", "HIGH"), help="random prompt token ids in [LOW, HIGH)")
    parser.add_argument("--request-timeout", type=float, default=600.0, help="seconds")
    parser.add_argument("--slo-ttft-ms", type=float, default=None)
    parser.add_argument("--slo-tpot-ms", type=float, default=None)
    parser.add_argument("--num-gpus", type=int, default=1, help="divides tok/s in the plot")
    parser.add_argument("--json", default=None, metavar="OUT", help="write results as JSON")
    parser.add_argument("--plot", default=None, metavar="PNG", help="plot the sweep (matplotlib)")


def _validate(args: argparse.Namespace) -> str | None:
    if args.num_requests < 1 or args.prompt_len < 1 or args.output_len < 1:
        return "--num-requests, --prompt-len and --output-len must be >= 1"
    if any(c < 1 for c in args.concurrency):
        return "--concurrency values must be >= 1"
    low, high = args.token_id_range
    if not 0 <= low < high:
        return "--token-id-range needs 0 <= LOW < HIGH"
    return None


async def _sweep(args: argparse.Namespace) -> tuple[LoadSpec, list[tuple[Summary, list]]]:
    model = args.model or await fetch_model_name(args.url)
    spec = LoadSpec(
        url=args.url, endpoint=Endpoint(args.endpoint), model=model,
        num_requests=args.num_requests, prompt_len=args.prompt_len,
        output_len=args.output_len, seed=args.seed,
        token_id_range=(args.token_id_range[0], args.token_id_range[1]),
        request_timeout_s=args.request_timeout,
    )
    slo = Slo(args.slo_ttft_ms, args.slo_tpot_ms)
    runs: list[tuple[Summary, list[RequestResult]]] = []
    for level in args.concurrency:
        results, duration = await run_load(spec, level)
        summary = summarize(results, duration, level, slo)
        print(format_summary(summary), flush=True)
        failed = [r.error for r in results if not r.ok]
        if failed:
            print(f"  first error: {failed[0]}")
        runs.append((summary, results))
    return spec, runs


def main(args: argparse.Namespace) -> int:
    problem = _validate(args)
    if problem:
        print(f"hybridpd bench: {problem}")
        return 2
    try:
        spec, runs = asyncio.run(_sweep(args))
    except (OSError, ValueError, aiohttp.ClientError) as exc:
        print(f"hybridpd bench: cannot reach {args.url}: {exc}")
        return 1
    if args.json:
        config = {**asdict(spec), "endpoint": spec.endpoint.value,
                  "slo_ttft_ms": args.slo_ttft_ms, "slo_tpot_ms": args.slo_tpot_ms}
        write_json(args.json, config, runs)
        print(f"wrote {args.json}")
    if args.plot:
        plot_sweep(args.plot, [s for s, _ in runs], args.num_gpus)
    return 0 if all(s.completed for s, _ in runs) else 1
