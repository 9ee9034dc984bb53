"""`hybridpd demo`: the README's main job — a local P/D deployment shown working.

Owns starting `up`'s deployment (the trained demo model, 1 prefill + 1 decode, CPU by default),
asking it held-out questions of the demo tasks through the proxy (`417+285=`, `reverse:KQZT=`,
...; plain and streamed completions), printing each answer with a check mark against the true
answer and the request's KV transfer stats, and shutting everything down.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from hybridpd.launch.gpus import PlacementError
from hybridpd.launch.up import Deployment, DeploymentSpec

DEMO_SEED = 1  # which held-out problems the demo asks (never trained on)
NUM_QUESTIONS = 8
ACCURACY_NUM = 500  # then the accuracy harness on this many held-out problems, same proxy


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF model dir (default: the embedded demo)")
    p.add_argument("--handoff", choices=["first-token", "n-1"], default="first-token")
    p.add_argument("--prefill-tp", type=int, default=1)
    p.add_argument("--decode-tp", type=int, default=1)
    p.add_argument("--max-tokens", type=int, default=16)


def _post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    req = urllib.request.Request(url, json.dumps(body).encode(),
                                 {"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read())


def _stream(url: str, body: dict[str, Any]) -> tuple[str, float, dict | None]:
    req = urllib.request.Request(url, json.dumps({**body, "stream": True}).encode(),
                                 {"content-type": "application/json"})
    t0, ttft, text, stats = time.monotonic(), None, [], None
    with urllib.request.urlopen(req, timeout=300) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            stats = chunk.get("kv_transfer_stats") or stats
            for choice in chunk.get("choices", []):
                if choice.get("text"):
                    ttft = ttft if ttft is not None else time.monotonic() - t0
                    text.append(choice["text"])
    return "".join(text), ttft or 0.0, stats


def _fmt_stats(stats: dict | None) -> str:
    if not stats:
        return "no transfer (finished on the prefill instance)"
    return (f"{stats['outcome']}: {stats['bytes']:,} B in {stats['descriptors']} descriptors, "
            f"{stats['seconds'] * 1e3:.2f} ms, {stats['gbps']:.3f} GB/s, "
            f"{stats['num_tokens']} tokens of state")


def _mark(output: str, answer: str) -> str:
    return "\u2713" if output == answer else f"\u2717 (true answer {answer!r})"


def main(args: argparse.Namespace) -> int:
    from hybridpd.bench.accuracy import measure
    from hybridpd.demo.tasks import held_out

    spec = DeploymentSpec(model=args.model, port=0, handoff=args.handoff,  # proxy binds port 0
                          prefill_tp=args.prefill_tp, decode_tp=args.decode_tp)
    questions = held_out(NUM_QUESTIONS, seed=DEMO_SEED)
    print("hybridpd demo: starting 1 prefill + 1 decode instance and the proxy ...", flush=True)
    try:
        dep = Deployment(spec).start()
    except (PlacementError, RuntimeError, TimeoutError) as e:
        print(f"hybridpd demo: {e}", file=sys.stderr)
        return 1
    try:
        model = json.loads(urllib.request.urlopen(dep.url + "/v1/models", timeout=30).read()
                           )["data"][0]["id"]
        print(f"up: {dep.url}/v1 serving {model!r}; asking it questions it was never trained "
              f"on (greedy, through the proxy: prefill on P, decode on D)\n", flush=True)
        right = 0
        for q in questions[:-1]:
            body = {"model": model, "prompt": q.prompt, "max_tokens": args.max_tokens,
                    "temperature": 0}
            out = _post(dep.url + "/v1/completions", body)
            text = out["choices"][0]["text"]
            right += text == q.answer
            print(f"[{q.task.value:7}] {q.prompt!r:24} -> {text!r:10} {_mark(text, q.answer)}")
            print(f"          KV transfer: {_fmt_stats(out.get('kv_transfer_stats'))}",
                  flush=True)
        q = questions[-1]
        text, ttft, stats = _stream(dep.url + "/v1/completions", {
            "model": model, "prompt": q.prompt, "max_tokens": args.max_tokens,
            "temperature": 0})
        right += text == q.answer
        print(f"[streamed] {q.prompt!r:24} -> {text!r:10} {_mark(text, q.answer)}  "
              f"(first token after {ttft * 1e3:.0f} ms)")
        print(f"          KV transfer: {_fmt_stats(stats)}", flush=True)
        print(f"\n{right}/{len(questions)} answers correct; the accuracy harness on "
              f"{ACCURACY_NUM} held-out problems through the proxy:", flush=True)
        report = asyncio.run(measure(dep.url, num=ACCURACY_NUM, concurrency=16, model=model))
        print(f"  {report.line()}")
        pools = {c.name: json.loads(urllib.request.urlopen(c.url + "/v1/pool", timeout=10).read())
                 for c in dep.prefill + dep.decode}
        for name, pool in pools.items():
            print(f"  pool {name}: {pool['free_blocks']}/{pool['total_blocks']} blocks free")
        print(f"logs: {Path(dep.log_dir)}")
    finally:
        dep.stop()
    print("demo finished; all instances stopped.")
    return 0


if __name__ == "__main__":
    sys.exit(main(argparse.Namespace(model=None, handoff="first-token", prefill_tp=1,
                                     decode_tp=1, max_tokens=16)))
