"""EngineClient against a scripted fake engine pipe: which requests end with an abort.

The engine must be told to abort whenever the API side stops waiting for a request before the
engine finished it: the client left early, or the client gave up after `output_timeout_s` of
engine silence (that path ends the caller's stream with a finished 504 output of our own).
"""

from __future__ import annotations

import asyncio
import queue
from contextlib import aclosing

from hybridpd.engine.protocol import GenerateOutput, GenerateRequest
from hybridpd.request import FinishReason, SamplingParams
from hybridpd.server import ipc
from hybridpd.server.engine_client import EngineClient
from hybridpd.server.error_status import http_status

WAIT_S = 5.0


class _Conn:
    """The client's end of the pipe: what the fake engine pushes, read with a deadline."""

    def __init__(self) -> None:
        self.inbox: queue.Queue[ipc.FromEngine] = queue.Queue()
        self._head: list[ipc.FromEngine] = []

    def poll(self, timeout_s: float) -> bool:
        if not self._head:
            try:
                self._head.append(self.inbox.get(timeout=timeout_s))
            except queue.Empty:
                return False
        return True

    def recv(self) -> ipc.FromEngine:
        return self._head.pop()


class _FakeProc:
    """Records what the client sends; answers AddRequest per `script` (request id -> outputs)."""

    exitcode = None

    def __init__(self, script: dict[str, list[GenerateOutput]]) -> None:
        self.conn = _Conn()
        self.script = script
        self.sent: list[ipc.ToEngine] = []

    def is_alive(self) -> bool:
        return True

    def send(self, msg: ipc.ToEngine) -> None:
        self.sent.append(msg)
        if isinstance(msg, ipc.AddRequest):
            outs = self.script.get(msg.request.request_id, [])
            if outs:
                self.conn.inbox.put(ipc.Outputs(tuple(outs)))

    def stop(self) -> None:
        pass

    def aborts(self) -> list[str]:
        """Ids aborted (read after `EngineClient.close`, which joins the sender thread)."""
        return [m.request_id for m in self.sent if isinstance(m, ipc.AbortRequest)]


def _req(rid: str) -> GenerateRequest:
    return GenerateRequest(rid, (1, 2, 3), SamplingParams(max_tokens=2))


def _out(rid: str, tok: int, finished: bool) -> GenerateOutput:
    return GenerateOutput(rid, (tok,), finished=finished,
                          finish_reason=FinishReason.LENGTH if finished else None)


async def _run(proc: _FakeProc, rid: str, timeout_s: float, take: int | None = None) -> list:
    client = EngineClient(proc, output_timeout_s=timeout_s)  # type: ignore[arg-type]
    got = []
    try:
        async with aclosing(client.generate(_req(rid))) as stream:
            async for out in stream:
                got.append(out)
                if take is not None and len(got) == take:
                    break
    finally:
        await client.close()
    return got


def test_output_timeout_ends_with_504_and_aborts_in_the_engine():
    proc = _FakeProc({})  # the engine never answers
    got = asyncio.run(_run(proc, "silent", timeout_s=0.3))
    assert len(got) == 1 and got[0].finished
    assert got[0].finish_reason == FinishReason.ERROR and http_status(got[0].error_kind) == 504
    assert proc.aborts() == ["silent"]


def test_a_request_the_engine_finished_is_not_aborted():
    proc = _FakeProc({"done": [_out("done", 5, False), _out("done", 6, True)]})
    got = asyncio.run(_run(proc, "done", timeout_s=WAIT_S))
    assert [o.new_token_ids for o in got] == [(5,), (6,)] and got[-1].finished
    assert proc.aborts() == []


def test_leaving_early_aborts_in_the_engine():
    proc = _FakeProc({"early": [_out("early", 5, False), _out("early", 6, True)]})
    got = asyncio.run(_run(proc, "early", timeout_s=WAIT_S, take=1))
    assert len(got) == 1 and not got[0].finished
    assert proc.aborts() == ["early"]
