"""What prompt logprobs cost a prefill: one prompt of L tokens through `ModelRunner`, plain vs
every prompt row scored (top-5), random weights at a preset shape on one device.

Prints per L: prefill ms plain / scored, the overhead, the peak device memory of each, and
the largest |difference| between the runner's sliced scores and one log-softmax over the
whole (L, V) logits of the same model (a check that slicing changes nothing).

    python bench/prompt_scoring.py --preset nemotron-h-8b --lens 2048 8192 [--json OUT]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

import torch

from hybridpd.bench.engine_bench import StepDriver, build_model, preset_config, timed
from hybridpd.engine.scheduler import SchedulerOutput
from hybridpd.model.forward_batch import ForwardBatch
from hybridpd.request import SamplingParams

TOP = 5


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="nemotron-h-8b")
    ap.add_argument("--num-layers", type=int, default=None)
    ap.add_argument("--lens", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    dev = torch.device(a.device)
    cfg = preset_config(a.preset, a.num_layers, None)
    model = build_model(cfg, dev, 0, None)
    driver = StepDriver(model, cfg, dev, 1, max(a.lens) + 8, 16)
    scored_params = SamplingParams(temperature=0.0, prompt_logprobs=TOP)
    rows = []
    for n in a.lens:
        gen = torch.Generator().manual_seed(n)
        ids = tuple(torch.randint(3, cfg.vocab_size, (n,), generator=gen).tolist())
        plain = driver.request(0, ids, 0)
        scored = replace(plain, params=scored_params, score_from=0, score_targets=ids[1:])
        out: dict[str, float] = {"tokens": n}
        cuda = dev.type == "cuda"
        for name, req in (("plain", plain), ("scored", scored)):
            if cuda:
                torch.cuda.reset_peak_memory_stats(dev)
            base = torch.cuda.memory_allocated(dev) if cuda else 0
            s = timed(lambda r=req: driver.runner.execute(SchedulerOutput((r,))), dev,
                      iters=a.iters)
            out[f"{name}_ms"] = 1e3 * s
            if cuda:
                peak = torch.cuda.max_memory_allocated(dev) - base
                out[f"{name}_peak_extra_gib"] = peak / 2**30
        result = driver.runner.execute(SchedulerOutput((scored,)))
        assert result.scores is not None
        got = result.scores[scored.request_id]
        batch = driver.runner.build_batch([plain])
        full = ForwardBatch(**{**batch.__dict__,
                               "logits_indices": torch.arange(n - 1, device=dev)})
        with torch.inference_mode():
            logp = torch.log_softmax(model(full, driver.pool), dim=-1)  # (L-1, V) at once
        want = logp.gather(1, torch.tensor(ids[1:], device=dev)[:, None])[:, 0].cpu()
        out["max_abs_diff_vs_one_shot"] = float((got.logprobs - want).abs().max())
        out["overhead_pct"] = 100 * (out["scored_ms"] / out["plain_ms"] - 1)
        print(json.dumps(out), flush=True)
        rows.append(out)
        del logp
    if a.json:
        with open(a.json, "w") as f:
            name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
            json.dump({"device": name, "preset": a.preset,
                       "dtype": cfg.dtype, "layers": cfg.num_layers, "top": TOP,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
