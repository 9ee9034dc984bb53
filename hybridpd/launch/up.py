"""`hybridpd up`: a whole local P/D deployment (N prefill + M decode instances + the proxy).

Owns turning `up`'s flags into each child's command line (serve flags passed through, per role
where it matters), GPU placement (`gpus.py`: each instance its own GPUs, or explicit shares
with `--share-gpus`), starting the children in order (each binds its own port — ephemeral or
pinned — and reports it in a ready file), waiting until all are healthy, printing the
endpoint, and tearing everything down on Ctrl-C / SIGTERM (no orphans, no leftover ports). The
children exit on their own when `up` dies however it dies (`lifeline.py`). `Deployment` is
also the context manager tests and `hybridpd demo` use.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shlex
import signal
import sys
import tempfile
import threading
from dataclasses import dataclass

from hybridpd.config import check_model_dir
from hybridpd.env import cuda_visible_devices
from hybridpd.launch.gpus import Placement, PlacementError, parse_gpu_list, place_instances
from hybridpd.launch.lifeline import Lifeline
from hybridpd.launch.procs import Child, wait_healthy


@dataclass(frozen=True)
class DeploymentSpec:
    model: str | None = None
    num_prefill: int = 1
    num_decode: int = 1
    port: int = 8000  # the proxy's; 0: ephemeral (the proxy reports the port it bound)
    handoff: str = "first-token"
    on_transfer_failure: str = "recompute"
    prefill_tp: int = 1
    decode_tp: int = 1
    routing: str = "round-robin"
    host: str = "127.0.0.1"
    extra_serve_args: tuple[str, ...] = ()  # every instance
    prefill_serve_args: tuple[str, ...] = ()  # prefill instances (after the common ones)
    decode_serve_args: tuple[str, ...] = ()  # decode instances
    proxy_args: tuple[str, ...] = ()
    startup_timeout_s: float = 600.0
    log_dir: str | None = None
    gpus: tuple[int, ...] | None = None  # None: every visible GPU (none on CPU)
    share_gpus: bool = False
    gpu_memory_utilization: float | None = None
    visible_gpus: int | None = None  # None: ask torch (tests set it)
    instance_base_port: int = 0  # 0: each instance binds an ephemeral port; else base + k
    side_channel_base_port: int = 0  # 0: ephemeral; else instance k's one: base + k * max tp


def instance_argv(spec: DeploymentSpec, k: int, place: Placement, model: str, ready_file: str
                  ) -> list[str]:
    """`hybridpd` argv of instance `k` (prefill first) of `spec`, placed at `place`, reporting
    its bound ports in `ready_file`."""
    port = spec.instance_base_port + k if spec.instance_base_port else 0
    max_tp = max(spec.prefill_tp, spec.decode_tp)
    side = ["--side-channel-port", str(spec.side_channel_base_port + k * max_tp)] \
        if spec.side_channel_base_port else []  # else an ephemeral port (one per instance)
    mem = ["--gpu-memory-utilization", str(place.memory_utilization)] \
        if place.memory_utilization is not None and place.gpus else []
    role_args = spec.prefill_serve_args if place.role == "prefill" else spec.decode_serve_args
    return [
        "serve", "--model", model, "--role", place.role, "--host", spec.host,
        "--port", str(port), "--handoff", spec.handoff,
        "--on-transfer-failure", spec.on_transfer_failure, "--tp", str(place.tp),
        *side, *mem, *spec.extra_serve_args, *role_args, "--ready-file", ready_file,
    ]


def proxy_argv(spec: DeploymentSpec, prefill_urls: list[str], decode_urls: list[str],
               ready_file: str) -> list[str]:
    """`hybridpd` argv of the proxy of `spec` in front of these instances."""
    return [
        "proxy", "--host", spec.host, "--port", str(spec.port), "--routing", spec.routing,
        "--prefill", *prefill_urls, "--decode", *decode_urls, *spec.proxy_args,
        "--ready-file", ready_file,
    ]


class Deployment:
    def __init__(self, spec: DeploymentSpec) -> None:
        self.spec = spec
        self.prefill: list[Child] = []
        self.decode: list[Child] = []
        self.proxy: Child | None = None
        self.placements: list[Placement] = []
        self.log_dir = spec.log_dir or tempfile.mkdtemp(prefix="hybridpd-up-")
        self.lifeline: Lifeline | None = None

    @property
    def url(self) -> str:
        if self.proxy is not None and self.proxy.url:
            return self.proxy.url
        return f"http://{self.spec.host}:{self.spec.port}"

    @property
    def children(self) -> list[Child]:
        return [*self.prefill, *self.decode, *([self.proxy] if self.proxy else [])]

    def plan(self) -> list[Placement]:
        """Every instance's GPUs (PlacementError when they do not fit)."""
        s = self.spec
        visible = _visible_gpu_count() if s.visible_gpus is None else s.visible_gpus
        return place_instances(
            num_prefill=s.num_prefill, num_decode=s.num_decode, prefill_tp=s.prefill_tp,
            decode_tp=s.decode_tp, visible_count=visible,
            gpus=None if s.gpus is None else list(s.gpus), share=s.share_gpus,
            memory_utilization=s.gpu_memory_utilization, parent_visible=cuda_visible_devices(),
        )

    def _instance(self, k: int, place: Placement, model: str) -> Child:
        name = f"{place.role}{place.index}"
        ready = os.path.join(self.log_dir, f"{name}.ready.json")
        child = Child(name, instance_argv(self.spec, k, place, model, ready), ready_file=ready,
                      lifeline=self.lifeline)
        if place.visible is not None:
            child.extra["env"] = {"CUDA_VISIBLE_DEVICES": place.visible}
        return child

    def start(self) -> Deployment:
        self.placements = self.plan()  # before anything starts: a bad layout spawns nothing
        model = self.spec.model or _embedded()
        env = dict(os.environ)
        # one secret per deployment: P signs hand-offs, D accepts only those (disagg/signing.py)
        env.setdefault("HYBRIDPD_KV_SECRET", secrets.token_hex(32))
        os.makedirs(self.log_dir, exist_ok=True)
        self.lifeline = Lifeline()
        children = [self._instance(k, p, model) for k, p in enumerate(self.placements)]
        self.prefill = [c for c, p in zip(children, self.placements) if p.role == "prefill"]
        self.decode = [c for c, p in zip(children, self.placements) if p.role == "decode"]
        try:
            for c in self.prefill + self.decode:
                c.start({**env, **c.extra.get("env", {})}, self.log_dir)
            wait_healthy(self.prefill + self.decode, self.spec.startup_timeout_s)
            ready = os.path.join(self.log_dir, "proxy.ready.json")
            argv = proxy_argv(self.spec, [c.url for c in self.prefill],
                              [c.url for c in self.decode], ready)
            self.proxy = Child("proxy", argv, ready_file=ready, lifeline=self.lifeline)
            self.proxy.start(env, self.log_dir)
            wait_healthy([self.proxy], 60.0)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for c in reversed(self.children):
            c.stop()
        if self.lifeline is not None:
            self.lifeline.close()
            self.lifeline = None

    def __enter__(self) -> Deployment:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _visible_gpu_count() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0


def _report_health(dep: Deployment, unhealthy: set[str]) -> None:
    """Say once when a child stops answering /health 200 (e.g. its engine died; the proxy
    routes around it) and once when it recovers."""
    for c in dep.children:
        ok = c.healthy(timeout_s=2.0)
        if not ok and c.name not in unhealthy:
            unhealthy.add(c.name)
            print(f"warning: {c.name} is unhealthy (see {c.log_path})", file=sys.stderr,
                  flush=True)
        elif ok and c.name in unhealthy:
            unhealthy.discard(c.name)
            print(f"{c.name} is healthy again", flush=True)


def _embedded() -> str:
    from hybridpd.demo.embedded import embedded_model_dir

    return str(embedded_model_dir())


# serve flags `up` passes through to every instance (dest, flag); `--prefill-X` / `--decode-X`
# variants of PER_ROLE override them for one role
PASS_THROUGH = (
    ("cache_memory", "--cache-memory"), ("max_model_len", "--max-model-len"),
    ("dtype", "--dtype"), ("max_num_batched_tokens", "--max-num-batched-tokens"),
    ("max_num_seqs", "--max-num-seqs"), ("served_model_name", "--served-model-name"),
    ("log_level", "--log-level"), ("kernel_block_size", "--kernel-block-size"),
    ("lease_s", "--lease-s"), ("transfer_timeout_s", "--transfer-timeout-s"),
    ("kv_transport_floor_gbps", "--kv-transport-floor-gbps"),
    ("log_stats_interval", "--log-stats-interval"),
)
PER_ROLE = ("cache_memory", "max_num_batched_tokens", "max_num_seqs")
FLAGS = ("kv_require_fast_transport", "enable_log_requests", "disable_log_stats")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from hybridpd.engine.args import DType, positive_float
    from hybridpd.httpkit.logs import LEVELS
    from hybridpd.server.cli import fraction, non_negative, parse_bytes

    p.add_argument("--model", default=None, help="HF model dir (default: the embedded demo)")
    p.add_argument("--prefill", type=int, default=1, help="number of prefill instances")
    p.add_argument("--decode", type=int, default=1, help="number of decode instances")
    p.add_argument("--port", type=int, default=8000, help="the proxy's port (0: ephemeral)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address of the proxy and of every instance (loopback: a local "
                        "deployment; `serve` and `proxy` alone default to 0.0.0.0)")
    p.add_argument("--handoff", choices=["first-token", "n-1"], default="first-token",
                   help="P/D hand-off mode (see `hybridpd serve --help`)")
    p.add_argument("--on-transfer-failure", choices=["recompute", "fail"], default="recompute",
                   help="what decode instances do when a KV transfer fails")
    p.add_argument("--prefill-tp", type=int, default=1, help="TP size of prefill instances")
    p.add_argument("--decode-tp", type=int, default=1, help="TP size of decode instances")
    p.add_argument("--routing", choices=["round-robin", "least-loaded"], default="round-robin",
                   help="the proxy's choice of instances")
    p.add_argument("--log-dir", default=None, help="children's logs (default: a temp dir)")
    g = p.add_argument_group("GPU placement")
    g.add_argument("--gpus", default=None, metavar="IDS",
                   help="comma-separated GPU indices; each instance gets its own (its TP size "
                        "of them), prefill instances first (default: every visible GPU; none "
                        "on CPU)")
    g.add_argument("--share-gpus", action="store_true",
                   help="allow several instances on one GPU (needs --gpu-memory-utilization)")
    g.add_argument("--gpu-memory-utilization", type=fraction, default=None, metavar="FRACTION",
                   help="each instance's share of its GPU's total memory")
    g = p.add_argument_group("ports (default: each child binds an ephemeral port and reports it)")
    g.add_argument("--instance-base-port", type=int, default=0, metavar="PORT",
                   help="instance k (prefill first) listens on PORT + k")
    g.add_argument("--side-channel-base-port", type=int, default=0, metavar="PORT",
                   help="instance k's side channel (one per instance) on PORT + k * max TP")
    g = p.add_argument_group("passed to every instance (see `hybridpd serve --help`)")
    same = "as `hybridpd serve` (default: serve's)"
    g.add_argument("--cache-memory", type=parse_bytes, default=None, help=same)
    g.add_argument("--max-model-len", type=int, default=None, help=same)
    g.add_argument("--dtype", default=None, choices=[d.value for d in DType], help=same)
    g.add_argument("--max-num-batched-tokens", type=int, default=None, help=same)
    g.add_argument("--max-num-seqs", type=int, default=None, help=same)
    g.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME", help=same)
    g.add_argument("--log-level", choices=LEVELS, default=None,
                   help="instances and proxy (default: serve's)")
    g.add_argument("--kernel-block-size", type=int, default=None, help=same)
    g.add_argument("--lease-s", type=float, default=None, help=same)
    g.add_argument("--transfer-timeout-s", type=float, default=None, help=same)
    g.add_argument("--kv-transport-floor-gbps", type=non_negative, default=None, help=same)
    g.add_argument("--kv-require-fast-transport", action="store_true", help=same)
    g.add_argument("--enable-log-requests", action="store_true", help=same)
    g.add_argument("--disable-log-stats", action="store_true", help=same)
    g.add_argument("--log-stats-interval", type=positive_float, default=None, metavar="SECONDS",
                   help=same)
    g.add_argument("--serve-args", default="", metavar="'ARGS'",
                   help="more `serve` flags for every instance, one shell-quoted string")
    for role in ("prefill", "decode"):
        g = p.add_argument_group(f"{role} instances only (override the common value)")
        g.add_argument(f"--{role}-cache-memory", type=parse_bytes, default=None,
                       help=f"--cache-memory of {role} instances")
        g.add_argument(f"--{role}-max-num-batched-tokens", type=int, default=None,
                       help=f"--max-num-batched-tokens of {role} instances")
        g.add_argument(f"--{role}-max-num-seqs", type=int, default=None,
                       help=f"--max-num-seqs of {role} instances")
        g.add_argument(f"--{role}-serve-args", default="", metavar="'ARGS'",
                       help=f"more `serve` flags for {role} instances, one shell-quoted string")


def _flags(args: argparse.Namespace, prefix: str = "") -> list[str]:
    out: list[str] = []
    for dest, flag in PASS_THROUGH:
        if prefix and dest not in PER_ROLE:
            continue
        value = getattr(args, prefix.replace("-", "_") + dest, None)
        if isinstance(value, list | tuple):
            out += [flag, *map(str, value)]
        elif value is not None:
            out += [flag, str(value)]
    if not prefix:
        out += [f"--{d.replace('_', '-')}" for d in FLAGS if getattr(args, d, False)]
    return out


def spec_from_args(args: argparse.Namespace) -> DeploymentSpec:
    """The deployment `up`'s flags describe; ValueError (one line) on a bad value."""
    common = [*_flags(args), *shlex.split(args.serve_args)]
    per_role = {role: (*_flags(args, f"{role}-"), *shlex.split(getattr(args, f"{role}_serve_args")))
                for role in ("prefill", "decode")}
    return DeploymentSpec(
        model=args.model, num_prefill=args.prefill, num_decode=args.decode, port=args.port,
        handoff=args.handoff, on_transfer_failure=args.on_transfer_failure,
        prefill_tp=args.prefill_tp, decode_tp=args.decode_tp, routing=args.routing,
        host=args.host, log_dir=args.log_dir, extra_serve_args=tuple(common),
        prefill_serve_args=per_role["prefill"], decode_serve_args=per_role["decode"],
        proxy_args=("--log-level", args.log_level) if args.log_level else (),
        gpus=None if args.gpus is None else tuple(parse_gpu_list(args.gpus)),
        share_gpus=args.share_gpus, gpu_memory_utilization=args.gpu_memory_utilization,
        instance_base_port=args.instance_base_port,
        side_channel_base_port=args.side_channel_base_port,
    )


def _check(spec: DeploymentSpec) -> None:
    if spec.num_prefill < 1 or spec.num_decode < 1:
        raise ValueError("--prefill and --decode need at least 1 instance each")
    if spec.prefill_tp < 1 or spec.decode_tp < 1:
        raise ValueError("--prefill-tp and --decode-tp must be >= 1")
    u = spec.gpu_memory_utilization
    if u is not None and not 0.0 < u <= 1.0:
        raise ValueError(f"--gpu-memory-utilization must be in (0, 1], got {u}")
    for name, port in (("--port", spec.port), ("--instance-base-port", spec.instance_base_port),
                       ("--side-channel-base-port", spec.side_channel_base_port)):
        if not 0 <= port < 65536:
            raise ValueError(f"{name} must be a port number, got {port}")


def main(args: argparse.Namespace) -> int:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        spec = spec_from_args(args)
        _check(spec)
        if spec.model is not None:  # before any child starts: a bad model ends here
            check_model_dir(spec.model, args.max_model_len, args.dtype)
        dep = Deployment(spec)
        placements = dep.plan()
    except (PlacementError, ValueError) as e:
        print(f"hybridpd up: {e}", file=sys.stderr)
        return 2
    print(f"starting {args.prefill} prefill + {args.decode} decode instances "
          f"(logs: {dep.log_dir}) ...", flush=True)
    for p in placements:
        where = f"GPU {','.join(map(str, p.gpus))}" if p.gpus else "CPU"
        share = "" if p.memory_utilization is None or not p.gpus else \
            f" ({p.memory_utilization:.0%} of its memory)"
        print(f"  {p.role}{p.index}: TP {p.tp} on {where}{share}", flush=True)
    try:
        dep.start()
    except (RuntimeError, TimeoutError, PlacementError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"hybridpd is up: OpenAI endpoint {dep.url}/v1  (Ctrl-C to stop)", flush=True)
    for c in dep.children:
        print(f"  {c.name:10s} {c.url}", flush=True)
    try:
        unhealthy: set[str] = set()
        while not stop.wait(1.0):
            dead = [c.name for c in dep.children if not c.alive()]
            if dead:
                print(f"error: {', '.join(dead)} exited; shutting down", file=sys.stderr)
                return 1
            _report_health(dep, unhealthy)
    finally:
        print("shutting down ...", flush=True)
        dep.stop()
    return 0
