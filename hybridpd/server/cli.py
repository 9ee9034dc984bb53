"""`hybridpd serve`: one instance (API process + engine process) of a given role.

Owns the command-line options of an instance, turning them into `EngineArgs` and a
`ServerConfig`, and running until SIGINT/SIGTERM. Knows nothing of request handling.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import logging
import re
import sys
from pathlib import Path

from hybridpd.engine.args import EngineArgs
from hybridpd.env import kv_secret
from hybridpd.httpkit.bodies import DEFAULT_TIMEOUT_S as DEFAULT_BODY_TIMEOUT_S
from hybridpd.httpkit.logs import LEVELS, configure_logging
from hybridpd.httpkit.site import (
    DEFAULT_IDLE_TIMEOUT_S,
    DEFAULT_MAX_CONNECTIONS,
    SiteLimits,
    raise_fd_limit,
    wait_for_stop_signal,
    write_ready_file,
)
from hybridpd.server.serving import ServerConfig

log = logging.getLogger("hybridpd.serve")
WILDCARD_HOSTS = ("", "0.0.0.0", "::", "[::]")
LOOPBACK = "127.0.0.1"
DEFAULT_QUEUE_TIMEOUT_S = 60.0

BYTE_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 1024, "m": 1e6, "mb": 1e6,
              "mib": 1024**2, "g": 1e9, "gb": 1e9, "gib": 1024**3, "t": 1e12, "tb": 1e12,
              "tib": 1024**4}


def parse_bytes(text: str) -> int:
    """'1073741824', '1GiB', '512MiB', '2.5GB' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if m is None or m.group(2).lower() not in BYTE_UNITS:
        raise argparse.ArgumentTypeError(f"not a byte size: {text!r} (e.g. 4GiB, 512MiB)")
    return int(float(m.group(1)) * BYTE_UNITS[m.group(2).lower()])


def fraction(text: str) -> float:
    """A share in (0, 1], e.g. '0.4'."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"not a fraction in (0, 1]: {text!r}")
    return value


def non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0.0:
        raise argparse.ArgumentTypeError(f"not a number >= 0: {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--model", default=None, help="HF checkpoint directory (default: the embedded demo model)")
    a("--role", choices=("both", "prefill", "decode"), default="both")
    a("--host", default="127.0.0.1")
    a("--port", type=int, default=8000)
    a("--handoff", choices=("first-token", "n-1"), default="first-token")
    a("--on-transfer-failure", choices=("recompute", "fail"), default="recompute")
    a("--tp", type=int, default=1, help="tensor-parallel size")
    a("--cache-memory", type=parse_bytes, default=None, help="bytes for the page pool")
    a("--max-num-batched-tokens", type=int, default=512)
    a("--max-num-seqs", type=int, default=64)
    a("--kernel-block-size", type=int, default=16)
    a("--enforce-eager", action="store_true", help="no CUDA graphs for decode steps")
    a("--device", default="auto")
    a("--dtype", default=None)
    a("--side-channel-port", type=int, default=0, help="P/D handshake port (0: ephemeral)")
    a("--side-channel-host", default=None,
      help="address the P/D side channel binds and advertises (default: --host when it is "
           f"a concrete address, else {LOOPBACK})")
    a("--lease-s", type=float, default=_default("lease_s"), metavar="SECONDS",
      help="how long a prefill instance holds a request's state without a renewal from D")
    a("--max-lease-s", type=float, default=None, metavar="SECONDS",
      help="a prefill instance frees a hand-off's state this long after issuing it, however "
           "often D renews (default: 6 x --lease-s)")
    a("--insecure-dev", action="store_true",
      help="allow --role prefill/decode without HYBRIDPD_KV_SECRET: hand-offs unsigned, side "
           "channel unauthenticated (any local process can read the pools); development only")
    a("--transfer-timeout-s", type=float, default=_default("transfer_timeout_s"),
      metavar="SECONDS", help="deadline on one KV transfer (READ)")
    a("--kv-handshake-timeout-s", type=float, default=_default("handshake_timeout_s"),
      metavar="SECONDS", help="deadline on the P/D side-channel handshake")
    a("--log-level", choices=LEVELS, default="info", help="level of the 'hybridpd' loggers")
    a("--max-model-len", type=int, default=None)
    a("--served-model-name", default=None, help="model name in the API (default: dir name)")
    a("--startup-timeout", type=float, default=600.0, help="seconds to wait for the engine")
    a("--gpu-memory-utilization", type=fraction, default=None, metavar="FRACTION",
      help="this instance's share of its GPU's *total* memory (weights + page pool), e.g. 0.4 "
           "for two instances on one GPU; the pool is sized from it, not from free memory "
           "(GPU only; default: 0.85 of the memory free after loading; --cache-memory "
           "overrides both)")
    a("--kv-transport-floor-gbps", type=non_negative, default=None, metavar="GBPS",
      help="calibrated P->D bandwidth below which the pair is called slow (default: "
           "5 GB/s for GPU-to-GPU pairs, none for CPU pairs)")
    a("--kv-require-fast-transport", action="store_true",
      help="refuse a P/D pair whose calibrated bandwidth is below the floor (its requests "
           "then fall back per --on-transfer-failure)")
    a("--ready-file", default=None, metavar="PATH",
      help="once serving, write {url, port, pid} here as JSON (how `hybridpd up` learns the "
           "port a child bound)")
    add_http_bound_arguments(parser)
    a("--queue-timeout", type=non_negative, default=DEFAULT_QUEUE_TIMEOUT_S, metavar="SECONDS",
      help="a request that cannot start within this fails with 503 queue_timeout (the proxy "
           "then tries another instance); 0 disables")
    a("--api-key", default=None,
      help="require 'Authorization: Bearer KEY' on every /v1/* route (and for /v1/abort)")


def add_http_bound_arguments(parser: argparse.ArgumentParser) -> None:
    """HTTP connection and body bounds shared by `serve` and `proxy`."""
    a = parser.add_argument
    a("--idle-timeout", type=non_negative, default=DEFAULT_IDLE_TIMEOUT_S, metavar="SECONDS",
      help="close a connection that sends no complete request head for this long")
    a("--max-connections", type=int, default=DEFAULT_MAX_CONNECTIONS,
      help="open HTTP connections at most; more get a 503 and are closed")
    a("--body-timeout", type=non_negative, default=DEFAULT_BODY_TIMEOUT_S, metavar="SECONDS",
      help="a request body must arrive within this (else 408)")
    a("--max-body-bytes", type=parse_bytes, default=None,
      help="request body limit (default: sized from the model's context)")


def site_limits_from(args: argparse.Namespace) -> SiteLimits:
    if args.max_connections < 1 or not args.idle_timeout > 0 or not args.body_timeout > 0 \
            or (args.max_body_bytes is not None and args.max_body_bytes < 1):
        raise SystemExit("--max-connections and --max-body-bytes must be >= 1, --idle-timeout "
                         "and --body-timeout > 0")
    return SiteLimits(idle_timeout_s=args.idle_timeout, max_connections=args.max_connections)


def _default(field_name: str) -> object:
    return {f.name: f.default for f in dataclasses.fields(EngineArgs)}[field_name]


def side_channel_host(args: argparse.Namespace) -> str:
    """--side-channel-host, else --host when concrete, else loopback."""
    if args.side_channel_host:
        return str(args.side_channel_host)
    return LOOPBACK if args.host in WILDCARD_HOSTS else str(args.host)


def _model_dir(args: argparse.Namespace) -> str:
    if args.model:
        return str(args.model)
    from hybridpd.demo.embedded import embedded_model_dir

    return str(embedded_model_dir())


def engine_args_from(args: argparse.Namespace, model_dir: str) -> EngineArgs:
    return EngineArgs(
        model_dir=model_dir, role=args.role, handoff=args.handoff,
        on_transfer_failure=args.on_transfer_failure, device=args.device, dtype=args.dtype,
        cache_memory=args.cache_memory, kernel_block_size=args.kernel_block_size,
        enforce_eager=args.enforce_eager,
        max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs,
        max_model_len=args.max_model_len, tp_size=args.tp,
        side_channel_host=side_channel_host(args), side_channel_port=args.side_channel_port,
        lease_s=args.lease_s, max_lease_s=args.max_lease_s,
        transfer_timeout_s=args.transfer_timeout_s,
        handshake_timeout_s=args.kv_handshake_timeout_s, kv_secret=kv_secret(),
        gpu_memory_utilization=args.gpu_memory_utilization,
        kv_transport_floor_gbps=args.kv_transport_floor_gbps,
        kv_require_fast_transport=args.kv_require_fast_transport,
        queue_timeout_s=args.queue_timeout or None,
    )


def server_config_from(args: argparse.Namespace, model_dir: str) -> ServerConfig:
    from hybridpd.config import ModelConfig

    model = ModelConfig.from_dir(model_dir)
    limit = model.context_limit(args.max_model_len)
    name = args.served_model_name or Path(model_dir).resolve().name
    return ServerConfig(model_name=name, max_model_len=limit, role=args.role,
                        vocab_size=model.vocab_size, api_key=args.api_key or None,
                        deployment_secret=kv_secret(), body_timeout_s=args.body_timeout,
                        max_body_bytes=args.max_body_bytes)


def check_secret(args: argparse.Namespace) -> str | None:
    """The one-line reason a P/D role must not start, or None (warns when insecure)."""
    if args.role == "both" or kv_secret():
        return None
    if not args.insecure_dev:
        return (f"hybridpd serve: --role {args.role} needs the deployment secret "
                "HYBRIDPD_KV_SECRET (the same value on every instance and the proxy; "
                "`hybridpd up` generates one), or --insecure-dev for local development")
    log.warning("INSECURE: --role %s without HYBRIDPD_KV_SECRET (--insecure-dev): hand-offs "
                "are unsigned and the side channel is unauthenticated; any process that can "
                "reach it can read this instance's KV and SSM state", args.role)
    return None


async def _serve(args: argparse.Namespace) -> int:
    from hybridpd.engine.core import build_engine_core
    from hybridpd.server.runtime import start_instance
    from hybridpd.tokenizer import Tokenizer

    configure_logging(args.log_level)
    refused = check_secret(args)
    if refused:
        print(refused, file=sys.stderr)
        return 2
    site_limits = site_limits_from(args)  # a bad bound ends here, in one line
    raise_fd_limit()
    model_dir = _model_dir(args)
    config = server_config_from(args, model_dir)
    factory = functools.partial(build_engine_core, engine_args_from(args, model_dir))
    inst = await start_instance(factory, Tokenizer.from_dir(model_dir), config, args.host,
                                args.port, startup_timeout_s=args.startup_timeout,
                                log_level=args.log_level, site_limits=site_limits)
    print(f"hybridpd serve: {config.role} instance of {config.model_name!r} on "
          f"http://{args.host}:{inst.port}", flush=True)
    if args.ready_file:
        write_ready_file(args.ready_file, args.host, inst.port,
                         {"side_channels": list(inst.proc.side_channels)})
    try:
        # A dead engine keeps the API up (answering 500s, /health 503) until a signal.
        await wait_for_stop_signal()
    finally:
        await inst.stop()
    return 0


def main(args: argparse.Namespace) -> int:
    from hybridpd.server.engine_proc import EngineStartupError

    try:
        return asyncio.run(_serve(args))
    except EngineStartupError as exc:
        print(str(exc), file=sys.stderr)
        return 1
