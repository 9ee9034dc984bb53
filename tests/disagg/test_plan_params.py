"""TransferParams / PeerGeometry: JSON round trips and rejection of bad network input."""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "cache"))

import pytest  # noqa: E402
from cache_testlib import NANO_30B, PATTERN_30B, model  # noqa: E402

from hybridpd.cache.geometry import CacheGeometry  # noqa: E402
from hybridpd.disagg.params import (  # noqa: E402
    PROTOCOL_VERSION,
    HandoffMode,
    PeerGeometry,
    TransferParams,
)


def _params(**over) -> TransferParams:
    kw = dict(request_id="r1", engine_id="p-0", side_channel="10.0.0.1:5600",
              tp_size=2, block_ids=((4, 9, 2), (7,), (8,)), num_tokens=2100,
              handoff=HandoffMode.FIRST_TOKEN, first_token=17, transfer_id="t-1")
    kw.update(over)
    return TransferParams(**kw)


def _wire(obj) -> dict:
    return json.loads(json.dumps(obj.to_dict()))


def test_transfer_params_round_trip_through_json():
    p = _params()
    back = TransferParams.from_dict(_wire(p))
    assert back == p and back.protocol_version == PROTOCOL_VERSION
    n1 = _params(handoff=HandoffMode.N_MINUS_1, first_token=None)
    assert TransferParams.from_dict(_wire(n1)) == n1


@pytest.mark.parametrize(
    "key, value",
    [
        ("tp_size", "2"), ("tp_size", True), ("tp_size", 2.0), ("num_tokens", -1),
        ("block_ids", [[4, 0]]), ("block_ids", [4, 9]), ("block_ids", [["4"]]),
        ("side_channel", "nohost"), ("side_channel", ["h:1"]), ("side_channel", "h:0"),
        ("handoff", "magic"), ("protocol_version", PROTOCOL_VERSION + 1), ("first_token", "x"),
        ("first_token", None), ("request_id", 5),
    ],
)
def test_transfer_params_rejects_bad_fields(key, value):
    d = _wire(_params())
    d[key] = value
    with pytest.raises(ValueError):
        TransferParams.from_dict(d)


@pytest.mark.parametrize("key", ["request_id", "engine_id", "side_channel", "tp_size",
                                 "block_ids", "num_tokens", "handoff", "protocol_version",
                                 "first_token"])
def test_transfer_params_rejects_missing_fields(key):
    d = _wire(_params())
    del d[key]
    with pytest.raises(ValueError, match=key):
        TransferParams.from_dict(d)
    with pytest.raises(ValueError):
        TransferParams.from_dict([d])


def _peer(tp: int = 4, rank: int = 2, kb: int = 32) -> PeerGeometry:
    geo = CacheGeometry.build(model(NANO_30B, PATTERN_30B), tp, rank, kb)
    return PeerGeometry.from_cache(geo, 1000, 0x7F00_0000_0000)


def test_peer_geometry_round_trip_carries_what_the_planner_needs():
    peer = _peer()
    d = _wire(peer)
    back = PeerGeometry.from_dict(d)
    assert back == peer
    g = back.geometry
    assert (g.tp_size, g.tp_rank, g.kv_head_start, g.kv_heads_local) == (4, 2, 1, 1)
    assert d["derived"]["page_bytes"] == g.page_bytes and d["nbytes"] == 1000 * g.block_bytes
    assert d["derived"]["blocks_per_logical"] == g.r and g.kernel_block_size == 32
    assert d["compat_hash"] == _peer(1, 0, 16).compat_hash  # TP and kb are not hashed


@pytest.mark.parametrize(
    "path, value",
    [
        (("geometry", "head_dim"), 64),  # changes bytes but not the advertised hash
        (("geometry", "kv_dtype"), "float32"),
        (("geometry", "kv_dtype"), "int4"),
        (("geometry", "tp_size"), "4"),
        (("geometry", "attention_groups"), "0,1"),
        (("geometry", "group_size"), 2),
        (("derived", "page_bytes"), 4096),
        (("derived", "ssm_offset"), 0),
        (("nbytes",), 1),
        (("compat_hash",), "0" * 64),
        (("num_blocks",), 1),
        (("base_addr",), -5),
    ],
)
def test_peer_geometry_rejects_inconsistent_or_bad_input(path, value):
    d = _wire(_peer())
    node = d
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(ValueError):
        PeerGeometry.from_dict(d)


def test_peer_geometry_rejects_missing_geometry_field():
    d = _wire(_peer())
    del d["geometry"]["ssm_dtype"]
    with pytest.raises(ValueError, match="ssm_dtype"):
        PeerGeometry.from_dict(d)


def test_transfer_params_normalizes_lists_from_the_engine():
    p = _params(side_channel="a:1", block_ids=[[4, 9], [7]], handoff="n-1",
                first_token=None)
    assert p.block_ids == ((4, 9), (7,)) and p.side_channel == "a:1"
    assert p.handoff is HandoffMode.N_MINUS_1
    with pytest.raises(ValueError, match="first_token"):
        _params(first_token=None)


def test_transfer_params_need_a_clean_transfer_id_when_state_moves():
    with pytest.raises(ValueError, match="transfer_id"):
        _params(transfer_id="")
    with pytest.raises(ValueError, match="transfer_id"):
        _params(transfer_id="a|b")
    assert _params(num_tokens=0, transfer_id="", block_ids=((), (), ())).transfer_id == ""
