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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--prefill", nargs="+", required=True, metavar="URL", help="prefill instance base URLs")
    a("--decode", nargs="+", required=True, metavar="URL", help="decode instance base URLs")
    a("--host", default="127.0.0.1")
    a("--port", type=int, default=8000)
    a("--routing", choices=[p.value for p in RoutingPolicy], default="round-robin")
    a("--health-interval", type=float, default=1.0, help="seconds between health checks")
    a("--log-level", choices=LEVELS, default="info", help="level of the 'hybridpd' loggers")


async def _run(args: argparse.Namespace) -> int:
    from hybridpd.env import kv_secret
    from hybridpd.httpkit.site import start_site, wait_for_stop_signal
    from hybridpd.proxy.app import build_app

    configure_logging(args.log_level)
    # with the deployment secret the proxy authenticates its hand-off requests to P
    secret = kv_secret()
    if not secret:
        logging.getLogger("hybridpd.proxy").warning(
            "no HYBRIDPD_KV_SECRET: hand-off requests are not authenticated; prefill "
            "instances started with a secret will refuse them (403)")
    app = build_app(args.prefill, args.decode, args.routing, args.health_interval,
                    kv_secret=secret)
    runner, port = await start_site(app, args.host, args.port)
    print(f"hybridpd proxy on http://{args.host}:{port}: prefill {args.prefill}, "
          f"decode {args.decode}, routing {args.routing}", flush=True)
    try:
        await wait_for_stop_signal()
    finally:
        await runner.cleanup()
    return 0


def main(args: argparse.Namespace) -> int:
    return asyncio.run(_run(args))
