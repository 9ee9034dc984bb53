"""The first-token convention (server/handoff_edge.py): what the proxy sends P and D, and which
token D's API replays — from P's real `TransferParams` dicts."""

from __future__ import annotations

from hybridpd.disagg.params import HandoffMode, TransferParams
from hybridpd.server import handoff_edge as handoff


def _params(mode: HandoffMode, first: int | None) -> dict:
    return TransferParams(request_id="r", engine_id="p", side_channel="127.0.0.1:5600",
                          tp_size=1, block_ids=((1, 2), (3,)), num_tokens=7, handoff=mode,
                          first_token=first, transfer_id="t").to_dict()


def test_proxy_requests_round_trip_through_the_predicates() -> None:
    to_p = handoff.prefill_request()
    assert handoff.asks_remote_decode(to_p) and not handoff.asks_remote_prefill(to_p)
    p_answer = _params(HandoffMode.FIRST_TOKEN, 42)
    to_d = handoff.decode_request(p_answer)
    assert handoff.asks_remote_prefill(to_d) and not handoff.asks_remote_decode(to_d)
    assert handoff.transfer_fields(to_d) == p_answer  # D's engine sees exactly P's params
    assert TransferParams.from_dict(handoff.transfer_fields(to_d)).first_token == 42
    assert not handoff.asks_remote_decode(None) and not handoff.asks_remote_prefill({})


def test_first_token_only_from_a_first_token_decode_request() -> None:
    assert handoff.first_token(handoff.decode_request(_params(HandoffMode.FIRST_TOKEN, 0))) == 0
    assert handoff.first_token(handoff.decode_request(_params(HandoffMode.N_MINUS_1, None))) \
        is None
    assert handoff.first_token(_params(HandoffMode.FIRST_TOKEN, 5)) is None  # not marked for D
    assert handoff.first_token(None) is None
    for junk in (True, "5", 5.0, None):  # malformed: D's engine refuses it with the reason
        assert handoff.first_token({"do_remote_prefill": True, "first_token": junk}) is None


def test_hands_off_is_whether_p_left_params() -> None:
    assert handoff.hands_off(_params(HandoffMode.N_MINUS_1, None))
    assert not handoff.hands_off(None)
