"""Train the embedded demo model: a small Nemotron-H that learns the synthetic tasks on CPU.

Owns the training loop (seeded model init, seeded training stream from `tasks`, AdamW with
warm-up and cosine decay, loss on the answer tokens only), a teacher-forced held-out check, and
saving the result as a Hugging Face checkpoint (tokenizer files, config.json, safetensors via
`shards.write_sharded`) that our loader and transformers' `NemotronHForCausalLM` both load.
The forward/backward pass is transformers' pure-torch `NemotronHForCausalLM` (our engine is
inference-only). Must not know serving, HTTP or the engine.

Reproducible: same `TrainSpec` and thread count -> same weights (CPU, deterministic kernels).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from hybridpd.demo import tasks as T
from hybridpd.demo.presets import get_preset
from hybridpd.demo.shards import write_sharded
from hybridpd.demo.tokenizer_files import build_tokenizer, describe, write_tokenizer_files
from hybridpd.demo.weights import tensor_specs
from hybridpd.demo.writer import demo_config

TRAINING_FILE = "training.json"
IGNORE = -100
MICRO_BATCHES = 2  # per step, grouped by length


@dataclass(frozen=True)
class TrainSpec:
    """Everything that determines the trained weights."""

    preset: str = "demo"
    steps: int = 1500
    batch_size: int = 128
    lr: float = 1e-3
    warmup_steps: int = 60
    weight_decay: float = 0.01
    seed: int = 0
    # addition is the slow one to learn: it gets three turns in six
    tasks: tuple[T.Task, ...] = (T.Task.ADD, T.Task.ADD, T.Task.ADD, T.Task.COPY,
                                 T.Task.REVERSE, T.Task.COUNT)
    num_layers: int | None = None

    def validate(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch_size must be >= 1")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not self.tasks:
            raise ValueError("at least one task is needed")
        get_preset(self.preset)


@dataclass
class TrainResult:
    path: Path
    num_params: int
    seconds: float
    threads: int
    final_loss: float
    held_out: dict[str, float] = field(default_factory=dict)  # task -> teacher-forced accuracy


class Encoder:
    """Problems -> padded (input ids, labels) batches; labels only on the answer and EOS."""

    def __init__(self) -> None:
        self.tok = build_tokenizer()
        info = describe(self.tok)
        self.eos, self.pad = info.eos_token_ids[0], info.pad_token_id

    def encode(self, p: T.Problem) -> tuple[list[int], int]:
        prompt = self.tok.encode(p.prompt).ids  # with BOS, as the server tokenizes it
        answer = self.tok.encode(p.answer, add_special_tokens=False).ids + [self.eos]
        return prompt + answer, len(prompt)

    def batch(self, problems: Sequence[T.Problem]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [self.encode(p) for p in problems]
        width = max(len(ids) for ids, _ in rows)
        ids = torch.full((len(rows), width), self.pad, dtype=torch.long)  # [B, L]
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)  # [B, L]
        for i, (seq, n_prompt) in enumerate(rows):
            ids[i, : len(seq)] = torch.tensor(seq)
            # position t predicts token t+1: answer tokens are predicted from n_prompt-1 on
            labels[i, n_prompt - 1 : len(seq) - 1] = torch.tensor(seq[n_prompt:])
        return ids, labels


def build_model(spec: TrainSpec) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A freshly initialised (seeded) transformers NemotronHForCausalLM and its config dict."""
    from transformers import NemotronHConfig, NemotronHForCausalLM

    cfg = demo_config(get_preset(spec.preset), describe(), num_layers=spec.num_layers,
                      dtype="float32")
    torch.manual_seed(spec.seed)
    model = NemotronHForCausalLM(NemotronHConfig(**cfg)).float()
    return model, cfg


def _accumulate(model: torch.nn.Module, enc: Encoder, problems: Sequence[T.Problem],
                device: str, groups: int = MICRO_BATCHES) -> float:
    """Backward of the batch's mean answer-token loss, run as `groups` micro-batches of
    similar length (less padding; the same gradient as one batch). Returns the loss."""
    ordered = sorted(problems, key=lambda p: len(enc.encode(p)[0]))
    size = -(-len(ordered) // groups)
    parts = [enc.batch(ordered[i : i + size]) for i in range(0, len(ordered), size)]
    total = sum(int((labels != IGNORE).sum()) for _, labels in parts)
    loss_sum = 0.0
    for ids, labels in parts:
        ids, labels = ids.to(device), labels.to(device)
        logits = model(input_ids=ids).logits  # [b, L, V]
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
            ignore_index=IGNORE, reduction="sum") / total
        loss.backward()
        loss_sum += loss.item()
    return loss_sum


@torch.no_grad()
def teacher_forced_accuracy(model: torch.nn.Module, enc: Encoder,
                            problems: Sequence[T.Problem], batch_size: int = 128
                            ) -> dict[str, float]:
    """Per task: the share of problems whose every answer token (and EOS) is the argmax, i.e.
    those greedy decoding answers exactly. Also 'all'."""
    was_training, dev = model.training, next(model.parameters()).device
    model.eval()
    right: dict[str, list[bool]] = {}
    for start in range(0, len(problems), batch_size):
        chunk = problems[start : start + batch_size]
        ids, labels = (t.to(dev) for t in enc.batch(chunk))
        pred = model(input_ids=ids).logits.argmax(-1)  # [B, L]
        ok = ((pred == labels) | (labels == IGNORE)).all(dim=1)  # [B]
        for p, good in zip(chunk, ok.tolist()):
            right.setdefault(p.task.value, []).append(good)
    model.train(was_training)
    out = {task: sum(v) / len(v) for task, v in right.items()}
    out["all"] = sum(sum(v) for v in right.values()) / len(problems)
    return out


def _lr_at(step: int, spec: TrainSpec) -> float:
    if step < spec.warmup_steps:
        return spec.lr * (step + 1) / spec.warmup_steps
    frac = (step - spec.warmup_steps) / max(1, spec.steps - spec.warmup_steps)
    return spec.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))


def _checkpoint_name(name: str) -> str:
    """transformers' module name -> checkpoint name (its backbone is `model.` in memory)."""
    return "backbone." + name[len("model."):] if name.startswith("model.") else name


def _checkpoint_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Checkpoint name -> fp32 tensor. transformers keeps a MoE layer's routed experts fused
    (`experts.up_proj` [E, I, H], `experts.down_proj` [E, H, I]); checkpoints name one matrix
    per expert (`experts.{e}.up_proj.weight` [I, H]), which both loaders read."""
    state: dict[str, torch.Tensor] = {}
    for k, v in model.state_dict().items():
        name, t = _checkpoint_name(k), v.detach().float()
        head, _, proj = name.rpartition(".experts.")
        if head and proj in ("up_proj", "down_proj") and t.dim() == 3:
            for e in range(t.shape[0]):
                state[f"{head}.experts.{e}.{proj}.weight"] = t[e].contiguous()
            continue
        state[name] = t.contiguous()
    return state


def save_checkpoint(model: torch.nn.Module, cfg: dict[str, Any], out: Path) -> int:
    """Tokenizer files, config.json and model.safetensors of `model` into `out` (created).
    Returns the parameter count."""
    out.mkdir(parents=True, exist_ok=True)
    write_tokenizer_files(out, model_max_length=cfg["max_position_embeddings"])
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    state = _checkpoint_state(model)
    specs = tensor_specs(cfg)
    missing = [s.name for s in specs if s.name not in state]
    if missing:
        raise RuntimeError(f"model lacks checkpoint tensors {missing[:5]}")
    for s in specs:
        if tuple(state[s.name].shape) != s.shape:
            raise RuntimeError(f"{s.name}: shape {tuple(state[s.name].shape)} != {s.shape}")
    write_sharded(out, specs, lambda s: [state[s.name].reshape(-1)])
    return sum(s.numel for s in specs)


def train(spec: TrainSpec, out_dir: str | Path, *, threads: int | None = None,
          eval_every: int = 0, eval_num: int = 400, device: str = "cpu",
          log: Callable[[str], None] = print) -> TrainResult:
    """Train from scratch per `spec` and save the checkpoint into `out_dir` (must be empty)."""
    spec.validate()
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty")
    threads = threads or min(2, os.cpu_count() or 1)
    saved = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(device == "cpu" or saved[1])
    try:
        return _train(spec, out, threads, eval_every, eval_num, device, log)
    finally:  # process-wide settings: give them back
        torch.set_num_threads(saved[0])
        torch.use_deterministic_algorithms(saved[1])


def _train(spec: TrainSpec, out: Path, threads: int, eval_every: int, eval_num: int,
           device: str, log: Callable[[str], None]) -> TrainResult:
    model, cfg = build_model(spec)
    model.to(device).train()
    enc = Encoder()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embeddings" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embeddings" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": spec.weight_decay},
                             {"params": rest, "weight_decay": 0.0}],
                            lr=spec.lr, betas=(0.9, 0.98), eps=1e-8)
    data = T.stream(T.Split.TRAIN, spec.seed, spec.tasks)
    # tasks may repeat in `spec.tasks` (to weight the mix); the check weighs them equally
    checks = T.held_out(eval_num, seed=spec.seed + 1, tasks=tuple(dict.fromkeys(spec.tasks)))
    t0, ema, loads = time.monotonic(), None, []
    for step in range(spec.steps):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, spec)
        problems = [next(data) for _ in range(spec.batch_size)]
        opt.zero_grad(set_to_none=True)
        loss = _accumulate(model, enc, problems, device)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema = loss if ema is None else 0.95 * ema + 0.05 * loss
        if (step + 1) % 50 == 0 or step + 1 == spec.steps:
            loads.append(os.getloadavg()[0])
            log(f"step {step + 1}/{spec.steps} loss {ema:.4f} "
                f"({time.monotonic() - t0:.0f} s, load {loads[-1]:.1f})")
        if eval_every and (step + 1) % eval_every == 0 and step + 1 < spec.steps:
            acc = teacher_forced_accuracy(model, enc, checks)
            log("  held-out " + " ".join(f"{k} {v:.3f}" for k, v in acc.items()))
    seconds = time.monotonic() - t0
    acc = teacher_forced_accuracy(model, enc, checks)
    log("held-out " + " ".join(f"{k} {v:.3f}" for k, v in acc.items()))
    n_params = save_checkpoint(model.cpu(), cfg, out)
    result = TrainResult(out, n_params, seconds, threads, float(ema or 0.0), acc)
    meta = {"spec": {**asdict(spec), "tasks": [t.value for t in spec.tasks]},
            "threads": threads, "seconds": round(seconds, 1), "num_params": n_params,
            "mean_load_1min": round(sum(loads) / max(1, len(loads)), 2),
            "final_loss": round(result.final_loss, 5),
            "held_out_teacher_forced": {k: round(v, 4) for k, v in acc.items()},
            "torch": torch.__version__}
    (out / TRAINING_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return result


# ---- command line (`hybridpd train-demo`, or python -m hybridpd.demo.train) -----------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    d = TrainSpec()
    p.add_argument("--out", required=True, help="output directory (created; must be empty)")
    p.add_argument("--preset", default=d.preset, help="model shape (a demo preset)")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--tasks", default=",".join(t.value for t in d.tasks),
                   help="comma-separated subset of " + ",".join(t.value for t in T.Task))
    p.add_argument("--num-layers", type=int, default=None, help="first N layers of the preset")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: 2)")
    p.add_argument("--eval-every", type=int, default=0, help="held-out check every N steps")
    p.add_argument("--device", default="cpu", help="torch device (the documented run is cpu)")


def main(args: argparse.Namespace) -> int:
    try:
        spec = TrainSpec(preset=args.preset, steps=args.steps, batch_size=args.batch_size,
                         lr=args.lr, warmup_steps=args.warmup_steps, seed=args.seed,
                         tasks=T.parse_tasks(args.tasks), num_layers=args.num_layers)
        spec.validate()
        result = train(spec, args.out, threads=args.threads, eval_every=args.eval_every,
                       device=args.device)
    except (ValueError, FileExistsError) as exc:
        print(f"hybridpd train-demo: error: {exc}", file=sys.stderr)
        return 2
    print(f"trained {result.num_params / 1e6:.2f}M params in {result.seconds:.0f} s on "
          f"{result.threads} threads; held-out (teacher-forced) {result.held_out['all']:.3f}; "
          f"saved to {result.path}")
    return 0


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="hybridpd train-demo")
    add_arguments(_parser)
    sys.exit(main(_parser.parse_args()))
