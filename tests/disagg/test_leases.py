"""Prefill-side lease bookkeeping: keyed by hand-off id, exact reader accounting under TP,
expiry, release, abort, one reader instance per hand-off, and a ledger that tells D whether
its READ can be trusted."""

from __future__ import annotations

from hybridpd.disagg.leases import LeaseState, LeaseTable, TransferLedger, read_was_valid


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
    assert table.notice("t1", 0, 0, 4, "D") is None
    assert table.notice("t1", 0, 1, 4, "D") is None
    assert table.notice("t1", 1, 2, 4, "D") is None
    assert ledger.get("t1") == (LeaseState.HELD, None)
    assert table.notice("t1", 1, 3, 4, "D") == "req"
    assert ledger.get("t1") == (LeaseState.READ, "D") and len(table) == 0


def test_stale_notice_of_a_reused_request_id_is_ignored():
    table = LeaseTable(10.0, p_tp=1)
    table.hold("same-id", "old")
    assert table.release("old") == "same-id"
    table.hold("same-id", "new")
    assert table.notice("old", 0, 0, 1, "D") is None  # the old reader's late notice
    assert table.holds_request("same-id") and len(table) == 1
    assert table.notice("new", 0, 0, 1, "D") == "same-id"


def test_a_second_reader_instance_cannot_complete_or_trust_a_consumed_hand_off():
    ledger = TransferLedger()
    table = LeaseTable(10.0, p_tp=1, ledger=ledger)
    table.hold("r", "t")
    assert table.notice("t", 0, 0, 2, "D1") is None
    assert table.notice("t", 0, 1, 2, "D2") is None  # another instance: ignored
    assert table.notice("t", 0, 1, 2, "D1") == "r"
    state, by = ledger.get("t")
    assert read_was_valid(state, by, "D1") and not read_was_valid(state, by, "D2")


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
    assert not read_was_valid(*ledger.get("tb"), "D")
    assert read_was_valid(*ledger.get("ta"), "D")  # still held
    assert table.abort("a") and not table.abort("a")
    assert ledger.get("ta")[0] == LeaseState.RELEASED and not read_was_valid(*ledger.get("ta"),
                                                                             "D")
    assert table.notice("tb", 0, 0, 1, "D") is None  # expired: a notice frees nothing twice


def test_ledger_is_bounded():
    ledger = TransferLedger(size=3)
    for i in range(5):
        ledger.set(f"t{i}", LeaseState.READ, "D")
    assert ledger.get("t0") is None and ledger.get("t4") == (LeaseState.READ, "D")
