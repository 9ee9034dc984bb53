"""`hybridpd proxy`: the P/D router in front of prefill and decode instances.

Owns the proxy's command-line options (host default 0.0.0.0, as `vllm serve`; `hybridpd up`
passes loopback), binding its port before anything else (a busy port or a bad bound ends in
one line on stderr, exit code 2) and running it until SIGINT/SIGTERM. Knows nothing of
request handling.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
import sys

from hybridpd.config import ConfigError
from hybridpd.engine.args import port_number, positive_float
from hybridpd.httpkit.logs import LEVELS, configure_logging
from hybridpd.proxy.routing import RoutingPolicy
from hybridpd.server.cli import DEFAULT_HOST, add_http_bound_arguments, site_limits_from


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--prefill", nargs="+", required=True, metavar="URL", help="prefill instance base URLs")
    a("--decode", nargs="+", required=True, metavar="URL", help="decode instance base URLs")
    a("--host", default=DEFAULT_HOST, help="address the proxy binds")
    a("--port", type=port_number, default=8000, help="the proxy's port (0: ephemeral)")
    a("--routing", choices=[p.value for p in RoutingPolicy], default="round-robin",
      help="how a request's prefill and decode instances are chosen")
    a("--health-interval", type=positive_float, default=1.0, metavar="SECONDS",
      help="seconds between health checks of the backends")
    a("--log-level", choices=LEVELS, default="info", help="level of the 'hybridpd' loggers")
    a("--ready-file", default=None, metavar="PATH",
      help="once serving, write {url, port, pid} here as JSON (for `hybridpd up`)")
    a("--api-key", default=None,
      help="require 'Authorization: Bearer KEY' on every /v1/* route (forwarded to backends)")
    add_http_bound_arguments(parser)


async def _run(args: argparse.Namespace, sock: socket.socket) -> int:
    from hybridpd.env import kv_secret
    from hybridpd.httpkit.site import (
        local_url,
        raise_fd_limit,
        start_site,
        wait_for_stop_signal,
        write_ready_file,
    )
    from hybridpd.proxy.app import build_app

    raise_fd_limit()
    limits = site_limits_from(args)
    # with the deployment secret the proxy authenticates its hand-off requests to P
    secret = kv_secret()
    if not secret:
        logging.getLogger("hybridpd.proxy").warning(
            "no HYBRIDPD_KV_SECRET: hand-off requests are not authenticated; prefill "
            "instances started with a secret will refuse them (403)")
    app = build_app(args.prefill, args.decode, args.routing, args.health_interval,
                    api_key=args.api_key or None, secret=secret,
                    max_body_bytes=args.max_body_bytes, body_timeout_s=args.body_timeout)
    runner, port = await start_site(app, args.host, args.port, limits, sock=sock)
    print(f"hybridpd proxy on {local_url(args.host, port)} (bound to {args.host or '*'}): "
          f"prefill {args.prefill}, decode {args.decode}, routing {args.routing}", flush=True)
    if args.ready_file:
        write_ready_file(args.ready_file, args.host, port)
    try:
        await wait_for_stop_signal()
    finally:
        await runner.cleanup()
    return 0


def main(args: argparse.Namespace) -> int:
    from hybridpd.httpkit.site import bind_socket

    configure_logging(args.log_level)
    try:
        site_limits_from(args)
        sock = bind_socket(args.host, args.port)
    except ConfigError as e:
        print(f"hybridpd proxy: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"hybridpd proxy: error: cannot listen on {args.host}:{args.port}: "
              f"{e.strerror or e}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_run(args, sock))
    finally:
        sock.close()
