"""`hybridpd demo`: the README's main job — a local P/D deployment shown working.

Owns starting `up`'s deployment (embedded demo model, 1 prefill + 1 decode, CPU by default),
sending a few requests through the proxy (completion, streaming completion, chat), printing the
answers with each request's KV transfer stats, and shutting everything down.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from hybridpd.launch.procs import free_port
from hybridpd.launch.up import Deployment, DeploymentSpec

PROMPTS = [
    "The hybrid model reads the prompt once on the prefill instance",
    "Mamba state is constant in length, attention KV grows with every token: " * 6,
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF model dir (default: the embedded demo)")
    p.add_argument("--handoff", choices=["first-token", "n-1"], default="first-token")
    p.add_argument("--prefill-tp", type=int, default=1)
    p.add_argument("--decode-tp", type=int, default=1)
    p.add_argument("--max-tokens", type=int, default=24)


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


def main(args: argparse.Namespace) -> int:
    spec = DeploymentSpec(model=args.model, port=free_port(), handoff=args.handoff,
                          prefill_tp=args.prefill_tp, decode_tp=args.decode_tp)
    print("hybridpd demo: starting 1 prefill + 1 decode instance and the proxy ...", flush=True)
    with Deployment(spec) as dep:
        model = json.loads(urllib.request.urlopen(dep.url + "/v1/models", timeout=30).read()
                           )["data"][0]["id"]
        print(f"up: {dep.url}/v1 serving {model!r} (random weights: the text is noise, the "
              f"tokens are exact)\n", flush=True)
        for i, prompt in enumerate(PROMPTS):
            body = {"model": model, "prompt": prompt, "max_tokens": args.max_tokens,
                    "temperature": 0}
            out = _post(dep.url + "/v1/completions", body)
            print(f"[completion {i}] {prompt[:60]!r}...\n  -> {out['choices'][0]['text']!r}")
            print(f"  KV transfer: {_fmt_stats(out.get('kv_transfer_stats'))}", flush=True)
        text, ttft, stats = _stream(dep.url + "/v1/completions", {
            "model": model, "prompt": PROMPTS[0], "max_tokens": args.max_tokens,
            "temperature": 0})
        print(f"[streamed]  first token after {ttft * 1e3:.0f} ms -> {text!r}")
        print(f"  KV transfer: {_fmt_stats(stats)}", flush=True)
        chat = _post(dep.url + "/v1/chat/completions", {
            "model": model, "messages": [{"role": "user", "content": "Say hello."}],
            "max_tokens": args.max_tokens, "temperature": 0})
        print(f"[chat]      -> {chat['choices'][0]['message']['content']!r}")
        print(f"  KV transfer: {_fmt_stats(chat.get('kv_transfer_stats'))}", flush=True)
        pools = {c.name: json.loads(urllib.request.urlopen(c.url + "/v1/pool", timeout=10).read())
                 for c in dep.prefill + dep.decode}
        for name, pool in pools.items():
            print(f"  pool {name}: {pool['free_blocks']}/{pool['total_blocks']} blocks free")
        print(f"logs: {Path(dep.log_dir)}")
    print("demo finished; all instances stopped.")
    return 0


if __name__ == "__main__":
    sys.exit(main(argparse.Namespace(model=None, handoff="first-token", prefill_tp=1,
                                     decode_tp=1, max_tokens=24)))
