"""Lease bounds and per-READ confirmation: renewals never extend a lease past its maximum
lifetime, notices of another READ of the same hand-off change nothing, and the ledger vouches
only for the READ whose notices completed the hand-off."""

from __future__ import annotations

from hybridpd.disagg.leases import LeaseState, LeaseTable, TransferLedger, read_was_valid


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_renewals_cannot_pin_a_lease_past_its_maximum_lifetime() -> None:
    clock = Clock()
    table = LeaseTable(1.0, p_tp=1, clock=clock, max_lease_s=5.0)
    table.hold("victim-pinning", "t")
    while clock.t < 4.9:
        clock.t += 0.5
        assert table.renew("t")
        assert table.expired() == []
    clock.t = 5.01
    assert table.renew("t")  # still accepted, but it cannot move the hard deadline
    assert table.expired() == ["victim-pinning"]
    assert table.ledger.get("t") == (LeaseState.EXPIRED, None)


def test_default_maximum_is_a_few_lease_periods() -> None:
    table = LeaseTable(2.0, p_tp=1)
    assert table.max_lease_s == 12.0
    assert LeaseTable(2.0, p_tp=1, max_lease_s=1.0).max_lease_s == 2.0  # never below lease_s


def test_only_the_first_read_of_a_hand_off_completes_it() -> None:
    ledger = TransferLedger()
    table = LeaseTable(10.0, p_tp=1, ledger=ledger)
    table.hold("r", "t")
    assert table.notice("t", 0, 0, 2, "D", "n1") is None
    assert table.notice("t", 0, 1, 2, "D", "n2") is None  # same reader, another READ: ignored
    assert table.notice("t", 0, 1, 2, "D", "n1") == "r"
    entry = ledger.entry("t")
    assert entry is not None and (entry.state, entry.reader, entry.nonce) == (
        LeaseState.READ, "D", "n1")
    assert read_was_valid(entry.state, entry.reader, "D", entry.nonce, "n1")
    assert not read_was_valid(entry.state, entry.reader, "D", entry.nonce, "n2")  # a replay
    assert not read_was_valid(entry.state, entry.reader, "D2", entry.nonce, "n1")
    assert read_was_valid(LeaseState.HELD, None, "D", None, "any")  # still held: fine
    assert ledger.is_held("t") is False
