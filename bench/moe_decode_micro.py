"""One Nemotron-3-Nano-30B-A3B routed-expert layer at decode batch sizes on a GPU: the grouped
GEMM path vs the Triton GEMV path, each captured in a CUDA graph and replayed; prints a table and
checks the two agree; then the router (torch chain vs `route_topk`) and, with `--sweep`, the
GEMV kernels' (BLOCK_N, BLOCK_K, warps, stages) one projection at a time, each variant checked
against the reference. Run on the device machine: python3 bench/moe_decode_micro.py [--sweep]"""

from __future__ import annotations

import itertools
import sys

import torch

from hybridpd.kernels.triton_moe import DOWN_CONFIG, UP_CONFIG, moe_experts_gemv, route_topk
from hybridpd.model.moe import RoutedExperts, TopkRouter
from hybridpd.model.parallel import SINGLE


def graph_ms(fn, reps: int = 50) -> float:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    g.replay()
    start.record()
    for _ in range(reps):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


@torch.inference_mode()
def main() -> None:
    from hybridpd.bench.engine_bench import preset_config

    cfg = preset_config("nemotron-3-nano-30b-a3b", 2, "bfloat16")
    dev = torch.device("cuda")
    moe = RoutedExperts(cfg, SINGLE, torch.bfloat16, dev)
    moe.up.normal_(0, cfg.hidden_size ** -0.5)
    moe.down.normal_(0, cfg.moe_intermediate_size ** -0.5)
    router = TopkRouter(cfg, dev)
    router.weight.normal_()
    router.e_score_correction_bias.zero_()
    e_bytes = 2 * cfg.hidden_size * cfg.moe_intermediate_size * 2  # one expert's up + down
    print(f"{'T':>4} {'grouped ms':>11} {'gemv ms':>9} {'touched MB':>11} {'gemv GB/s':>10} "
          f"{'rel err':>8}")
    for t in (1, 2, 4, 8, 10, 16, 32, 64):
        x = torch.randn(t, cfg.hidden_size, device=dev, dtype=torch.bfloat16)
        w, ids = router(x)
        a = moe.forward_grouped(x, w, ids)
        b = moe_experts_gemv(x, moe.up, moe.down, w, ids)
        err = float((a - b).norm() / a.norm())
        tg = graph_ms(lambda x=x, w=w, ids=ids: moe.forward_grouped(x, w, ids))
        tv = graph_ms(lambda x=x, w=w, ids=ids: moe_experts_gemv(x, moe.up, moe.down, w, ids))
        touched = ids.unique().numel() * e_bytes
        print(f"{t:4d} {tg:11.4f} {tv:9.4f} {touched / 1e6:11.1f} {touched / tv / 1e6:10.0f} "
              f"{err:8.1e}")
    for t in (1, 64):
        x = torch.randn(t, cfg.hidden_size, device=dev, dtype=torch.bfloat16)
        logits = torch.nn.functional.linear(x.float(), router.weight)
        bias = router.e_score_correction_bias
        t_ref = graph_ms(lambda lg=logits: router.select(lg))
        t_tri = graph_ms(lambda lg=logits, b=bias: route_topk(
            lg, b, router.top_k, router.norm_topk_prob, router.scaling))
        print(f"router selection T={t}: torch chain {t_ref * 1e3:.1f} us, route_topk "
              f"{t_tri * 1e3:.1f} us")
    if "--sweep" in sys.argv:
        sweep(moe, router, cfg, dev, e_bytes)


def sweep(moe, router, cfg, dev, e_bytes) -> None:
    grid = list(itertools.product((16, 32, 64), (128, 256, 512), (4, 8), (3,)))
    for t in (1, 8):
        x = torch.randn(t, cfg.hidden_size, device=dev, dtype=torch.bfloat16)
        w, ids = router(x)
        want = moe.forward_loop(x, w, ids)
        touched = ids.unique().numel() * e_bytes
        for which in ("up", "down"):
            rows = []
            for c in grid:
                cfgs = (c, DOWN_CONFIG) if which == "up" else (UP_CONFIG, c)
                try:
                    got = moe_experts_gemv(x, moe.up, moe.down, w, ids, configs=cfgs)
                    err = float((got - want).norm() / want.norm())
                    ms = graph_ms(lambda cf=cfgs, x=x, w=w, ids=ids: moe_experts_gemv(
                        x, moe.up, moe.down, w, ids, configs=cf), reps=30)
                except Exception as exc:  # noqa: BLE001 - a config that does not compile
                    print(f"  {which} {c}: {type(exc).__name__}")
                    continue
                rows.append((ms, c, err))
            rows.sort()
            print(f"sweep T={t} {which} (other at default), {touched / 1e6:.0f} MB touched: "
                  + "; ".join(f"{c} {ms * 1e3:.1f}us err {e:.0e}" for ms, c, e in rows[:6]))


if __name__ == "__main__":
    main()
