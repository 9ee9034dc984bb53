"""GPU check and timing of the Triton prefill kernels against their references and roofline.

One scripted run for the lent GPU machine: measures the device's copy bandwidth and bf16 GEMM
rate, checks every prefill kernel against its `*_ref` on fresh random inputs at Nemotron-H-8B
and 30B-A3B shapes (packed varlen batches, cached prefixes, unified-page strides, NaN past
seq_len), times kernel vs reference (and torch SDPA for fresh prompts), sweeps a few attention
tile configs, and prints a short table. Full results go to $OUT/prefill_kernels.json.

  python bench/prefill_kernels.py [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
import warnings

import torch
import triton
from triton.testing import do_bench

from hybridpd.kernels.attention import paged_attention_ref, write_kv_ref
from hybridpd.kernels.conv1d import causal_conv1d_prefill_ref
from hybridpd.kernels.ssd import ssd_prefill_ref
from hybridpd.kernels.triton_attention import paged_attention_triton
from hybridpd.kernels.triton_conv1d import causal_conv1d_prefill_triton
from hybridpd.kernels.triton_kv import write_kv_triton
from hybridpd.kernels.triton_ssd import ssd_chunk_metadata, ssd_prefill_triton

DEV = torch.device("cuda")
RESULTS: list[dict] = []
MIXED = (1000, 999, 1001, 1000, 1, 1500, 500, 1999)  # varlen lengths of the mixed cases


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    o, r = out.double(), ref.double()
    if not torch.isfinite(o).all():
        return float("inf")
    return float((o - r).norm() / r.norm().clamp_min(1e-30))


def bench_ms(fn, rep: int = 200) -> float:
    if DEV.type != "cuda":  # --smoke: one timed call on the CPU interpreter
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    return float(do_bench(fn, warmup=25, rep=rep, return_mode="median"))


def ceilings() -> tuple[float, float]:
    """(copy GB/s counting read + write, bf16 GEMM TFLOP/s), measured here."""
    a = torch.randn(1 << 30, device=DEV, dtype=torch.bfloat16)  # 2 GiB
    b = torch.empty_like(a)
    ms = bench_ms(lambda: b.copy_(a))
    copy_gbps = 2 * a.numel() * 2 / ms / 1e6
    n = 8192
    x = torch.randn(n, n, device=DEV, dtype=torch.bfloat16)
    y = torch.randn(n, n, device=DEV, dtype=torch.bfloat16)
    ms = bench_ms(lambda: x @ y)
    return copy_gbps, 2 * n ** 3 / ms / 1e9


def qsl_of(lens: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int64,
                        device=DEV)


# ---------------------------------------------------------------- attention
def attn_case(hq: int, hkv: int, ctx: list[int], new: list[int], bt: int = 1040, d: int = 128):
    """bf16 q and a unified-page-strided KV view; NaN past each seq_len and in the other
    region of every page (where Mamba bytes would sit)."""
    width = max(-(-(c + n) // bt) for c, n in zip(ctx, new))
    nseq = len(ctx)
    nb = nseq * width + 1
    page = hkv * 2 * bt * d
    raw = torch.full((nb, 2, page), float("nan"), device=DEV, dtype=torch.bfloat16)
    kv = raw[:, 0].view(nb, hkv, 2, bt, d)
    table = (torch.randperm(nb - 1, device=DEV)[: nseq * width] + 1).view(nseq, width)
    for b, (c, n) in enumerate(zip(ctx, new)):
        L = c + n
        for j in range(-(-L // bt)):
            valid = min(bt, L - j * bt)
            kv[table[b, j], :, :, :valid].normal_()
    q = torch.randn(sum(new), hq, d, device=DEV, dtype=torch.bfloat16)
    seq_lens = torch.tensor([c + n for c, n in zip(ctx, new)], device=DEV)
    return q, kv, table, qsl_of(new), seq_lens


def attn_flops(hq: int, d: int, ctx: list[int], new: list[int]) -> float:
    vis = sum(n * c + n * (n + 1) / 2 for c, n in zip(ctx, new))
    return 4.0 * hq * d * vis


ATTN_CONFIGS = [(128, 32, 4, 4, False), (128, 32, 4, 4, True), (128, 64, 4, 4, False),
                (128, 64, 4, 3, True), (64, 128, 4, 2, False), (64, 64, 4, 4, False),
                (128, 32, 4, 5, False), (128, 64, 8, 4, False), (128, 128, 8, 3, True),
                (64, 32, 4, 4, False), (256, 32, 8, 4, False), (128, 16, 4, 4, False)]
SSD_TUNES = [dict(), dict(fused_state=True), dict(fused_state=True, fused_p=32),
             dict(fused_state=True, fused_p=16, fused_warps=8),
             dict(fused_state=True, fused_p=32, fused_warps=8),
             dict(fused_state=True, fused_stages=3), dict(fused_state=True, fused_stages=1),
             dict(fused_state=True, scan_warps=4), dict(fused_state=True, lowp_dot=False),
             dict(lowp_dot=False)]
CONV_CONFIGS = [(32, 128, 4), (64, 128, 4), (128, 64, 4), (64, 256, 8), (128, 128, 8),
                (16, 256, 4), (256, 32, 4), (64, 64, 2), (8, 512, 4)]


def run_attention(name: str, hq: int, hkv: int, ctx: list[int], new: list[int],
                  gemm_tflops: float, sweep: bool, with_ref: bool = True) -> None:
    q, kv, table, loc, seq_lens = attn_case(hq, hkv, ctx, new)
    scale, mq = 128 ** -0.5, max(new)
    out = paged_attention_triton(q, kv, table, loc, seq_lens, scale, mq)
    row = dict(kernel="prefill_attention", case=name, tokens=sum(new), ctx=ctx, new=new,
               hq=hq, hkv=hkv)
    flops = attn_flops(hq, 128, ctx, new)
    row["floor_ms"] = flops / gemm_tflops / 1e9
    if with_ref:
        ref = paged_attention_ref(q, kv, table, loc, seq_lens, scale, mq)
        row["rel_err"] = rel_err(out, ref)
        del ref
        torch.cuda.empty_cache()
        row["ref_ms"] = bench_ms(
            lambda: paged_attention_ref(q, kv, table, loc, seq_lens, scale, mq), rep=50)
    row["triton_ms"] = bench_ms(lambda: paged_attention_triton(q, kv, table, loc, seq_lens,
                                                               scale, mq))
    row["tflops"] = flops / row["triton_ms"] / 1e9
    if sweep:
        best = {}
        for cfg in ATTN_CONFIGS:
            try:
                o = paged_attention_triton(q, kv, table, loc, seq_lens, scale, mq, config=cfg)
                err = rel_err(o, out)
                ms = bench_ms(lambda cfg=cfg: paged_attention_triton(
                    q, kv, table, loc, seq_lens, scale, mq, config=cfg))
                best[str(cfg)] = dict(ms=ms, err_vs_default=err)
            except Exception as exc:  # noqa: BLE001 - a config may not fit the chip
                best[str(cfg)] = dict(error=repr(exc)[:200])
        row["sweep"] = best
    if all(c == 0 for c in ctx) and len(new) == 1:  # SDPA on the fresh q/k/v
        L = new[0]
        qs = q.view(1, L, hq, 128).transpose(1, 2)
        ks = torch.randn(1, hkv, L, 128, device=DEV, dtype=torch.bfloat16)
        vs = torch.randn_like(ks)
        from torch.nn.attention import SDPBackend, sdpa_kernel
        for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                        SDPBackend.EFFICIENT_ATTENTION):
            for gqa in (True, False):
                kk = ks if gqa else ks.repeat_interleave(hq // hkv, 1)
                vv = vs if gqa else vs.repeat_interleave(hq // hkv, 1)
                def fn(kk=kk, vv=vv, gqa=gqa):
                    return torch.nn.functional.scaled_dot_product_attention(
                        qs, kk, vv, is_causal=True, enable_gqa=gqa)

                try:
                    with sdpa_kernel(backend):
                        fn()
                        row[f"sdpa_{backend.name.lower()}{'_gqa' if gqa else ''}_ms"] = \
                            bench_ms(fn)
                    break
                except Exception:  # noqa: BLE001 - backend unsupported for this input
                    continue
    RESULTS.append(row)


# ---------------------------------------------------------------- SSD
def ssd_case(lens: list[int], H: int, P: int, has_init: list[bool], G: int = 8, N: int = 128):
    T = sum(lens)
    bf = dict(device=DEV, dtype=torch.bfloat16)
    conv_out = torch.randn(T, H * P + 2 * G * N, **bf)  # x | B | C as the conv's output
    x = conv_out[:, : H * P].view(T, H, P)
    B = conv_out[:, H * P: H * P + G * N].view(T, G, N)
    C = conv_out[:, H * P + G * N:].view(T, G, N)
    proj = torch.randn(T, H + 64, **bf)
    dt_raw = proj[:, 64:]  # a column slice, like in_proj's dt
    A = -torch.exp(torch.randn(H, device=DEV) * 0.5)
    D = torch.randn(H, device=DEV)
    dt_bias = torch.randn(H, device=DEV) * 0.5 - 2.0
    nb = len(lens) + 2
    raw = torch.full((nb, H * P * N + 256), float("nan"), device=DEV)  # padded slots
    pool = raw[:, : H * P * N].view(nb, H, P, N)
    ids = torch.randperm(nb - 1, device=DEV)[: len(lens)] + 1
    for i, h in zip(ids.tolist(), has_init):
        if h:
            pool[i].normal_()
    return (x, dt_raw, A, B, C, D, dt_bias, pool, ids, qsl_of(lens),
            torch.tensor(has_init, device=DEV))


def run_ssd(name: str, lens: list[int], H: int, P: int, has_init: list[bool], copy_gbps: float,
            gemm_tflops: float, sweep: bool = False, chunk: int = 128) -> None:
    args = ssd_case(lens, H, P, has_init)
    x, dt_raw, A, B, C, D, dt_bias, pool, ids, loc, hi = args
    T, N, G = sum(lens), 128, 8
    row = dict(kernel="ssd_prefill", case=name, tokens=T, lens=lens, H=H, P=P)
    ref_pool = pool.clone()
    ref = ssd_prefill_ref(x, dt_raw, A, B, C, D, dt_bias, ref_pool, ids, loc, hi,
                          chunk_size=chunk, max_len=max(lens))
    start_pool = pool.clone()
    out = ssd_prefill_triton(x, dt_raw, A, B, C, D, dt_bias, pool, ids, loc, hi,
                             chunk_size=chunk)
    row["rel_err"] = rel_err(out, ref)
    row["state_rel_err"] = rel_err(pool[ids], ref_pool[ids])
    chunks = ssd_chunk_metadata(loc, T, chunk)
    nc = chunks.num_chunks
    # bytes: x, B, C, dt read, y written (bf16), states r/w; plus the fp32 chunk-state buffer
    # written, read+written (passing) and read again
    io = 2 * (T * H * P * 2 + T * G * N * 2 + T * H) + 2 * len(lens) * H * P * N * 4
    inter = 4 * nc * H * P * N * 4
    flops = nc * H * (2 * chunk * chunk * N + 2 * chunk * chunk * P + 4 * chunk * P * N)
    row["floor_ms"] = max(io / copy_gbps / 1e6, flops / gemm_tflops / 1e9)
    row["floor_with_state_buffer_ms"] = (io + inter) / copy_gbps / 1e6

    def ref_fn():
        pool.copy_(start_pool)
        ssd_prefill_ref(x, dt_raw, A, B, C, D, dt_bias, pool, ids, loc, hi,
                        chunk_size=chunk, max_len=max(lens))

    row["ref_ms"] = bench_ms(ref_fn, rep=100)
    row["triton_ms"] = bench_ms(lambda: ssd_prefill_triton(
        x, dt_raw, A, B, C, D, dt_bias, pool, ids, loc, hi, chunk_size=chunk, chunks=chunks))
    row["triton_with_meta_ms"] = bench_ms(lambda: ssd_prefill_triton(
        x, dt_raw, A, B, C, D, dt_bias, pool, ids, loc, hi, chunk_size=chunk))
    row["kernels_us"] = profile_kernels(lambda: ssd_prefill_triton(
        x, dt_raw, A, B, C, D, dt_bias, pool, ids, loc, hi, chunk_size=chunk, chunks=chunks))
    if sweep:
        res = {}
        for tune in SSD_TUNES:
            try:
                pool.copy_(start_pool)
                knobs = {k: v for k, v in tune.items() if k != "chunk"}
                q = tune.get("chunk", chunk)  # another chunk size: same function
                ch = ssd_chunk_metadata(loc, T, q)
                o = ssd_prefill_triton(x, dt_raw, A, B, C, D, dt_bias, pool, ids, loc, hi,
                                       chunk_size=q, chunks=ch, tune=knobs)
                errs = (rel_err(o, ref), rel_err(pool[ids], ref_pool[ids]))
                ms = bench_ms(lambda q=q, ch=ch, knobs=knobs: ssd_prefill_triton(
                    x, dt_raw, A, B, C, D, dt_bias, pool, ids, loc, hi, chunk_size=q,
                    chunks=ch, tune=knobs))
                res[str(tune)] = dict(ms=ms, err=errs)
            except Exception as exc:  # noqa: BLE001 - a variant may not fit the chip
                res[str(tune)] = dict(error=repr(exc)[:200])
        row["sweep"] = res
    RESULTS.append(row)
    torch.cuda.empty_cache()


# ---------------------------------------------------------------- conv1d
def run_conv(name: str, lens: list[int], channels: int, has_init: list[bool],
             copy_gbps: float, sweep: bool = False) -> None:
    T, K = sum(lens), 4
    proj = torch.randn(T, channels + 512, device=DEV, dtype=torch.bfloat16)
    x = proj[:, 256: 256 + channels]  # a column slice of in_proj's output
    w = torch.randn(channels, K, device=DEV, dtype=torch.bfloat16)
    bias = torch.randn(channels, device=DEV, dtype=torch.bfloat16)
    nb = len(lens) + 2
    states = torch.full((nb, channels, K - 1), float("nan"), device=DEV, dtype=torch.bfloat16)
    ids = torch.randperm(nb - 1, device=DEV)[: len(lens)] + 1
    for i, h in zip(ids.tolist(), has_init):
        if h:
            states[i].normal_()
    loc, hi = qsl_of(lens), torch.tensor(has_init, device=DEV)
    ref_states = states.clone()
    start = states.clone()
    ref = causal_conv1d_prefill_ref(x, w, bias, ref_states, ids, loc, hi)
    out = causal_conv1d_prefill_triton(x, w, bias, states, ids, loc, hi)
    row = dict(kernel="conv1d_prefill", case=name, tokens=T, lens=lens, channels=channels,
               rel_err=rel_err(out, ref),
               state_exact=bool(torch.equal(states[ids], ref_states[ids])))
    row["floor_ms"] = 2 * T * channels * 2 / copy_gbps / 1e6

    def ref_fn():
        states.copy_(start)
        causal_conv1d_prefill_ref(x, w, bias, states, ids, loc, hi)

    row["ref_ms"] = bench_ms(ref_fn, rep=100)
    row["triton_ms"] = bench_ms(lambda: causal_conv1d_prefill_triton(x, w, bias, states, ids,
                                                                     loc, hi))
    row["kernels_us"] = profile_kernels(lambda: causal_conv1d_prefill_triton(
        x, w, bias, states, ids, loc, hi))
    if sweep:
        res = {}
        for cfg in CONV_CONFIGS:
            try:
                states.copy_(start)
                o = causal_conv1d_prefill_triton(x, w, bias, states, ids, loc, hi, config=cfg)
                ms = bench_ms(lambda cfg=cfg: causal_conv1d_prefill_triton(
                    x, w, bias, states, ids, loc, hi, config=cfg))
                res[str(cfg)] = dict(ms=ms, err=rel_err(o, ref))
            except Exception as exc:  # noqa: BLE001
                res[str(cfg)] = dict(error=repr(exc)[:200])
        row["sweep"] = res
    RESULTS.append(row)


def run_write_kv(name: str, tokens: int, hkv: int, copy_gbps: float) -> None:
    d, bt = 128, 1040
    nb = -(-tokens // bt) + 2
    qkv = torch.randn(tokens, (32 + 2 * hkv) * d, device=DEV, dtype=torch.bfloat16)
    k = qkv[:, 32 * d:(32 + hkv) * d].view(tokens, hkv, d)
    v = qkv[:, (32 + hkv) * d:].view(tokens, hkv, d)
    raw = torch.full((nb, 2, hkv * 2 * bt * d), float("nan"), device=DEV, dtype=torch.bfloat16)
    kv = raw[:, 0].view(nb, hkv, 2, bt, d)
    slots = torch.randperm((nb - 1) * bt, device=DEV)[:tokens] + bt
    ref_raw = raw.clone()
    write_kv_ref(k, v, ref_raw[:, 0].view(nb, hkv, 2, bt, d), slots)
    write_kv_triton(k, v, kv, slots)
    exact = bool(torch.equal(raw.nan_to_num(), ref_raw.nan_to_num())
                 and torch.equal(raw.isnan(), ref_raw.isnan()))
    row = dict(kernel="write_kv", case=name, tokens=tokens, hkv=hkv, rel_err=0.0 if exact else 1.0,
               floor_ms=2 * 2 * tokens * hkv * d * 2 / copy_gbps / 1e6)
    row["ref_ms"] = bench_ms(lambda: write_kv_ref(k, v, kv, slots))
    row["triton_ms"] = bench_ms(lambda: write_kv_triton(k, v, kv, slots))
    RESULTS.append(row)


def profile_kernels(fn) -> dict[str, float]:
    """Mean device time per kernel name over 10 calls (µs); empty off CUDA."""
    if DEV.type != "cuda":
        return {}
    fn()
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            fn()
        torch.cuda.synchronize()
    out = {}
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if t:
            out[ev.key[:60]] = round(t / 10, 1)
    return out


def section(fn, *args, **kw) -> None:
    t0 = time.time()
    try:
        fn(*args, **kw)
    except Exception:  # noqa: BLE001 - report and go on with the next case
        RESULTS.append(dict(kernel=fn.__name__, case=str(args[0]), error=traceback.format_exc()))
        traceback.print_exc()
    print(f"  {fn.__name__} {args[0]}: {time.time() - t0:.1f}s", flush=True)


def table() -> None:
    print(f"\n{'kernel':<18}{'case':<22}{'tok':>6}{'ref ms':>9}{'triton ms':>10}{'speedup':>8}"
          f"{'floor ms':>9}{'of floor':>9}{'rel err':>9}")
    for r in RESULTS:
        if "error" in r:
            print(f"{r['kernel']:<18}{r['case']:<22} ERROR {r['error'].splitlines()[-1][:60]}")
            continue
        ref, tri, floor = r.get("ref_ms"), r["triton_ms"], r["floor_ms"]
        print(f"{r['kernel']:<18}{r['case']:<22}{r['tokens']:>6}"
              f"{(f'{ref:.3f}' if ref else '-'):>9}{tri:>10.3f}"
              f"{(f'{ref / tri:.1f}x' if ref else '-'):>8}{floor:>9.3f}"
              f"{floor / tri:>9.0%}{r.get('rel_err', float('nan')):>9.1e}")
    for r in RESULTS:
        extra = {k: v for k, v in r.items() if k.startswith("sdpa") or k in ("tflops",)}
        if extra and "error" not in r:
            print(f"  {r['case']}: " + ", ".join(f"{k}={v:.3f}" for k, v in extra.items()))
        if "sweep" in r:
            print(f"  {r['kernel']} {r['case']} sweep: " + "; ".join(
                f"{k}={v['ms']:.3f}" + (f" err={v['err']}" if "err" in v else "")
                if "ms" in v else f"{k}=ERR" for k, v in r["sweep"].items()))
        if "kernels_us" in r:
            print(f"  {r['case']} kernels µs: {r['kernels_us']}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="no sweeps (unless --sweep)")
    ap.add_argument("--sweep", nargs="*", default=None, choices=["attn", "ssd", "conv"],
                    help="kernels to sweep tile/launch choices for (default: all, none if --quick)")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny shapes on the CPU (needs TRITON_INTERPRET=1): checks the script")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/out"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(0)
    warnings.filterwarnings("ignore", category=UserWarning)  # SDPA's backend-refusal chatter
    global DEV
    if args.smoke:
        DEV = torch.device("cpu")
        args.quick = True
    name = torch.cuda.get_device_name() if DEV.type == "cuda" else "cpu (interpreter)"
    print("device", name, "torch", torch.__version__, "triton", triton.__version__, flush=True)
    copy_gbps, gemm_tflops = ceilings() if DEV.type == "cuda" else (1.0, 1.0)
    k = 200 if args.smoke else 1  # smoke: every length / k
    sweep = set(args.sweep if args.sweep is not None else
                ([] if args.quick else ["attn", "ssd", "conv"]))
    print(f"copy {copy_gbps:.0f} GB/s (read+write), bf16 GEMM {gemm_tflops:.0f} TFLOP/s",
          flush=True)
    section(run_attention, "8b fresh 8000", 32, 8, [0], [8000 // k], gemm_tflops,
            "attn" in sweep)
    section(run_attention, "8b prefix 4k+4k", 32, 8, [4000 // k], [4000 // k], gemm_tflops,
            "attn" in sweep)
    section(run_attention, "8b 8x1000 mixed", 32, 8,
            [c // k for c in (0, 900, 0, 2000, 0, 50, 0, 1040)], [1000 // k] * 8, gemm_tflops,
            False)
    section(run_attention, "30b fresh 8000", 32, 2, [0], [8000 // k], gemm_tflops, False)
    section(run_ssd, "8b fresh 8000", [8000 // k], 128, 64, [False], copy_gbps, gemm_tflops,
            "ssd" in sweep)
    section(run_ssd, "8b 8x1000 mixed", [max(1, n // k) for n in MIXED],
            128, 64, [True, False] * 4, copy_gbps, gemm_tflops, "ssd" in sweep)
    section(run_ssd, "30b fresh 8000", [8000 // k], 64, 64, [False], copy_gbps, gemm_tflops,
            "ssd" in sweep)
    section(run_conv, "8b fresh 8000", [8000 // k], 10240, [False], copy_gbps, "conv" in sweep)
    section(run_conv, "8b 8x1000 mixed", [max(1, n // k) for n in MIXED], 10240,
            [True, False] * 4, copy_gbps)
    section(run_conv, "30b fresh 8000", [8000 // k], 6144, [False], copy_gbps)
    section(run_write_kv, "8b 8000", 8000 // k, 8, copy_gbps)
    with open(os.path.join(args.out, "prefill_kernels.json"), "w") as f:
        json.dump(dict(device=name, copy_gbps=copy_gbps,
                       gemm_tflops=gemm_tflops, results=RESULTS), f, indent=1)
    table()
    return 1 if any("error" in r for r in RESULTS) else 0


if __name__ == "__main__":
    sys.exit(main())
