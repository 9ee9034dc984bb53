"""Which KV connector an engine's scheduler owns: co-located, prefill or decode.

Owns the one mapping from `Role` to its connector, built from data (the engine's arguments,
the model's vocabulary size, the executor's side channels and P's ledger), so neither the
connectors nor the scheduler import the engine. Knows nothing else.
"""

from __future__ import annotations

from hybridpd.disagg.leases import TransferLedger
from hybridpd.engine.args import EngineArgs, Role
from hybridpd.engine.decode_side import DecodeConnector
from hybridpd.engine.kv_connector import KVConnector, NoConnector
from hybridpd.engine.prefill_side import PrefillConnector


def make_connector(args: EngineArgs, vocab_size: int, side_channels: tuple[str, ...],
                   ledger: TransferLedger | None) -> KVConnector:
    if args.role == Role.PREFILL:
        return PrefillConnector(args, side_channels, ledger)
    if args.role == Role.DECODE:
        return DecodeConnector(args, vocab_size)
    return NoConnector()
