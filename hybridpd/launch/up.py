"""`hybridpd up`: a whole local P/D deployment (N prefill + M decode instances + the proxy).

Owns choosing ports, starting the children in order, waiting until all are healthy, printing
the endpoint, and tearing everything down on Ctrl-C / SIGTERM (no orphans, no leftover ports).
`Deployment` is also the context manager tests and `hybridpd demo` use.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import sys
import tempfile
import threading
from dataclasses import dataclass

from hybridpd.launch.procs import Child, free_port, wait_healthy


@dataclass(frozen=True)
class DeploymentSpec:
    model: str | None = None
    num_prefill: int = 1
    num_decode: int = 1
    port: int = 8000
    handoff: str = "first-token"
    on_transfer_failure: str = "recompute"
    prefill_tp: int = 1
    decode_tp: int = 1
    routing: str = "round-robin"
    host: str = "127.0.0.1"
    extra_serve_args: tuple[str, ...] = ()
    startup_timeout_s: float = 600.0
    log_dir: str | None = None


class Deployment:
    def __init__(self, spec: DeploymentSpec) -> None:
        self.spec = spec
        self.prefill: list[Child] = []
        self.decode: list[Child] = []
        self.proxy: Child | None = None
        self.log_dir = spec.log_dir or tempfile.mkdtemp(prefix="hybridpd-up-")

    @property
    def url(self) -> str:
        return f"http://{self.spec.host}:{self.spec.port}"

    @property
    def children(self) -> list[Child]:
        return [*self.prefill, *self.decode, *([self.proxy] if self.proxy else [])]

    def _instance(self, role: str, idx: int, tp: int, model: str) -> Child:
        port = free_port(self.spec.host)
        argv = [
            "serve", "--model", model, "--role", role, "--host", self.spec.host,
            "--port", str(port), "--handoff", self.spec.handoff,
            "--on-transfer-failure", self.spec.on_transfer_failure, "--tp", str(tp),
            *self.spec.extra_serve_args,  # side channels: ephemeral ports, one per rank

        ]
        return Child(f"{role}{idx}", argv, f"http://{self.spec.host}:{port}")

    def start(self) -> Deployment:
        model = self.spec.model or _embedded()
        env = dict(os.environ)
        # one secret per deployment: P signs hand-offs, D accepts only those (disagg/signing.py)
        env.setdefault("HYBRIDPD_KV_SECRET", secrets.token_hex(32))
        self.prefill = [
            self._instance("prefill", i, self.spec.prefill_tp, model)
            for i in range(self.spec.num_prefill)
        ]
        self.decode = [
            self._instance("decode", i, self.spec.decode_tp, model)
            for i in range(self.spec.num_decode)
        ]
        try:
            for c in self.prefill + self.decode:
                c.start(env, self.log_dir)
            wait_healthy(self.prefill + self.decode, self.spec.startup_timeout_s)
            self.proxy = Child(
                "proxy",
                [
                    "proxy", "--host", self.spec.host, "--port", str(self.spec.port),
                    "--routing", self.spec.routing,
                    "--prefill", *[c.url for c in self.prefill],
                    "--decode", *[c.url for c in self.decode],
                ],
                self.url,
            )
            self.proxy.start(env, self.log_dir)
            wait_healthy([self.proxy], 60.0)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for c in reversed(self.children):
            c.stop()

    def __enter__(self) -> Deployment:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


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


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF model dir (default: the embedded demo)")
    p.add_argument("--prefill", type=int, default=1, help="number of prefill instances")
    p.add_argument("--decode", type=int, default=1, help="number of decode instances")
    p.add_argument("--port", type=int, default=8000, help="the proxy's port")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--handoff", choices=["first-token", "n-1"], default="first-token")
    p.add_argument("--on-transfer-failure", choices=["recompute", "fail"], default="recompute")
    p.add_argument("--prefill-tp", type=int, default=1)
    p.add_argument("--decode-tp", type=int, default=1)
    p.add_argument("--routing", choices=["round-robin", "least-loaded"], default="round-robin")
    p.add_argument("--log-dir", default=None, help="children's logs (default: a temp dir)")


def spec_from_args(args: argparse.Namespace) -> DeploymentSpec:
    return DeploymentSpec(
        model=args.model, num_prefill=args.prefill, num_decode=args.decode, port=args.port,
        handoff=args.handoff, on_transfer_failure=args.on_transfer_failure,
        prefill_tp=args.prefill_tp, decode_tp=args.decode_tp, routing=args.routing,
        host=args.host, log_dir=args.log_dir,
    )


def main(args: argparse.Namespace) -> int:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    dep = Deployment(spec_from_args(args))
    print(f"starting {args.prefill} prefill + {args.decode} decode instances "
          f"(logs: {dep.log_dir}) ...", flush=True)
    try:
        dep.start()
    except (RuntimeError, TimeoutError) as e:
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
