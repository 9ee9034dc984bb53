"""One rank's `KVEndpoint` behind its instance's side channel, as an engine builds them: the
endpoint (data plane: NIXL agent, pool, notices) and rank 0's transfer service, which opens
the instance's one side channel from the rank's advert and decides which notices are
believed. Attributes the tests read of the endpoint (`engine_id`, `agent`, `compat`, ...)
are the endpoint's."""

from __future__ import annotations

from typing import Any

from hybridpd.disagg.endpoint import KVEndpoint, ReadNotice
from hybridpd.disagg.instance_channel import ControlMessage
from hybridpd.disagg.leases import TransferLedger
from hybridpd.disagg.transfer_service import TransferService


class Instance:
    def __init__(self, ep: KVEndpoint, secret: str | None = None,
                 serves_reads: bool = True) -> None:
        self.ep = ep
        self.service = TransferService(lease_s=30.0, p_tp=1, reader=ep.engine_id, secret=secret)
        self.address = self.service.open_side_channel(
            ep.engine_id, [ep.advert()], "127.0.0.1", 0, serves_reads=serves_reads)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.ep, name)

    @property
    def ledger(self) -> TransferLedger:
        return self.service.ledger

    def control_messages(self) -> list[ControlMessage]:
        assert self.service.channel is not None
        return self.service.channel.control_messages()

    def read_notices(self) -> list[ReadNotice]:
        """What this P instance believes of the notices that reached its rank."""
        return [n for n in self.ep.read_notices() if self.service.believes(n)]

    @property
    def notices_refused(self) -> int:
        """By the rank (MAC, sender) and by the service (never handshook)."""
        return self.ep.counters["notices_refused"] + self.service.counters["notices_refused"]

    def close(self) -> None:
        self.service.close()
        self.ep.close()
