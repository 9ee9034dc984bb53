"""One `hybridpd bench` load against a P/D deployment and against co-located instances.

Owns the orchestration of the multi-GPU comparison runs (issues 13 and 14): it starts each
configuration with `hybridpd up` (P/D) or one `hybridpd serve --role both` per GPU group
(co-located, several behind a client-side round-robin: one `hybridpd bench` per instance, their
throughputs summed), runs the same load (dataset, lengths, concurrency levels) against each,
writes every run's JSON and one Pareto PNG per model (output tok/s per GPU vs tok/s per user,
one curve per configuration) through `hybridpd bench --from-json`, and prints a table. It knows
nothing of the engine; it drives the CLIs as a user would.

Usage (on a GPU host; see bench/two_gpu_run.sh and bench/multi_gpu_run.sh):
    python bench/pd_vs_colocated.py --model DIR --config pd:1x1+1x1 --config colo:2x1 \
        --input-len 8192 --output-len 1024 --concurrency 1 4 16 64 --out OUTDIR
Configurations: `pd:NPxPTP+NDxDTP` (NP prefill instances of TP PTP, ND decode of TP DTP) and
`colo:NxTP` (N co-located instances of TP TP). GPUs are handed out in order.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

CLI = [sys.executable, "-m", "hybridpd.cli"]


@dataclass(frozen=True)
class Config:
    kind: str  # "pd" or "colo"
    groups: tuple[tuple[int, int], ...]  # (count, tp) per role: pd -> (P, D); colo -> (N,)

    @property
    def label(self) -> str:
        if self.kind == "pd":
            (np_, ptp), (nd, dtp) = self.groups
            return f"P/D {np_}xTP{ptp} + {nd}xTP{dtp}"
        (n, tp), = self.groups
        return f"co-located {n}xTP{tp}"

    @property
    def num_gpus(self) -> int:
        return sum(n * tp for n, tp in self.groups)


def parse_config(text: str) -> Config:
    m = re.fullmatch(r"pd:(\d+)x(\d+)\+(\d+)x(\d+)", text)
    if m:
        a, b, c, d = map(int, m.groups())
        return Config("pd", ((a, b), (c, d)))
    m = re.fullmatch(r"colo:(\d+)x(\d+)", text)
    if m:
        return Config("colo", ((int(m.group(1)), int(m.group(2))),))
    raise argparse.ArgumentTypeError(f"bad config {text!r}: want pd:NPxPTP+NDxDTP or colo:NxTP")


def _wait_line(path: Path, pattern: str, deadline_s: float, proc: subprocess.Popen) -> str:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            tail = path.read_text()[-2000:]
            raise RuntimeError(f"{proc.args[3]} exited rc={proc.returncode}: {tail}")
        for line in path.read_text().splitlines():
            if re.search(pattern, line):
                return line
        time.sleep(1.0)
    raise TimeoutError(f"no line matching {pattern!r} in {path} within {deadline_s}s")


def _start(argv: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(CLI + argv, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def start_config(cfg: Config, args: argparse.Namespace, out: Path) -> tuple[list, list[str]]:
    """Start one configuration; returns (processes, base URLs to load)."""
    env = dict(os.environ)
    common = ["--max-model-len", str(args.max_model_len),
              "--max-num-batched-tokens", str(args.max_num_batched_tokens),
              "--served-model-name", "bench"]
    tag = re.sub(r"[^A-Za-z0-9]+", "_", cfg.label)
    if cfg.kind == "pd":
        (np_, ptp), (nd, dtp) = cfg.groups
        log = out / f"up_{tag}.log"
        proc = _start(["up", "--model", args.model, "--prefill", str(np_), "--decode", str(nd),
                       "--prefill-tp", str(ptp), "--decode-tp", str(dtp), "--port", "0",
                       *([] if args.cpu else ["--gpus", ",".join(map(str, range(cfg.num_gpus)))]),
                       "--log-dir", str(out / f"logs_{tag}"), *common], log, env)
        line = _wait_line(log, r"^\s+proxy\s+http", args.startup_timeout, proc)
        return [proc], [line.split()[1]]
    (n, tp), = cfg.groups
    procs, urls = [], []
    for i in range(n):
        gpus = ",".join(str(g) for g in range(i * tp, (i + 1) * tp))
        ready = out / f"ready_{tag}_{i}.json"
        ready.unlink(missing_ok=True)
        log = out / f"serve_{tag}_{i}.log"
        genv = env if args.cpu else {**env, "CUDA_VISIBLE_DEVICES": gpus}
        procs.append(_start(["serve", "--model", args.model, "--role", "both", "--port", "0",
                             "--tp", str(tp), "--ready-file", str(ready), *common], log, genv))
    for i, proc in enumerate(procs):
        ready = out / f"ready_{tag}_{i}.json"
        end = time.monotonic() + args.startup_timeout
        while not ready.exists():
            if proc.poll() is not None or time.monotonic() > end:
                raise RuntimeError(f"co-located instance {i} did not start (see its log)")
            time.sleep(1.0)
        urls.append(json.loads(ready.read_text())["url"])
    return procs, urls


def bench_load(cfg: Config, urls: list[str], args: argparse.Namespace, out: Path) -> Path:
    """Run the load; several instances: one bench each at concurrency/len(urls), summed."""
    tag = re.sub(r"[^A-Za-z0-9]+", "_", cfg.label)
    files = []
    benches = []
    for i, url in enumerate(urls):
        conc = [max(1, c // len(urls)) for c in args.concurrency]
        path = out / f"bench_{tag}_{i}.json"
        files.append(path)
        benches.append(subprocess.Popen(CLI + [
            "bench", "--url", url, "--num-requests", str(args.num_requests // len(urls)),
            "--concurrency", *map(str, conc), "--input-len-range", str(args.input_len),
            str(args.input_len), "--output-len", str(args.output_len), "--warmup",
            str(args.warmup), "--num-gpus", str(cfg.num_gpus), "--label", cfg.label,
            "--json", str(path)]))
    for b in benches:
        b.wait()
    merged = out / f"bench_{tag}.json"
    merged.write_text(json.dumps(_sum_runs([json.loads(f.read_text()) for f in files])))
    return merged


def _sum_runs(results: list[dict]) -> dict:
    """Several instances under one load: throughputs add, latency figures come from the first
    (every instance serves the same load shape, so their percentiles agree to noise)."""
    if len(results) == 1:
        return results[0]
    base = results[0]
    for run_idx, run in enumerate(base["runs"]):
        s = run["summary"]
        for key in ("output_throughput", "output_throughput_per_gpu", "request_throughput",
                    "completed", "failed", "total_output_tokens"):
            s[key] = sum(r["runs"][run_idx]["summary"][key] for r in results)
        s["concurrency"] = sum(r["runs"][run_idx]["summary"]["concurrency"] for r in results)
    return base


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="HF model dir (e.g. a demo-model preset)")
    p.add_argument("--config", type=parse_config, action="append", required=True)
    p.add_argument("--input-len", type=int, default=1024)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--num-requests", type=int, default=128)
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--max-model-len", type=int, default=16384)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--startup-timeout", type=float, default=900.0)
    p.add_argument("--out", required=True)
    p.add_argument("--cpu", action="store_true", help="dry run without GPUs (no placement)")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    merged = []
    for cfg in args.config:
        print(f"=== {cfg.label} ({cfg.num_gpus} GPUs)", flush=True)
        procs, urls = start_config(cfg, args, out)
        try:
            merged.append(bench_load(cfg, urls, args, out))
        finally:
            for proc in procs:
                _stop(proc)
    name = f"pareto_{args.input_len}_{args.output_len}"
    subprocess.run(CLI + ["bench", "--from-json", *map(str, merged), "--plot",
                          str(out / f"{name}.png")], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
