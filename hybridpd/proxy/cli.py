"""`hybridpd proxy`: the P/D router in front of prefill and decode instances.

Owns the proxy's command-line options and running it until SIGINT/SIGTERM. Knows nothing of
request handling.
"""

from __future__ import annotations

import argparse
import asyncio
import logging

from hybridpd.httpkit.logs import LEVELS, configure_logging
from hybridpd.proxy.routing import RoutingPolicy
from hybridpd.server.cli import add_http_bound_arguments, site_limits_from


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--prefill", nargs="+", required=True, metavar="URL", help="prefill instance base URLs")
    a("--decode", nargs="+", required=True, metavar="URL", help="decode instance base URLs")
    a("--host", default="127.0.0.1")
    a("--port", type=int, default=8000)
    a("--routing", choices=[p.value for p in RoutingPolicy], default="round-robin")
    a("--health-interval", type=float, default=1.0, help="seconds between health checks")
    a("--log-level", choices=LEVELS, default="info", help="level of the 'hybridpd' loggers")
    a("--ready-file", default=None, metavar="PATH",
      help="once serving, write {url, port, pid} here as JSON (for `hybridpd up`)")
    a("--api-key", default=None,
      help="require 'Authorization: Bearer KEY' on every route but /health, /metrics, "
           "/version, and send it to the backends (default: $HYBRIDPD_API_KEY, else none)")
    add_http_bound_arguments(parser)


async def _run(args: argparse.Namespace) -> int:
    from hybridpd.env import api_key, kv_secret
    from hybridpd.httpkit.cors import cors_policy_from
    from hybridpd.httpkit.site import (
        raise_fd_limit,
        start_site,
        wait_for_stop_signal,
        write_ready_file,
    )
    from hybridpd.proxy.app import build_app

    configure_logging(args.log_level)
    raise_fd_limit()
    limits = site_limits_from(args)
    # with the deployment secret the proxy authenticates its hand-off requests to P
    secret = kv_secret()
    if not secret:
        logging.getLogger("hybridpd.proxy").warning(
            "no HYBRIDPD_KV_SECRET: hand-off requests are not authenticated; prefill "
            "instances started with a secret will refuse them (403)")
    app = build_app(args.prefill, args.decode, args.routing, args.health_interval,
                    api_key=api_key(args.api_key), secret=secret,
                    max_body_bytes=args.max_body_bytes, body_timeout_s=args.body_timeout,
                    cors=cors_policy_from(args))
    runner, port = await start_site(app, args.host, args.port, limits)
    print(f"hybridpd proxy on http://{args.host}:{port}: prefill {args.prefill}, "
          f"decode {args.decode}, routing {args.routing}", flush=True)
    if args.ready_file:
        write_ready_file(args.ready_file, args.host, port)
    try:
        await wait_for_stop_signal()
    finally:
        await runner.cleanup()
    return 0


def main(args: argparse.Namespace) -> int:
    return asyncio.run(_run(args))
