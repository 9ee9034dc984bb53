"""What one TP step costs on the control broadcast: bytes pickled per step message, before
(the whole `SchedulerOutput`, every running request's block tables and parameters, as the
executor sent it until now) and after (`engine/step_messages.py`: running requests as deltas).

A decode step of B running requests with L-token contexts, at a preset's real cache geometry
(block tokens and groups from `CacheGeometry` at the given TP), block ids as the pool would
hand them out. Also times a step's pickle round trip before, and encode + pickle round trip
+ decode after. CPU only, no model.

    python bench/step_message_bytes.py --preset nemotron-h-8b --tp 2 --batch 64 --context 1000
"""

from __future__ import annotations

import argparse
import json
import pickle
import time

from hybridpd.bench.engine_bench import preset_config
from hybridpd.cache.geometry import CacheGeometry
from hybridpd.engine.scheduler import ScheduledRequest, SchedulerOutput
from hybridpd.engine.step_messages import StepDecoder, StepEncoder
from hybridpd.request import SamplingParams


def decode_step(geo: CacheGeometry, batch: int, context: int, params: list[SamplingParams],
                block_tokens: int | None = None) -> SchedulerOutput:
    n_attn, n_mamba = len(geo.attention_groups), len(geo.mamba_groups)
    per_req = -(-(context + 1) // (block_tokens or geo.block_tokens))
    reqs = []
    for i in range(batch):
        base = i * (per_req * n_attn + n_mamba)
        attn = tuple(tuple(range(base + g * per_req, base + (g + 1) * per_req))
                     for g in range(n_attn))
        mamba = tuple(base + n_attn * per_req + g for g in range(n_mamba))
        reqs.append(ScheduledRequest(f"cmpl-{i:032x}-0", (100 + i,), context, attn, mamba,
                                     True, params[i], context - 200))
    return SchedulerOutput(tuple(reqs))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="nemotron-h-8b")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--context", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=200)
    ap.add_argument("--block-tokens", type=int, default=None,
                    help="override the geometry's tokens per block (e.g. 16: attention-only)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    geo = CacheGeometry.build(preset_config(a.preset, None, None), tp_size=a.tp, tp_rank=0)
    params = [SamplingParams(max_tokens=2048, temperature=0.7, top_p=0.9, seed=i,
                             stop=("</s>",), logprobs=1) for i in range(a.batch)]
    step1 = decode_step(geo, a.batch, a.context - 1, params, a.block_tokens)
    step2 = decode_step(geo, a.batch, a.context, params, a.block_tokens)
    before = len(pickle.dumps(("execute", step2)))
    enc, dec = StepEncoder(), StepDecoder()
    dec.decode(enc.encode(step1))
    msg = enc.encode(step2)
    after = len(pickle.dumps(msg))
    assert dec.decode(pickle.loads(pickle.dumps(msg))) == step2
    steps = [decode_step(geo, a.batch, a.context + k, params, a.block_tokens)
             for k in range(a.repeat)]
    t0 = time.perf_counter()
    for out in steps:
        pickle.loads(pickle.dumps(("execute", out)))
    old_ms = (time.perf_counter() - t0) / a.repeat * 1e3
    enc, dec = StepEncoder(), StepDecoder()
    dec.decode(enc.encode(step2))
    t0 = time.perf_counter()
    for out in steps[1:]:  # steady decoding: every message is deltas only
        dec.decode(pickle.loads(pickle.dumps(enc.encode(out))))
    new_ms = (time.perf_counter() - t0) / (a.repeat - 1) * 1e3
    row = {"preset": a.preset, "tp": a.tp, "batch": a.batch, "context": a.context,
           "block_tokens": a.block_tokens or geo.block_tokens,
           "attn_groups": len(geo.attention_groups),
           "mamba_groups": len(geo.mamba_groups),
           "blocks_per_request_per_group": len(step2.scheduled[0].attn_block_ids[0]),
           "bytes_before": before, "bytes_after": after, "ratio": round(before / after, 1),
           "pickle_roundtrip_before_ms": round(old_ms, 3),
           "encode_pickle_unpickle_decode_after_ms": round(new_ms, 3)}
    print(json.dumps(row, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(row, f, indent=1)


if __name__ == "__main__":
    main()
