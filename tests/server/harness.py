"""Run aiohttp apps and instances on a background event loop, for synchronous tests."""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Coroutine
from typing import Any

from fakes import FakeTokenizer, make_fake_engine

from hybridpd.server.runtime import RunningInstance, start_instance
from hybridpd.server.serving import ServerConfig

CALL_TIMEOUT_S = 60.0
MODEL = "fake-model"


class LoopThread:
    """An asyncio loop in a daemon thread; `call` runs a coroutine on it and waits."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def call(self, coro: Coroutine[Any, Any, Any], timeout: float = CALL_TIMEOUT_S) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5.0)
        self.loop.close()


def start_fake_instance(
    lt: LoopThread, delay_s: float = 0.0, engine_id: str = "fake", role: str = "both",
    max_model_len: int = 256, tokenizer: Any = None,
) -> RunningInstance:
    factory = functools.partial(make_fake_engine, delay_s, engine_id)
    config = ServerConfig(model_name=MODEL, max_model_len=max_model_len, role=role)
    tok = tokenizer if tokenizer is not None else FakeTokenizer()
    return lt.call(start_instance(factory, tok, config, startup_timeout_s=60.0))
