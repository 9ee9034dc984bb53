"""`hybridpd bench`: argument parsing and the sweep over concurrency levels or request rates;
`hybridpd bench engine` (in-process engine benchmark, `engine_bench`) and `hybridpd bench
accuracy` (`accuracy`) are dispatched to the modules that own them (`BENCH_SUBCOMMANDS`).

Owns the command line only; prompts are `datasets`, measuring is `loadgen` / `engine_bench`,
statistics are `metrics`, output is `report` (`--from-json A.json B.json --plot P.png` plots
earlier result files, one curve each, without sending load). Must not know the server's
internals.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import sys
from dataclasses import asdict

import aiohttp

from hybridpd.bench import datasets
from hybridpd.bench.loadgen import Endpoint, LoadSpec, fetch_model_name, run_load
from hybridpd.bench.metrics import RequestResult, Slo, Summary, summarize
from hybridpd.bench.report import format_summary, load_curves, plot_pareto, write_json

# `hybridpd bench NAME ...`: other measurements, each a module with add_arguments / main
BENCH_SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "engine": ("hybridpd.bench.engine_bench",
               "time the engine's decode/prefill steps in-process vs the device's ceilings"),
    "accuracy": ("hybridpd.bench.accuracy", "exact-match accuracy of held-out demo tasks"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    name = sys.argv[2] if len(sys.argv) > 2 and sys.argv[1] == "bench" else None
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
    parser.add_argument("--num-gpus", type=int, default=1,
                        help="GPUs of the deployment: output tok/s per GPU divides by it")
    parser.add_argument("--json", default=None, metavar="OUT", help="write results as JSON")
    parser.add_argument("--plot", default=None, metavar="PNG",
                        help="Pareto plot: output tok/s per GPU vs per user (matplotlib)")
    parser.add_argument("--label", default=None, help="this run's curve name in plots")
    parser.add_argument("--from-json", nargs="+", default=None, metavar="RESULT",
                        help="plot these result files (one curve each) instead of running")
    parser.add_argument("--request-rate", type=float, nargs="+", default=None, metavar="RPS",
                        help="Poisson arrivals at these rates (a sweep; --concurrency caps "
                             "the requests in flight)")
    parser.add_argument("--warmup", type=int, default=0,
                        help="requests sent before each level, excluded from the figures")
    parser.add_argument("--dataset", choices=["random", "sharegpt", "jsonl"], default="random")
    parser.add_argument("--dataset-path", default=None, metavar="FILE",
                        help="ShareGPT JSON or jsonl of prompts ({prompt, max_tokens} or text)")
    parser.add_argument("--input-len-range", type=int, nargs=2, default=None,
                        metavar=("MIN", "MAX"), help="random prompts: lengths in [MIN, MAX]")
    parser.add_argument("--output-len-range", type=int, nargs=2, default=None,
                        metavar=("MIN", "MAX"), help="random prompts: max_tokens in [MIN, MAX]")
    parser.add_argument("--tokenizer", default=None, metavar="DIR",
                        help="ShareGPT: output lengths from the replies' token counts")


def _validate(args: argparse.Namespace) -> str | None:
    if args.num_requests < 1 or args.prompt_len < 1 or args.output_len < 1:
        return "--num-requests, --prompt-len and --output-len must be >= 1"
    if any(c < 1 for c in args.concurrency):
        return "--concurrency values must be >= 1"
    low, high = args.token_id_range
    if not 0 <= low < high:
        return "--token-id-range needs 0 <= LOW < HIGH"
    for name in ("input_len_range", "output_len_range"):
        r = getattr(args, name)
        if r is not None and not 1 <= r[0] <= r[1]:
            return f"--{name.replace('_', '-')} needs 1 <= MIN <= MAX"
    if args.dataset != "random" and not args.dataset_path:
        return f"--dataset {args.dataset} needs --dataset-path"
    if args.request_rate and any(not r > 0 for r in args.request_rate):
        return "--request-rate values must be > 0"
    if args.warmup < 0 or args.num_gpus < 1:
        return "--warmup must be >= 0 and --num-gpus >= 1"
    return None


def _dataset(args: argparse.Namespace) -> tuple[datasets.BenchPrompt, ...] | None:
    if args.dataset == "sharegpt":
        count = None
        if args.tokenizer:
            from hybridpd.tokenizer import Tokenizer

            tok = Tokenizer.from_dir(args.tokenizer)
            count = lambda text: len(tok.encode(text))  # noqa: E731
        return tuple(datasets.sharegpt_prompts(args.dataset_path, args.num_requests, args.seed,
                                               args.output_len, count))
    if args.dataset == "jsonl":
        return tuple(datasets.jsonl_prompts(args.dataset_path, args.num_requests,
                                            args.output_len))
    if args.input_len_range is None and args.output_len_range is None:
        return None  # fixed lengths: --prompt-len / --output-len
    in_r = tuple(args.input_len_range or (args.prompt_len, args.prompt_len))
    out_r = tuple(args.output_len_range or (args.output_len, args.output_len))
    return tuple(datasets.random_prompts(
        args.num_requests, in_r, out_r, args.seed, tuple(args.token_id_range),
        as_text=args.endpoint == Endpoint.CHAT.value))


async def _sweep(args: argparse.Namespace) -> tuple[LoadSpec, list[tuple[Summary, list]]]:
    model = args.model or await fetch_model_name(args.url)
    spec = LoadSpec(
        url=args.url, endpoint=Endpoint(args.endpoint), model=model,
        num_requests=args.num_requests, prompt_len=args.prompt_len,
        output_len=args.output_len, seed=args.seed,
        token_id_range=(args.token_id_range[0], args.token_id_range[1]),
        request_timeout_s=args.request_timeout, dataset=_dataset(args), warmup=args.warmup,
    )
    slo = Slo(args.slo_ttft_ms, args.slo_tpot_ms)
    runs: list[tuple[Summary, list[RequestResult]]] = []
    levels = [(max(args.concurrency), r) for r in args.request_rate] if args.request_rate \
        else [(c, None) for c in args.concurrency]
    for level, rate in levels:
        results, duration = await run_load(spec, level, rate)
        summary = summarize(results, duration, level, slo, args.num_gpus, rate)
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
    if args.from_json:
        return _plot_files(args)
    try:
        spec, runs = asyncio.run(_sweep(args))
    except datasets.DatasetError as exc:
        print(f"hybridpd bench: {exc}")
        return 2
    except (OSError, ValueError, aiohttp.ClientError) as exc:
        print(f"hybridpd bench: cannot reach {args.url}: {exc}")
        return 1
    if args.json:
        config = {**asdict(spec), "endpoint": spec.endpoint.value, "dataset": args.dataset,
                  "dataset_path": args.dataset_path, "num_gpus": args.num_gpus,
                  "label": args.label, "request_rate": args.request_rate,
                  "slo_ttft_ms": args.slo_ttft_ms, "slo_tpot_ms": args.slo_tpot_ms}
        write_json(args.json, config, runs)
        print(f"wrote {args.json}")
    if args.plot:
        label = args.label or "this run"
        points = [(s.output_tps_per_user, s.output_throughput_per_gpu,
                   f"c={s.concurrency}" if s.request_rate is None else f"{s.request_rate:g}/s")
                  for s, _ in runs if s.output_tps_per_user is not None]
        plot_pareto(args.plot, [(label, points)])
    return 0 if all(s.completed for s, _ in runs) else 1


def _plot_files(args: argparse.Namespace) -> int:
    if not args.plot:
        print("hybridpd bench: --from-json needs --plot PNG")
        return 2
    try:
        curves = load_curves(args.from_json)
    except ValueError as exc:
        print(f"hybridpd bench: {exc}")
        return 2
    if plot_pareto(args.plot, curves):
        print(f"wrote {args.plot} ({len(curves)} curves)")
    return 0
