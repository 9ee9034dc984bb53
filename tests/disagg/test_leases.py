"""Prefill-side lease bookkeeping: keyed by hand-off id, exact reader accounting under TP,
expiry, release, abort, and a ledger that tells D what became of each hand-off."""

from __future__ import annotations

from hybridpd.disagg.leases import LeaseState, LeaseTable, TransferLedger


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_all_readers_of_every_p_rank_must_notify():
    ledger = TransferLedger()
    table = LeaseTable(10.0, p_tp=2, ledger=ledger)
    table.hold("req", "t1")
    # D_TP = 4 reading from P_TP = 2: P rank 0 is read by D ranks 0,1; P rank 1 by 2,3
    assert table.notice("t1", 0, 0, 4) is None
    assert table.notice("t1", 0, 1, 4) is None
    assert table.notice("t1", 1, 2, 4) is None
    assert ledger.get("t1") == LeaseState.HELD
    assert table.notice("t1", 1, 3, 4) == "req"
    assert ledger.get("t1") == LeaseState.READ and len(table) == 0


def test_stale_notice_of_a_reused_request_id_is_ignored():
    table = LeaseTable(10.0, p_tp=1)
    table.hold("same-id", "old")
    assert table.release("old") == "same-id"
    table.hold("same-id", "new")
    assert table.notice("old", 0, 0, 1) is None  # the old reader's late notice
    assert table.holds_request("same-id") and len(table) == 1
    assert table.notice("new", 0, 0, 1) == "same-id"


def test_expiry_renewal_and_ledger_states():
    clock = Clock()
    ledger = TransferLedger()
    table = LeaseTable(1.0, p_tp=1, ledger=ledger, clock=clock)
    table.hold("a", "ta")
    table.hold("b", "tb")
    clock.t = 0.8
    assert table.renew("ta") and not table.renew("unknown")
    clock.t = 1.5
    assert table.expired() == ["b"]
    assert ledger.get("tb") == LeaseState.EXPIRED and not LeaseState.EXPIRED.data_was_valid
    assert ledger.get("ta") == LeaseState.HELD and LeaseState.HELD.data_was_valid
    assert table.abort("a") and not table.abort("a")
    assert ledger.get("ta") == LeaseState.RELEASED
    assert table.notice("tb", 0, 0, 1) is None  # expired: a notice frees nothing twice


def test_ledger_is_bounded():
    ledger = TransferLedger(size=3)
    for i in range(5):
        ledger.set(f"t{i}", LeaseState.READ)
    assert ledger.get("t0") is None and ledger.get("t4") == LeaseState.READ
