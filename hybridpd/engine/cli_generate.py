"""`hybridpd generate`: offline generation from the command line.

Owns the generate subcommand's arguments and output format. Knows nothing of HTTP.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from hybridpd.request import SamplingParams


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    """Engine options shared by `generate` and `serve`-like commands."""
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--dtype", default=None, help="float32, float16, bfloat16 (default: auto)")
    p.add_argument("--ssm-state-dtype", default=None, help="default: float32")
    p.add_argument("--cache-memory", type=int, default=None, help="page pool bytes")
    p.add_argument("--kernel-block-size", type=int, default=16)
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs for decode steps")
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size")


def engine_kwargs(args: argparse.Namespace) -> dict:
    return {
        "device": args.device,
        "dtype": args.dtype,
        "ssm_state_dtype": args.ssm_state_dtype,
        "cache_memory": args.cache_memory,
        "kernel_block_size": args.kernel_block_size,
        "enforce_eager": args.enforce_eager,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "max_num_seqs": args.max_num_seqs,
        "max_model_len": args.max_model_len,
        "tp_size": args.tp,
    }


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF model dir (default: the embedded demo)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="text prompt (tokenized like transformers.AutoTokenizer)")
    src.add_argument("--prompt-ids", help="comma-separated token ids, fed as given (no BOS)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--logprobs", type=int, default=None)
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_engine_arguments(p)


def _parse_ids(text: str) -> list[int]:
    try:
        ids = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError as e:
        raise SystemExit(f"--prompt-ids must be comma-separated integers: {e}") from None
    if not ids:
        raise SystemExit("--prompt-ids is empty")
    return ids


def main(args: argparse.Namespace) -> int:
    from hybridpd.engine.llm import LLM

    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=tuple(args.stop),
        logprobs=args.logprobs,
        ignore_eos=args.ignore_eos,
    )
    llm = LLM(args.model, **engine_kwargs(args))
    try:
        prompt = args.prompt if args.prompt is not None else _parse_ids(args.prompt_ids)
        try:
            out = llm.generate([prompt], params)[0]
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    finally:
        llm.close()
    if args.json:
        doc: dict[str, Any] = {
            "prompt_token_ids": out.prompt_token_ids,
            "token_ids": out.token_ids,
            "text": out.text,
            "finish_reason": out.finish_reason,
        }
        if out.logprobs is not None:
            doc["logprobs"] = [lp.logprob for lp in out.logprobs]
        print(json.dumps(doc))
    else:
        print(out.text)
    return 0
