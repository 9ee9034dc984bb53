"""Where one graph-replayed decode step spends its GPU time (issue 7's batch-1 targets).

Builds a preset with random weights on the device (`engine_bench.build_model`), captures the
decode graphs as the engine does, replays `--steps` decode steps under torch.profiler (CUPTI
records the kernels inside graph replays) and prints, per step: wall ms, the sum of kernel
durations, the idle gap between them, and the kernels grouped by name (count, µs, share).

    python3 bench/decode_profile.py --preset nemotron-h-8b --batch 1 --context-len 1024
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from hybridpd.bench.engine_bench import (
    StepDriver,
    bench_decode,
    build_model,
    preset_config,
)
from hybridpd.kernels.ops import KernelImpl


def _family(name: str) -> str:
    """Collapse template/launch-config noise so one op is one row."""
    name = re.sub(r"<.*", "", name)
    name = re.sub(r"\(.*", "", name)
    return name[:90]


def profile_decode(driver: StepDriver, batch: int, context_len: int, steps: int) -> dict:
    pos = [context_len]
    toks = [7] * batch

    def one() -> None:
        reqs = [driver.request(i, (toks[i],), pos[0]) for i in range(batch)]
        toks[:] = driver.step(reqs).tolist()
        pos[0] += 1

    for _ in range(3):
        one()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            one()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    by: dict[str, list[float]] = defaultdict(list)
    spans = []
    for e in kernels:
        by[_family(e.name)].append(e.device_time)  # µs
        spans.append((e.time_range.start, e.time_range.end))
    spans.sort()
    busy = sum(e - s for s, e in spans)
    rows = sorted(((sum(v) / steps, len(v) / steps, k) for k, v in by.items()), reverse=True)
    return {"kernel_us_per_step": busy / steps,
            "kernels_per_step": len(kernels) / steps,
            "families": [{"name": k, "us": us, "count": c} for us, c, k in rows]}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="nemotron-h-8b")
    p.add_argument("--batch", type=int, nargs="+", default=[1])
    p.add_argument("--context-len", type=int, default=1024)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    device = torch.device("cuda")
    cfg = preset_config(args.preset, None, "bfloat16")
    model = build_model(cfg, device, 0, None)
    model.use_kernels(KernelImpl.AUTO)
    max_b = max(args.batch)
    max_tokens = args.context_len + 64
    driver = StepDriver(model, cfg, device, max_b, max_tokens, 16)
    driver.runner.capture_decode_graphs(max_b, max_tokens, buckets=tuple(args.batch))
    out = {}
    for b in args.batch:
        ms = bench_decode(driver, b, args.context_len, 20, device)
        prof = profile_decode(driver, b, args.context_len, args.steps)
        prof["wall_ms"] = ms
        out[b] = prof
        k_ms = prof["kernel_us_per_step"] / 1e3
        print(f"== {args.preset} batch {b} ctx {args.context_len}: wall {ms:.3f} ms/step, "
              f"kernels {k_ms:.3f} ms ({prof['kernels_per_step']:.0f} launches), "
              f"gaps {ms - k_ms:.3f} ms")
        for f in prof["families"][: args.top]:
            print(f"  {f['us']:9.1f} us {f['us'] / 10 / ms:5.1f}%  x{f['count']:6.1f}  {f['name']}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
