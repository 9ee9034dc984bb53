"""Which KV connector an engine's scheduler owns: co-located, prefill or decode.

Owns the one mapping from `Role` to its connector, built from data (the engine's arguments,
the model's vocabulary size, the instance's side-channel address) and its transfer service
(`disagg/transfer_service.py`), so neither the connectors nor the scheduler import the engine.
Knows nothing else.
"""

from __future__ import annotations

from hybridpd.disagg.transfer_service import TransferService
from hybridpd.engine.args import EngineArgs, Role
from hybridpd.engine.decode_side import DecodeConnector
from hybridpd.engine.kv_connector import KVConnector, NoConnector
from hybridpd.engine.prefill_side import PrefillConnector


def make_connector(args: EngineArgs, vocab_size: int, side_channel: str,
                   service: TransferService | None) -> KVConnector:
    if args.role != Role.BOTH and service is None:
        raise ValueError(f"--role {args.role.value} needs a transfer service")
    if args.role == Role.PREFILL:
        assert service is not None
        return PrefillConnector(args, side_channel, service)
    if args.role == Role.DECODE:
        assert service is not None
        return DecodeConnector(args, vocab_size, service)
    return NoConnector()
