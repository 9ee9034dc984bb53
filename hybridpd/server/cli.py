"""`hybridpd serve [MODEL]`: one instance (API process + engine process) of a given role.

Owns the command-line options of an instance (the engine's flags generated from
`EngineArgs`' field metadata: `engine/args.py` is the one source of their names, defaults,
help and choices), validating all of them before anything loads (one line on stderr and exit
code 2 for every configuration mistake: a missing model directory, a config.json of an
unsupported model, no tokenizer, `--max-model-len` above the model's limit, a busy port...),
binding the HTTP port before the model loads, the start-up summary, the request log and the
periodic stats line, and running until SIGINT/SIGTERM. Knows nothing of request handling.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import logging
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hybridpd.config import ConfigError, ModelConfig, check_model_dir
from hybridpd.engine.args import (  # noqa: F401 - parse_bytes & co. are re-exported (launch/)
    EngineArgs,
    cli_options,
    engine_kwargs,
    fraction,
    non_negative,
    parse_bytes,
    port_number,
    positive_float,
)
from hybridpd.env import api_key, kv_secret
from hybridpd.httpkit.bodies import DEFAULT_TIMEOUT_S as DEFAULT_BODY_TIMEOUT_S
from hybridpd.httpkit.cors import add_cors_arguments, cors_policy_from
from hybridpd.httpkit.logs import LEVELS, configure_logging
from hybridpd.httpkit.site import (
    DEFAULT_IDLE_TIMEOUT_S,
    DEFAULT_MAX_CONNECTIONS,
    SiteLimits,
    bind_socket,
    local_url,
    raise_fd_limit,
    wait_for_stop_signal,
    write_ready_file,
)
from hybridpd.server.stats_log import DEFAULT_INTERVAL_S

if TYPE_CHECKING:
    from hybridpd.engine.core import Engine
    from hybridpd.server.serving import ServerConfig

log = logging.getLogger("hybridpd.serve")
WILDCARD_HOSTS = ("", "0.0.0.0", "::", "[::]")
LOOPBACK = "127.0.0.1"
DEFAULT_HOST = "0.0.0.0"  # every interface, as `vllm serve` (`hybridpd up` passes loopback)
DEFAULT_QUEUE_TIMEOUT_S = 60.0


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per `EngineArgs` field that declares one (`engine/args.py:cli_options`)."""
    g = parser.add_argument_group("engine (see engine/args.py)")
    for o in cli_options():
        if o.is_flag:
            g.add_argument(*o.flags, dest=o.dest, action="store_true", default=o.default,
                           help=o.help)
        else:
            g.add_argument(*o.flags, dest=o.dest, type=o.parse or str, choices=o.choices,
                           default=o.default, metavar=o.metavar, help=o.help)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("model_tag", nargs="?", default=None, metavar="MODEL",
      help="Hugging Face checkpoint directory (config.json, *.safetensors, tokenizer.json); "
           "same as --model (default: the embedded demo model)")
    a("--model", default=None, help="the checkpoint directory, as the positional MODEL")
    a("--host", default=DEFAULT_HOST, help="address the HTTP API binds")
    a("--port", type=port_number, default=8000, help="HTTP port (0: ephemeral)")
    a("--served-model-name", nargs="+", default=None, metavar="NAME",
      help="model name(s) the API answers to: the first is reported, each is accepted as "
           "`model` (default: the model directory's name)")
    add_engine_arguments(parser)
    a("--side-channel-host", default=None,
      help="address the P/D side channel binds and advertises (default: --host when it is "
           f"a concrete address, else {LOOPBACK})")
    a("--insecure-dev", action="store_true",
      help="allow --role prefill/decode without HYBRIDPD_KV_SECRET: hand-offs unsigned, side "
           "channel unauthenticated (any local process can read the pools); development only")
    a("--startup-timeout", type=positive_float, default=600.0, metavar="SECONDS",
      help="how long to wait for the engine to load and start")
    a("--ready-file", default=None, metavar="PATH",
      help="once serving, write {url, port, pid} here as JSON (how `hybridpd up` learns the "
           "port a child bound)")
    add_http_bound_arguments(parser)
    a("--queue-timeout", type=non_negative, default=DEFAULT_QUEUE_TIMEOUT_S, metavar="SECONDS",
      help="a request that cannot start within this fails with 503 queue_timeout (the proxy "
           "then tries another instance); 0 disables")
    a("--api-key", default=None,
      help="require 'Authorization: Bearer KEY' on every route but /health, /metrics, "
           "/version (default: $HYBRIDPD_API_KEY, else none)")
    g = parser.add_argument_group("logging")
    g.add_argument("--log-level", choices=LEVELS, default="info",
                   help="level of the 'hybridpd' loggers")
    g.add_argument("--enable-log-requests", action="store_true",
                   help="log one line per request received (id, prompt tokens, sampling "
                        "parameters) and one when it finishes (reason, tokens)")
    g.add_argument("--log-stats-interval", type=positive_float, default=DEFAULT_INTERVAL_S,
                   metavar="SECONDS",
                   help="period of the throughput / queue / KV-cache usage line")
    g.add_argument("--disable-log-stats", action="store_true",
                   help="no periodic throughput / queue line")


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
    add_cors_arguments(parser)


def site_limits_from(args: argparse.Namespace) -> SiteLimits:
    if args.max_connections < 1 or not args.idle_timeout > 0 or not args.body_timeout > 0 \
            or (args.max_body_bytes is not None and args.max_body_bytes < 1):
        raise ConfigError("--max-connections and --max-body-bytes must be >= 1, --idle-timeout "
                          "and --body-timeout > 0")
    return SiteLimits(idle_timeout_s=args.idle_timeout, max_connections=args.max_connections)


def side_channel_host(args: argparse.Namespace) -> str:
    """--side-channel-host, else --host when concrete, else loopback."""
    if args.side_channel_host:
        return str(args.side_channel_host)
    return LOOPBACK if args.host in WILDCARD_HOSTS else str(args.host)


def model_dir_of(args: argparse.Namespace) -> str:
    """MODEL or --model (ConfigError when both are given and differ), else the demo model."""
    tag, flag = args.model_tag, args.model
    if tag and flag and tag != flag:
        raise ConfigError(f"two models given: MODEL {tag!r} and --model {flag!r}")
    if tag or flag:
        return str(tag or flag)
    from hybridpd.demo.embedded import embedded_model_dir

    return str(embedded_model_dir())


def engine_args_from(args: argparse.Namespace, model_dir: str) -> EngineArgs:
    return EngineArgs(
        model_dir=model_dir, **engine_kwargs(vars(args)),
        side_channel_host=side_channel_host(args), kv_secret=kv_secret(),
        queue_timeout_s=args.queue_timeout or None,
    )


def server_config_from(args: argparse.Namespace, model_dir: str,
                       model: ModelConfig | None = None) -> ServerConfig:
    from hybridpd.server.serving import ServerConfig  # the HTTP layer: not on the error paths

    model = model or ModelConfig.from_dir(model_dir)
    limit = model.context_limit(args.max_model_len)
    names = list(args.served_model_name or [Path(model_dir).resolve().name])
    return ServerConfig(model_name=names[0], max_model_len=limit, role=args.role,
                        vocab_size=model.vocab_size, api_key=api_key(args.api_key),
                        deployment_secret=kv_secret(), body_timeout_s=args.body_timeout,
                        max_body_bytes=args.max_body_bytes, model_aliases=tuple(names[1:]),
                        cors=cors_policy_from(args))


@dataclass(frozen=True)
class Plan:
    """Everything `serve` starts from, checked before anything loads."""

    model_dir: str
    model: ModelConfig
    engine: EngineArgs
    server: ServerConfig
    site_limits: SiteLimits


def plan_from(args: argparse.Namespace) -> Plan:
    """Validate every argument without loading anything; ConfigError (one line) if wrong."""
    refused = check_secret(args)
    if refused:
        raise ConfigError(refused)
    limits = site_limits_from(args)
    model_dir = model_dir_of(args)
    model = check_model_dir(model_dir, args.max_model_len, args.dtype)
    try:
        engine = engine_args_from(args, model_dir)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return Plan(model_dir, model, engine, server_config_from(args, model_dir, model), limits)


def build_and_describe(args: EngineArgs) -> Engine:
    """The engine process's factory: build the engine, then log the start-up summary."""
    from hybridpd.engine.core import build_engine_core

    engine = build_engine_core(args)
    log.info("%s", startup_summary(engine))
    return engine


def startup_summary(engine: Engine) -> str:
    """Model, shapes, dtypes, device, pool (blocks, tokens, bytes), role, TP, limits."""
    from hybridpd.config import LayerKind

    cfg, args, ex = engine.model_config, engine.args, engine.executor
    geo = ex.geometry
    worker = getattr(ex, "worker", None) or getattr(getattr(ex, "rank0", None), "worker", None)
    device = getattr(worker, "device", args.device)
    counts = {k: len(cfg.layers_of(k)) for k in LayerKind if cfg.layers_of(k)}
    layers = " + ".join(f"{n} {k.value}" for k, n in counts.items())
    if LayerKind.MOE in counts:
        layers += f" ({cfg.n_routed_experts} experts, top {cfg.num_experts_per_tok})"
    blocks = ex.num_blocks - 1  # block 0 is the null block
    pool_bytes = ex.num_blocks * geo.block_bytes
    return (
        f"engine ready: model {args.model_dir} ({cfg.num_layers} layers: {layers}; hidden "
        f"{cfg.hidden_size}, attention {cfg.num_attention_heads}/{cfg.num_key_value_heads} "
        f"heads x {cfg.head_dim}, Mamba {cfg.mamba_num_heads} heads x {cfg.mamba_head_dim}, "
        f"{cfg.n_groups} groups, state {cfg.ssm_state_size}, vocab {cfg.vocab_size}); dtype "
        f"{cfg.dtype} (SSM state {cfg.ssm_state_dtype}) on {device}; pool {blocks} blocks x "
        f"{geo.block_tokens} tokens = {blocks * geo.block_tokens} tokens "
        f"({pool_bytes / 2**20:.1f} MiB per rank); role {args.role.value}, TP {args.tp_size}; "
        f"max model len {engine.max_model_len}, max seqs {args.max_num_seqs}, max batched "
        f"tokens {args.max_num_batched_tokens}"
    )


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


async def _serve(args: argparse.Namespace, plan: Plan, sock: socket.socket) -> int:
    from hybridpd.server.runtime import start_instance
    from hybridpd.server.stats_log import log_stats_forever
    from hybridpd.tokenizer import Tokenizer

    raise_fd_limit()
    factory = functools.partial(build_and_describe, plan.engine)
    config = plan.server
    port = sock.getsockname()[1]
    log.info("loading %s (%s instance, TP %d) behind http://%s:%d ...", plan.model_dir,
             config.role, plan.engine.tp_size, args.host, port)
    inst = await start_instance(factory, Tokenizer.from_dir(plan.model_dir), config,
                                args.host, port, startup_timeout_s=args.startup_timeout,
                                log_level=args.log_level, site_limits=plan.site_limits,
                                sock=sock, log_requests=args.enable_log_requests)
    names = ", ".join(repr(n) for n in (config.model_name, *config.model_aliases))
    print(f"hybridpd serve: {config.role} instance of {names} on "
          f"{local_url(args.host, inst.port)} (bound to {args.host or '*'})", flush=True)
    if args.ready_file:
        write_ready_file(args.ready_file, args.host, inst.port,
                         {"side_channels": list(inst.proc.side_channels)})
    stats = None if args.disable_log_stats else asyncio.create_task(
        log_stats_forever(inst.client, args.log_stats_interval))
    try:
        # A dead engine keeps the API up (answering 500s, /health 503) until a signal.
        await wait_for_stop_signal()
    finally:
        if stats is not None:
            stats.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await stats
        await inst.stop()
    return 0


def main(args: argparse.Namespace) -> int:
    from hybridpd.server.engine_proc import EngineStartupError

    configure_logging(args.log_level)
    try:
        plan = plan_from(args)
    except ConfigError as e:
        print(f"hybridpd serve: error: {e}", file=sys.stderr)
        return 2
    try:
        sock = bind_socket(args.host, args.port)  # a busy port is found before the model loads
    except OSError as e:
        print(f"hybridpd serve: error: cannot listen on {args.host}:{args.port}: "
              f"{e.strerror or e}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_serve(args, plan, sock))
    except EngineStartupError as exc:
        if exc.config_error:  # e.g. -tp above the GPUs, a share too small, missing weights
            log.debug("%s", exc)
            print(f"hybridpd serve: error: {exc.summary}", file=sys.stderr)
            return 2
        print(str(exc), file=sys.stderr)
        return 1
    finally:
        sock.close()
