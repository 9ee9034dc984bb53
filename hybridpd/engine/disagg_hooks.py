"""Role hooks: what a prefill or decode instance does differently from a co-located one.

Owns the request-level P/D behaviour the engine core calls at fixed points of a step
(admission, abort, before scheduling, transfer start, end of prefill, first token). The
co-located role uses `ColocatedHooks`, which does nothing. Prefill/decode hooks live in
`engine/prefill_side.py` and `engine/decode_side.py`; `engine/roles.py` picks one per role
(so neither side imports the other, nor this module them). The hooks see the engine only through
`HookHost` (what they may use of it; `engine/core.py`'s `Engine` satisfies it) and never import
`engine/core.py`; blocks are freed only by the scheduler (`Scheduler.finish` / `free_held`).
Knows nothing of tensors.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from hybridpd.engine.args import EngineArgs
from hybridpd.request import FinishReason, Request

if TYPE_CHECKING:
    from hybridpd.config import ModelConfig
    from hybridpd.disagg.commands import TransferCommand, TransferReport
    from hybridpd.disagg.handoff import Handoff
    from hybridpd.disagg.leases import TransferLedger
    from hybridpd.engine.block_manager import BlockManager
    from hybridpd.engine.protocol import ErrorKind, GenerateOutput, TokenLogprob
    from hybridpd.engine.scheduler import Scheduler


class TransferPort(Protocol):
    """The executor's P/D side, as the hooks use it."""

    @property
    def side_channels(self) -> tuple[str, ...]: ...

    @property
    def ledger(self) -> TransferLedger | None: ...

    def transfer(self, cmd: TransferCommand) -> TransferReport: ...


class HookHost(Protocol):
    """What the role hooks may use of the engine that drives them (no back-reference to
    `Engine` itself): its arguments and model config, the scheduler (the only writer of
    request status and the only place blocks are freed), read access to block ids, the
    executor's transfer side, and failing a request with an error output."""

    @property
    def args(self) -> EngineArgs: ...

    @property
    def model_config(self) -> ModelConfig: ...

    @property
    def scheduler(self) -> Scheduler: ...

    @property
    def blocks(self) -> BlockManager: ...  # read block ids; freeing goes through the scheduler

    @property
    def executor(self) -> TransferPort: ...

    def finish_with_error(self, req: Request, message: str, outputs: list[GenerateOutput],
                          kind: ErrorKind) -> None: ...


class ColocatedHooks:
    def __init__(self, engine: HookHost) -> None:
        self.engine = engine

    def on_add(self, req: Request, handoff: Handoff | None) -> bool:
        """Adapt a new request to the role; False: answered already, do not schedule it."""
        if handoff is not None:
            raise ValueError(
                "kv_transfer_params sent to an instance started with --role both; "
                "send P/D requests to --role prefill / --role decode instances"
            )
        return True

    def on_abort(self, request_id: str) -> bool:
        return False

    def before_schedule(self, outputs: list[GenerateOutput]) -> None:
        pass

    def start_transfers(self, request_ids: tuple[str, ...]) -> None:
        assert not request_ids, "co-located engines never wait for remote KV"

    def on_prefill_done(self, req: Request, outputs: list[GenerateOutput]) -> None:
        raise AssertionError("co-located requests always sample")

    def on_first_token(
        self,
        req: Request,
        token: int,
        lp: TokenLogprob | None,
        reason: FinishReason | None,
        outputs: list[GenerateOutput],
    ) -> None:
        raise AssertionError("co-located requests never hold blocks")

    def has_work(self) -> bool:
        return False

    def idle_wait_s(self) -> float | None:
        """The role's say in `Engine.idle_wait_s`: None when it has nothing outstanding, 0
        when its next step answers something, a poll interval while it watches transfers or
        leases (the engine uses it when the scheduler has nothing to compute)."""
        return None

    def knows(self, request_id: str) -> bool:
        return False

    def counters(self) -> dict[str, float]:
        return {}

    def shutdown(self) -> None:
        pass

