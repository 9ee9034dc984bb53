"""The proxy's hand-off header, the replay guard, D's consumed-hand-off set and the binding of a
hand-off to its prompt: pure functions with fake clocks."""

from __future__ import annotations

import pytest

from hybridpd.disagg.auth import (
    AuthError,
    AuthFailure,
    ReplayGuard,
    sign_handoff_request,
    verify_handoff_request,
)
from hybridpd.disagg.consumed import Claim, ConsumedHandoffs, check_binding, claim_or_refuse
from hybridpd.disagg.errors import HandoffRefused
from hybridpd.disagg.params import TransferParams, prompt_digest


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


BODY = b'{"prompt":[1,2,3],"kv_transfer_params":{"do_remote_decode":true}}'


def _failure(fn, *args, **kw) -> AuthFailure:
    with pytest.raises(AuthError) as info:
        fn(*args, **kw)
    return info.value.failure


def test_handoff_header_binds_secret_request_body_and_time() -> None:
    header = sign_handoff_request("s", "rid-1", BODY, now=1000.0)
    verify_handoff_request(header, "s", "rid-1", BODY, now=1001.0)
    assert _failure(verify_handoff_request, None, "s", "rid-1", BODY) == AuthFailure.MISSING
    assert _failure(verify_handoff_request, header, "other", "rid-1", BODY, now=1001.0) \
        == AuthFailure.BAD_MAC
    assert _failure(verify_handoff_request, header, "s", "rid-2", BODY, now=1001.0) \
        == AuthFailure.BAD_MAC
    assert _failure(verify_handoff_request, header, "s", "rid-1", BODY + b" ", now=1001.0) \
        == AuthFailure.BAD_MAC
    assert _failure(verify_handoff_request, header, "s", "rid-1", BODY, now=1100.0) \
        == AuthFailure.STALE
    assert _failure(verify_handoff_request, "garbage", "s", "rid-1", BODY) \
        == AuthFailure.MALFORMED


def test_handoff_header_is_single_use_with_a_guard() -> None:
    guard = ReplayGuard()
    header = sign_handoff_request("s", "rid", BODY, now=50.0)
    verify_handoff_request(header, "s", "rid", BODY, guard, now=50.0)
    assert _failure(verify_handoff_request, header, "s", "rid", BODY, guard, now=50.0) \
        == AuthFailure.REPLAYED


def test_replay_guard_forgets_after_its_ttl_and_stays_bounded() -> None:
    clock = Clock()
    guard = ReplayGuard(ttl_s=10.0, size=3, clock=clock)
    guard.check_and_remember("a")
    with pytest.raises(AuthError):
        guard.check_and_remember("a")
    clock.t = 11.0
    guard.check_and_remember("a")  # expired: (the timestamp check refuses such old frames)
    for n in "bcdef":
        guard.check_and_remember(n)
    assert len(guard) <= 3


def test_a_hand_off_is_consumed_once_until_it_expires() -> None:
    clock = Clock()
    consumed = ConsumedHandoffs(ttl_s=5.0, clock=clock)
    assert consumed.claim("t1") is Claim.FRESH
    assert consumed.claim("t1") is Claim.CONSUMED
    with pytest.raises(HandoffRefused, match="already consumed"):
        claim_or_refuse(consumed, "t1")
    clock.t = 6.0
    assert consumed.claim("t1") is Claim.FRESH  # only after the hand-off is too old anyway
    small = ConsumedHandoffs(ttl_s=5.0, size=2, clock=clock)
    for t in ("a", "b", "c"):
        small.claim(t)
    assert len(small) == 2


def _params(tokens: list[int], issued_at: float) -> TransferParams:
    return TransferParams("r", "P", "127.0.0.1:9", 1, ((1,), (2,)), len(tokens), "n-1",
                          transfer_id="t", prompt_digest=prompt_digest(tokens),
                          issued_at=issued_at)


def test_binding_to_the_prompt_and_the_issue_time() -> None:
    tokens = [5, 6, 7, 8]
    params = _params(tokens, issued_at=1000.0)
    check_binding(params, tokens, signed=True, max_age_s=60.0, now=1010.0)
    with pytest.raises(HandoffRefused, match="another prompt"):
        check_binding(params, [5, 6, 7, 9], signed=True, max_age_s=60.0, now=1010.0)
    with pytest.raises(HandoffRefused, match="issued"):
        check_binding(params, tokens, signed=True, max_age_s=60.0, now=1200.0)
    unbound = TransferParams("r", "P", "127.0.0.1:9", 1, ((1,), (2,)), 4, "n-1",
                             transfer_id="t")
    with pytest.raises(HandoffRefused, match="another prompt"):  # signed, yet no digest
        check_binding(unbound, tokens, signed=True, max_age_s=60.0, now=1010.0)
    check_binding(unbound, tokens, signed=False, max_age_s=60.0)  # insecure dev: nothing to check


def test_new_fields_round_trip_and_are_checked() -> None:
    params = _params([1, 2, 3], issued_at=123.5)
    again = TransferParams.from_dict(params.to_dict())
    assert again == params
    with pytest.raises(ValueError, match="issued_at"):
        TransferParams.from_dict({**params.to_dict(), "issued_at": "soon"})
    assert prompt_digest([1, 2, 3]) != prompt_digest([1, 2, 4])
    assert prompt_digest([1, 2, 3]) != prompt_digest([1, 2, 3, 0])
