"""`hybridpd bench engine`: the engine's step rates against the device's own ceilings.

Owns one benchmark run: the device's copy bandwidth and dense GEMM rate, decode ms/step + tok/s
+ MBU per batch size, prefill tok/s + MFU per prompt length, optionally several variants
(kernel implementation x CUDA graphs on/off) and transformers' NemotronH on the same weights,
printed as a table and written as JSON. Weights are random and made directly on the device
(`--preset`, no checkpoint on disk) or loaded from `--model DIR`. Drives `ModelRunner` directly
with hand-built `ScheduledRequest`s (no scheduler, no HTTP). Must not know kernel internals:
it picks implementations only by `KernelImpl` through the model.

MBU = bytes a decode step must move (weights read once, MoE experts only those the batch is
expected to touch; conv + SSM state read and written; each sequence's KV read and one token's
K/V written) / step time / measured copy bandwidth. MFU = (2 x active parameters + attention
score/value FLOPs) per token x tok/s / measured GEMM rate; the SSD scan's FLOPs are not counted.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from hybridpd.cache.geometry import CacheGeometry
from hybridpd.cache.tensors import PoolTensors
from hybridpd.config import LayerKind, ModelConfig, canonical_dtype, dtype_bytes
from hybridpd.engine.runner import ModelRunner
from hybridpd.engine.sampler import Sampler
from hybridpd.engine.scheduler import ScheduledRequest, SchedulerOutput
from hybridpd.kernels.ops import KernelImpl
from hybridpd.request import SamplingParams

if TYPE_CHECKING:  # imported where the models are built
    from transformers import NemotronHForCausalLM as HFNemotronH

    from hybridpd.model.nemotron_h import NemotronHForCausalLM

GREEDY = SamplingParams(max_tokens=1 << 20, temperature=0.0, ignore_eos=True)


class BenchError(ValueError):
    """A configuration the benchmark cannot run (reported in one line)."""


@dataclass(frozen=True)
class Variant:
    kernels: KernelImpl
    graphs: bool

    @property
    def name(self) -> str:
        return f"{self.kernels.value}+{'graphs' if self.graphs else 'eager'}"

    @classmethod
    def parse(cls, text: str) -> Variant:
        kern, _, mode = text.partition("+")
        try:
            impl = KernelImpl(kern)
        except ValueError:
            raise BenchError(f"bad variant {text!r}: kernels must be auto or reference") from None
        if mode not in ("graphs", "eager"):
            raise BenchError(f"bad variant {text!r}: mode must be graphs or eager")
        return cls(impl, mode == "graphs")


@dataclass
class BenchResult:
    device: str
    device_name: str
    model: str
    dtype: str
    num_layers: int
    copy_gbps: float
    gemm_tflops: float
    weight_bytes: int
    measurements: list[dict[str, Any]] = field(default_factory=list)


# ---- model --------------------------------------------------------------------------------
def preset_config(preset: str, num_layers: int | None, dtype: str | None) -> ModelConfig:
    from hybridpd.demo.presets import get_preset, hf_config, resolve_vocab_size

    p = get_preset(preset)
    raw = hf_config(p, vocab_size=resolve_vocab_size(p, 256), bos_token_id=1,
                    eos_token_ids=[2], pad_token_id=0, num_layers=num_layers, dtype=dtype)
    return ModelConfig.from_hf_dict(raw)


def hf_config_dict(cfg: ModelConfig) -> dict[str, Any]:
    """A transformers NemotronHConfig dict of this model's shape (for --compare-transformers)."""
    raw: dict[str, Any] = {
        "model_type": "nemotron_h", "hybrid_override_pattern": cfg.pattern,
        "num_hidden_layers": cfg.num_layers, "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size, "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim,
        "mamba_num_heads": cfg.mamba_num_heads, "mamba_head_dim": cfg.mamba_head_dim,
        "n_groups": cfg.n_groups, "ssm_state_size": cfg.ssm_state_size,
        "conv_kernel": cfg.conv_kernel, "chunk_size": cfg.chunk_size,
        "use_conv_bias": cfg.use_conv_bias, "mamba_proj_bias": cfg.mamba_proj_bias,
        "use_bias": cfg.mamba_proj_bias, "intermediate_size": cfg.intermediate_size,
        "mlp_bias": cfg.mlp_bias, "layer_norm_epsilon": cfg.layer_norm_epsilon,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "max_position_embeddings": cfg.max_position_embeddings, "bos_token_id": 1,
        "eos_token_id": 2, "pad_token_id": 0, "time_step_limit": [0.0, float("inf")],
        "n_routed_experts": cfg.n_routed_experts, "num_experts_per_tok": cfg.num_experts_per_tok,
        "moe_intermediate_size": cfg.moe_intermediate_size,
        "moe_shared_expert_intermediate_size": cfg.moe_shared_expert_intermediate_size,
        "n_group": cfg.n_group, "topk_group": cfg.topk_group,
        "routed_scaling_factor": cfg.routed_scaling_factor, "norm_topk_prob": cfg.norm_topk_prob,
        "mamba_hidden_act": "silu", "mlp_hidden_act": "relu2", "n_shared_experts": 1,
    }
    return raw


@torch.no_grad()
def random_init_(model: torch.nn.Module, num_layers: int, seed: int) -> None:
    """Draw every weight on its own device (the demo checkpoint's distributions, roughly)."""
    gen = torch.Generator(next(model.parameters()).device).manual_seed(seed)
    res = 1.0 / math.sqrt(max(num_layers, 1))
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]

        def normal(std: float, p: torch.Tensor = p) -> torch.Tensor:
            return torch.randn(p.shape, generator=gen, device=p.device, dtype=torch.float32) * std

        if leaf == "A_log":
            u = torch.rand(p.shape, generator=gen, device=p.device)
            p.copy_(torch.log(1.0 + 15.0 * u))
        elif leaf == "dt_bias":
            u = torch.rand(p.shape, generator=gen, device=p.device, dtype=torch.float64)
            dt = torch.exp(math.log(1e-3) + u * (math.log(0.1) - math.log(1e-3)))
            p.copy_(dt + torch.log(-torch.expm1(-dt)))
        elif leaf == "D" or name.endswith("norm.weight") or name.endswith("norm_f.weight"):
            p.copy_(1.0 + normal(0.1))
        elif leaf == "conv_weight":
            p.copy_(normal(0.2))
        elif leaf in ("conv_bias_t", "e_score_correction_bias"):
            p.copy_(normal(0.05 if leaf == "conv_bias_t" else 0.01))
        elif leaf == "embeddings":
            p.copy_(normal(1.0))
        else:  # matrices: N(0, 1/fan_in), residual-branch outputs scaled by 1/sqrt(L)
            out_proj = leaf in ("down",) or any(k in name for k in ("out_proj", "o_proj",
                                                                     "down_proj"))
            p.copy_(normal((res if out_proj else 1.0) / math.sqrt(p.shape[-1])))


def build_model(cfg: ModelConfig, device: torch.device, seed: int,
                model_dir: str | None) -> NemotronHForCausalLM:
    from hybridpd.model.nemotron_h import NemotronHForCausalLM

    model = NemotronHForCausalLM(cfg, device)
    if model_dir is not None:
        model.load_weights(model_dir)
    else:
        random_init_(model, cfg.num_layers, seed)
    return model.eval()


# ---- ceilings -----------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, iters: int, warmup: int = 1) -> float:
    """Median seconds of one call over `iters` calls (host clock around synchronized calls)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(iters):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        samples.append(time.perf_counter() - t0)
    samples.sort()
    return samples[len(samples) // 2]


def copy_bandwidth_gbps(device: torch.device) -> float:
    """Device-to-device copy, bytes read + written per second, in GB/s."""
    n = (1 << 30) if device.type == "cuda" else (64 << 20)
    src = torch.randint(0, 255, (n,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = timed(lambda: dst.copy_(src), device, iters=10 if device.type == "cuda" else 3)
    return 2 * n / t / 1e9


def gemm_tflops(device: torch.device) -> float:
    """Dense GEMM rate on random data: bf16 8192^3 on CUDA, float32 512^3 on CPU."""
    cuda = device.type == "cuda"
    n, dt = (8192, torch.bfloat16) if cuda else (512, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dt)
    b = torch.randn(n, n, device=device, dtype=dt)
    t = timed(lambda: a @ b, device, iters=10 if cuda else 3, warmup=3 if cuda else 1)
    return 2 * n ** 3 / t / 1e12


# ---- cost model ---------------------------------------------------------------------------
def _param_bytes(model: torch.nn.Module) -> tuple[int, int, int]:
    """(all weight bytes, routed-expert bytes, embedding bytes)."""
    total = experts = emb = 0
    for name, p in model.named_parameters():
        nbytes = p.numel() * p.element_size()
        total += nbytes
        if ".experts." in name:
            experts += nbytes
        if name == "embeddings":
            emb += nbytes
    return total, experts, emb


def decode_step_bytes(model: torch.nn.Module, cfg: ModelConfig, geo: CacheGeometry,
                      batch: int, context_len: int) -> int:
    total, experts, emb = _param_bytes(model)
    weights = total - emb - experts + batch * cfg.hidden_size * dtype_bytes(cfg.dtype)
    if experts:  # expected fraction of routed experts a batch of `batch` tokens touches
        e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
        weights += int(experts * (1.0 - (1.0 - k / e) ** batch))
    n_mamba = len(cfg.layers_of(LayerKind.MAMBA))
    n_attn = len(cfg.layers_of(LayerKind.ATTENTION))
    conv = cfg.conv_dim * (cfg.conv_kernel - 1) * geo.conv_itemsize
    ssm = cfg.mamba_num_heads * cfg.mamba_head_dim * cfg.ssm_state_size * geo.ssm_itemsize
    kv_token = 2 * cfg.num_key_value_heads * cfg.head_dim * geo.kv_itemsize
    state = batch * n_mamba * 2 * (conv + ssm)
    kv = batch * n_attn * kv_token * (context_len + 2)
    return int(weights + state + kv)


def prefill_flops_per_token(model: torch.nn.Module, cfg: ModelConfig, tokens: int) -> float:
    total_params = sum(p.numel() for _, p in model.named_parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    emb = cfg.vocab_size * cfg.hidden_size
    active: float = total_params - emb - experts
    if experts:
        active += experts * cfg.num_experts_per_tok / cfg.n_routed_experts
    n_attn = len(cfg.layers_of(LayerKind.ATTENTION))
    attn = n_attn * 4 * cfg.num_attention_heads * cfg.head_dim * (tokens + 1) / 2
    return 2.0 * active + attn


# ---- engine steps -------------------------------------------------------------------------
class StepDriver:
    """A pool, a runner, and hand-built scheduled requests with distinct block ids."""

    def __init__(self, model: torch.nn.Module, cfg: ModelConfig, device: torch.device,
                 max_seqs: int, max_tokens: int, kernel_block_size: int) -> None:
        self.geo = CacheGeometry.build(cfg, kernel_block_size=kernel_block_size)
        self.cfg = cfg
        self.max_tokens = max_tokens
        self.attn_blocks = -(-max_tokens // self.geo.block_tokens) if self.geo.has_attention \
            else 0
        n_attn, n_mamba = len(self.geo.attention_groups), len(self.geo.mamba_groups)
        per_seq = n_attn * self.attn_blocks + n_mamba
        self.num_blocks = 1 + max_seqs * per_seq
        self.pool = PoolTensors(self.geo, max(self.num_blocks, 2), device)
        self.runner = ModelRunner(model, self.pool, self.geo.block_tokens, n_attn, n_mamba,
                                  device, Sampler(0))
        self.n_attn, self.n_mamba, self.per_seq = n_attn, n_mamba, per_seq

    def request(self, i: int, tokens: tuple[int, ...], num_computed: int) -> ScheduledRequest:
        base = 1 + i * self.per_seq
        need = -(-(num_computed + len(tokens)) // self.geo.block_tokens)
        attn = tuple(tuple(range(base + g * self.attn_blocks, base + g * self.attn_blocks + need))
                     for g in range(self.n_attn))
        first_state = base + self.n_attn * self.attn_blocks
        mamba = tuple(range(first_state, first_state + self.n_mamba))
        return ScheduledRequest(f"r{i}", tokens, num_computed, attn, mamba, True, GREEDY, 0)

    def step(self, reqs: list[ScheduledRequest]) -> torch.Tensor:
        result = self.runner.execute(SchedulerOutput(tuple(reqs)))
        assert result.sample is not None
        return result.sample.token_ids


def bench_decode(driver: StepDriver, batch: int, context_len: int, steps: int,
                 device: torch.device) -> float:
    """Median ms of one decode step of `batch` sequences at about `context_len` tokens."""
    pos = [context_len]
    # distinct tokens per row: identical rows would all route to the same experts of a MoE
    # layer and read fewer expert bytes than a real batch (MBU above 100% at batch 32)
    toks = [3 + (97 * i) % (driver.cfg.vocab_size - 3) for i in range(batch)]

    def one() -> None:
        reqs = [driver.request(i, (toks[i],), pos[0]) for i in range(batch)]
        out = driver.step(reqs).tolist()
        toks[:] = out
        pos[0] += 1

    return 1e3 * timed(one, device, iters=steps, warmup=2)


def bench_prefill(driver: StepDriver, tokens: int, device: torch.device, iters: int) -> float:
    """Median seconds of one prefill of a single `tokens`-token prompt."""
    gen = torch.Generator().manual_seed(tokens)
    ids = tuple(torch.randint(3, driver.cfg.vocab_size, (tokens,), generator=gen).tolist())
    return timed(lambda: driver.step([driver.request(0, ids, 0)]), device, iters=iters)


# ---- transformers -------------------------------------------------------------------------
def _hf_key(name: str) -> str:
    for ours, theirs in ((".conv_weight", ".conv1d.weight"), (".conv_bias_t", ".conv1d.bias"),
                         (".experts.up", ".experts.up_proj"),
                         (".experts.down", ".experts.down_proj")):
        if name.endswith(ours):
            return name[: -len(ours)] + theirs
    return name + ".weight" if name in ("embeddings", "lm_head") else name


@torch.no_grad()
def transformers_model(model: torch.nn.Module, cfg: ModelConfig,
                       device: torch.device) -> tuple[HFNemotronH, int, int]:
    """transformers' NemotronHForCausalLM of the same shape with our weights copied in;
    returns (model, tensors copied, tensors of theirs left at their own init)."""
    import transformers

    hf_cfg = transformers.NemotronHConfig(**hf_config_dict(cfg))
    dtype = getattr(torch, cfg.dtype)
    with torch.device(device):
        hf = transformers.NemotronHForCausalLM(hf_cfg).to(dtype)
    theirs = hf.state_dict()
    by_suffix = {k.split(".", 1)[1] if k.startswith(("model.", "backbone.")) else k: k
                 for k in theirs}
    copied = 0
    for name, p in model.named_parameters():
        key = by_suffix.get(_hf_key(name))
        if key is not None and theirs[key].numel() == p.numel():
            theirs[key].copy_(p.reshape(theirs[key].shape))
            copied += 1
    return hf.eval(), copied, len(theirs) - copied


@torch.no_grad()
def hf_generate_s(hf: HFNemotronH, batch: int, prompt_len: int, new_tokens: int,
                  device: torch.device) -> float:
    gen = torch.Generator().manual_seed(batch + prompt_len)
    ids = torch.randint(3, 200, (batch, prompt_len), generator=gen).to(device)
    mask = torch.ones_like(ids)

    def run() -> None:
        hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)

    return timed(run, device, iters=1, warmup=1)


# ---- the run ------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> BenchResult:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda but no CUDA device is visible")
    dtype = canonical_dtype(args.dtype) if args.dtype else None
    if args.model:
        cfg = ModelConfig.from_dir(args.model, dtype=dtype)
        label = Path(args.model).name
    else:
        cfg = preset_config(args.preset, args.num_layers, dtype)
        label = args.preset
    if device.type == "cpu" and dtype is None and cfg.dtype != "float32":
        cfg = cfg.with_overrides(dtype="float32")  # bf16 matmuls crawl on CPU
    variants = [Variant.parse(v) for v in args.variants]
    if device.type != "cuda":
        variants = [v for v in variants if not v.graphs] or [Variant(KernelImpl.AUTO, False)]
    model = build_model(cfg, device, args.seed, args.model)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    copy = copy_bandwidth_gbps(device)
    gemm = gemm_tflops(device)
    total, _, _ = _param_bytes(model)
    res = BenchResult(str(device), name, label, cfg.dtype, cfg.num_layers, copy, gemm, total)
    print(f"device {name}: copy {copy:,.0f} GB/s, GEMM {gemm:,.2f} TFLOP/s; model {label} "
          f"{cfg.num_layers} layers {cfg.dtype}, weights {total / 1e9:.2f} GB", flush=True)
    max_batch = max(args.batch_sizes)
    max_tokens = max([args.context_len + args.decode_steps + 8, *args.prefill_lens])
    driver = StepDriver(model, cfg, device, max_batch, max_tokens, args.kernel_block_size)
    for v in variants:
        model.use_kernels(v.kernels)
        driver.runner.graphs = None
        if v.graphs and not model.graph_safe:
            print(f"  {v.name}: skipped, this model's decode step cannot be captured here")
            continue
        if v.graphs:
            driver.runner.capture_decode_graphs(max_batch, max_tokens,
                                                buckets=tuple(args.batch_sizes))
        for b in args.batch_sizes:
            ms = bench_decode(driver, b, args.context_len, args.decode_steps, device)
            nbytes = decode_step_bytes(model, cfg, driver.geo, b, args.context_len)
            m = {"kind": "decode", "variant": v.name, "batch_size": b,
                 "context_len": args.context_len, "ms_per_step": ms,
                 "tok_per_s": 1e3 * b / ms, "bytes_per_step": nbytes,
                 "mbu": nbytes / (ms / 1e3) / (copy * 1e9)}
            res.measurements.append(m)
            print(f"  decode  {v.name:18s} batch {b:4d} ctx {args.context_len:6d}: "
                  f"{ms:9.2f} ms/step {m['tok_per_s']:10,.0f} tok/s  MBU {m['mbu']:6.1%}",
                  flush=True)
        driver.runner.graphs = None  # prefill steps are eager; free the graphs' memory
        if device.type == "cuda":
            torch.cuda.empty_cache()
        for n in args.prefill_lens:
            s = bench_prefill(driver, n, device, args.prefill_iters)
            flops = prefill_flops_per_token(model, cfg, n)
            m = {"kind": "prefill", "variant": v.name, "tokens": n, "tok_per_s": n / s,
                 "ms_per_step": 1e3 * s, "mfu": flops * n / s / (gemm * 1e12)}
            res.measurements.append(m)
            print(f"  prefill {v.name:18s} tokens {n:6d}: {m['tok_per_s']:10,.0f} tok/s  "
                  f"MFU {m['mfu']:6.1%}", flush=True)
    if args.compare_transformers:
        _compare_transformers(args, model, cfg, device, res)
    return res


def _compare_transformers(args: argparse.Namespace, model: torch.nn.Module, cfg: ModelConfig,
                          device: torch.device, res: BenchResult) -> None:
    hf, copied, left = transformers_model(model, cfg, device)
    print(f"  transformers NemotronH: {copied} tensors copied from ours, {left} left at "
          "its own init", flush=True)
    steps = max(2, args.decode_steps)
    for b in args.batch_sizes:
        try:
            t1 = hf_generate_s(hf, b, args.context_len, 1, device)
            tn = hf_generate_s(hf, b, args.context_len, steps + 1, device)
        except torch.OutOfMemoryError:  # its torch fallbacks materialise big temporaries
            _record_oom(res, device, {"kind": "decode", "batch_size": b,
                                      "context_len": args.context_len})
            continue
        ms = 1e3 * max(tn - t1, 1e-9) / steps
        res.measurements.append({"kind": "decode", "variant": "transformers", "batch_size": b,
                                 "context_len": args.context_len, "ms_per_step": ms,
                                 "tok_per_s": 1e3 * b / ms, "mbu": None})
        print(f"  decode  {'transformers':18s} batch {b:4d} ctx {args.context_len:6d}: "
              f"{ms:9.2f} ms/step {1e3 * b / ms:10,.0f} tok/s", flush=True)
    for n in args.prefill_lens:
        try:
            s = hf_generate_s(hf, 1, n, 1, device)
        except torch.OutOfMemoryError:
            _record_oom(res, device, {"kind": "prefill", "tokens": n})
            continue
        res.measurements.append({"kind": "prefill", "variant": "transformers", "tokens": n,
                                 "tok_per_s": n / s, "ms_per_step": 1e3 * s, "mfu": None})
        print(f"  prefill {'transformers':18s} tokens {n:6d}: {n / s:10,.0f} tok/s", flush=True)
    del hf


def _record_oom(res: BenchResult, device: torch.device, where: dict[str, Any]) -> None:
    """A transformers measurement that ran out of device memory: recorded as such, not a crash."""
    res.measurements.append({**where, "variant": "transformers", "error": "out of memory"})
    what = ", ".join(f"{k} {v}" for k, v in where.items() if k != "kind")
    print(f"  {where['kind']:7s} {'transformers':18s} {what}: out of memory", flush=True)
    if device.type == "cuda":
        torch.cuda.empty_cache()


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default=None, help="HF checkpoint directory")
    src.add_argument("--preset", default="tiny",
                     help="random weights of a preset shape, made on the device (default tiny)")
    p.add_argument("--num-layers", type=int, default=None, help="first N layers of the preset")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="weights dtype (default: the model's; "
                   "float32 on CPU)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--context-len", type=int, default=128, help="tokens cached per sequence")
    p.add_argument("--decode-steps", type=int, default=20, help="timed decode steps")
    p.add_argument("--prefill-lens", type=int, nargs="*", default=[512])
    p.add_argument("--prefill-iters", type=int, default=3)
    p.add_argument("--kernel-block-size", type=int, default=16)
    p.add_argument("--variants", nargs="+", default=["auto+graphs"],
                   help="KERNELS+MODE each: KERNELS auto|reference, MODE graphs|eager")
    p.add_argument("--compare-transformers", action="store_true",
                   help="also time transformers' NemotronH on the same weights")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, metavar="OUT", help="write results as JSON")


def _validate(args: argparse.Namespace) -> None:
    if min(args.batch_sizes) < 1 or args.context_len < 1 or args.decode_steps < 1:
        raise BenchError("--batch-sizes, --context-len and --decode-steps must be >= 1")
    if any(n < 1 for n in args.prefill_lens) or args.prefill_iters < 1:
        raise BenchError("--prefill-lens and --prefill-iters must be >= 1")
    if args.num_layers is not None and args.model:
        raise BenchError("--num-layers applies to --preset only")


def main(args: argparse.Namespace) -> int:
    try:
        _validate(args)
        res = run(args)
    except (BenchError, ValueError, FileNotFoundError) as exc:
        print(f"hybridpd bench engine: {exc}")
        return 2
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(res), indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":  # `python -m hybridpd.bench.engine_bench` (no load-generator deps)
    _parser = argparse.ArgumentParser(prog="hybridpd bench engine")
    add_arguments(_parser)
    raise SystemExit(main(_parser.parse_args()))
