"""In-process real-engine deployments for proxy tests: a co-located instance and one P/D pair
per hand-off mode (real API process + engine process each, NIXL over UCX loopback), each pair
behind its own proxy. Owns starting them together and stopping everything on the way out."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from harness import LoopThread

from hybridpd.engine.args import EngineArgs
from hybridpd.engine.core import build_engine_core
from hybridpd.httpkit.site import start_site
from hybridpd.proxy.app import build_app
from hybridpd.server.runtime import start_instance
from hybridpd.server.serving import ServerConfig
from hybridpd.tokenizer import Tokenizer

ROLES = (("both", "first-token"), ("prefill", "first-token"), ("decode", "first-token"),
         ("prefill", "n-1"), ("decode", "n-1"))


@contextmanager
def real_deployment(model_dir: str, config: ServerConfig, **engine_args: Any
                    ) -> Iterator[dict[str, Any]]:
    """Yields {"both": co-located URL, "first-token" / "n-1": proxy URL of that mode's P/D
    pair, "instances": the four P/D instance URLs}; every instance runs
    `EngineArgs(**engine_args)` on `model_dir` (CPU, 8 MiB pool, kernel block 4 unless
    given)."""
    lt = LoopThread()
    tok = Tokenizer.from_dir(model_dir)
    base = {"device": "cpu", "cache_memory": 8 << 20, "kernel_block_size": 4,
            "max_model_len": config.max_model_len, **engine_args}

    def factory(role: str, handoff: str) -> functools.partial:
        args = EngineArgs(model_dir=model_dir, role=role, handoff=handoff, **base)
        return functools.partial(build_engine_core, args)

    async def start_all() -> list:
        return await asyncio.gather(*(start_instance(factory(r, h), tok, config,
                                                     startup_timeout_s=120.0)
                                      for r, h in ROLES), return_exceptions=True)

    instances: list = []
    runners = []
    try:
        instances = lt.call(start_all(), timeout=180.0)
        for inst in instances:
            if isinstance(inst, BaseException):
                raise inst
        urls = [f"http://127.0.0.1:{inst.port}" for inst in instances]
        out: dict[str, Any] = {"both": urls[0], "instances": urls[1:]}
        for handoff, (p, d) in (("first-token", urls[1:3]), ("n-1", urls[3:5])):
            runner, port = lt.call(start_site(build_app([p], [d]), "127.0.0.1", 0))
            runners.append(runner)
            out[handoff] = f"http://127.0.0.1:{port}"
        yield out
    finally:
        for runner in runners:
            lt.call(runner.cleanup())
        for inst in instances:
            if not isinstance(inst, BaseException):
                lt.call(inst.stop())
        lt.close()
