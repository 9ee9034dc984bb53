"""The typed hand-off's HTTP edge (server/handoff_edge.py): JSON is parsed, verified and signed
only there; the engine and P/D layers see dataclasses. Units, a source gate, and real HTTP
instances (fake engines) showing a refused hand-off never reaches the engine."""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import typing
from pathlib import Path

import pytest
from fakes import FakeTokenizer, fake_params, make_fake_engine
from http_util import engine_counter, post

from hybridpd.disagg.auth import HANDOFF_AUTH_HEADER, sign_handoff_request
from hybridpd.disagg.handoff import RemoteDecode, RemotePrefill
from hybridpd.disagg.params import HandoffMode, TransferParams
from hybridpd.engine.protocol import GenerateOutput, GenerateRequest
from hybridpd.request import SamplingParams
from hybridpd.server import handoff_edge
from hybridpd.server.runtime import start_instance
from hybridpd.server.serving import ServerConfig

SECRET = "edge-secret"
ROOT = Path(__file__).resolve().parents[2] / "hybridpd"


def _params(rid: str = "r", n: int = 3) -> TransferParams:
    return fake_params(rid, n)


def test_markers_become_the_typed_hand_off() -> None:
    assert handoff_edge.from_request(None, SECRET) is None
    assert handoff_edge.from_request({}, SECRET) is None
    assert handoff_edge.from_request(handoff_edge.prefill_request(), SECRET) == RemoteDecode()
    with pytest.raises(ValueError, match="do_remote_decode .* or do_remote_prefill"):
        handoff_edge.from_request({"foo": 1}, SECRET)
    with pytest.raises(ValueError, match="both"):
        handoff_edge.from_request({"do_remote_decode": True, "do_remote_prefill": True}, None)


def test_signed_answer_round_trips_to_a_verified_remote_prefill() -> None:
    params = _params()
    answer = handoff_edge.to_answer(params, SECRET)
    assert answer is not None and "signature" in answer
    got = handoff_edge.from_request(handoff_edge.decode_request(answer), SECRET)
    assert got == RemotePrefill(params, signed=True)
    assert handoff_edge.first_token(got) == params.first_token
    assert handoff_edge.to_answer(None, SECRET) is None  # the request ended on P


@pytest.mark.parametrize("change", [
    {"block_ids": [[7]]}, {"side_channel": "10.0.0.1:1"}, {"first_token": 1},
    {"prompt_digest": "0" * 64}, {"issued_at": 1.0},
])
def test_forged_or_unsigned_params_are_refused_with_a_secret(change: dict) -> None:
    answer = handoff_edge.to_answer(_params(), SECRET)
    assert answer is not None
    with pytest.raises(ValueError, match="signature is invalid"):
        handoff_edge.from_request(handoff_edge.decode_request({**answer, **change}), SECRET)
    unsigned = handoff_edge.to_answer(_params(), None)
    assert unsigned is not None and "signature" not in unsigned
    with pytest.raises(ValueError, match="not signed"):
        handoff_edge.from_request(handoff_edge.decode_request(unsigned), SECRET)
    other = handoff_edge.to_answer(_params(), "another-deployment")
    assert other is not None
    with pytest.raises(ValueError, match="signature is invalid"):
        handoff_edge.from_request(handoff_edge.decode_request(other), SECRET)


def test_without_a_secret_params_are_parsed_but_not_marked_verified() -> None:
    unsigned = handoff_edge.to_answer(_params(), None)
    assert unsigned is not None
    got = handoff_edge.from_request(handoff_edge.decode_request(unsigned), None)
    assert isinstance(got, RemotePrefill) and not got.signed
    with pytest.raises(ValueError, match="tp_size"):  # malformed: the field is named
        handoff_edge.from_request(handoff_edge.decode_request({**unsigned, "tp_size": "x"}), None)


def test_n_minus_1_hand_off_has_no_first_token() -> None:
    p = dataclasses.replace(_params(), handoff=HandoffMode.N_MINUS_1, first_token=None)
    assert RemotePrefill(p).first_token is None
    assert handoff_edge.first_token(RemotePrefill(p)) is None
    assert handoff_edge.first_token(RemoteDecode()) is None


def test_engine_messages_carry_dataclasses_not_dicts() -> None:
    hints = typing.get_type_hints(GenerateRequest)
    assert hints["handoff"] == typing.Optional[typing.Union[RemoteDecode, RemotePrefill]]  # noqa: UP007, UP045
    out_hint = typing.get_type_hints(GenerateOutput)["kv_transfer_params"]
    assert out_hint == typing.Optional[TransferParams]  # noqa: UP045
    with pytest.raises(TypeError, match="handoff_edge"):
        GenerateRequest("r", (1, 2), SamplingParams(),
                        {"do_remote_decode": True})  # type: ignore[arg-type]


def test_no_dict_typed_hand_off_below_the_http_layer() -> None:
    """engine/ and disagg/ declare no dict-typed hand-off field or parameter, and only the
    HTTP edge signs or verifies hand-offs."""
    typed_dict = re.compile(r"\b(kv_transfer\w*|handoff|hand_off)\s*:\s*(dict|Mapping)\b")
    for layer in ("engine", "disagg"):
        for path in sorted((ROOT / layer).glob("*.py")):
            for i, line in enumerate(path.read_text().splitlines(), 1):
                assert not typed_dict.search(line), f"{path.name}:{i}: {line.strip()}"
    signers = re.compile(r"from hybridpd\.disagg\.signing import .*\b(sign|verify)\b")
    users = sorted(str(p.relative_to(ROOT)) for p in ROOT.rglob("*.py")
                   if signers.search(p.read_text()))
    assert users == ["server/handoff_edge.py"]


# ---- over HTTP: refused at the edge, before anything is queued ---------------------------
def _start(loop_thread, role: str):
    config = ServerConfig(model_name="fake-model", max_model_len=256, role=role,
                          deployment_secret=SECRET)
    factory = functools.partial(make_fake_engine, 0.0, role)
    return loop_thread.call(start_instance(factory, FakeTokenizer(), config,
                                           startup_timeout_s=60.0))


@pytest.fixture(scope="module")
def keyed(loop_thread):
    insts = {role: _start(loop_thread, role) for role in ("prefill", "decode")}
    try:
        yield {role: f"http://127.0.0.1:{i.port}" for role, i in insts.items()}
    finally:
        for i in insts.values():
            loop_thread.call(i.stop())


def _prefill(url: str, rid: str) -> dict:
    raw = json.dumps({"prompt": "hi", "max_tokens": 6,
                      "kv_transfer_params": handoff_edge.prefill_request()}).encode()
    status, body, _ = post(f"{url}/v1/completions", raw=raw, headers={
        "X-Request-Id": rid, HANDOFF_AUTH_HEADER: sign_handoff_request(SECRET, rid, raw)})
    assert status == 200, body
    return body


def test_p_answers_signed_params_and_d_refuses_forgeries_before_its_engine(keyed) -> None:
    kv = _prefill(keyed["prefill"], "e-1")["kv_transfer_params"]
    assert "signature" in kv and kv["request_id"] == "e-1"
    d = keyed["decode"]
    added = engine_counter(d, "added")
    for bad in ({**kv, "block_ids": [[9]]}, {k: v for k, v in kv.items() if k != "signature"}):
        status, body, _ = post(f"{d}/v1/completions", {
            "prompt": "hi", "max_tokens": 6,
            "kv_transfer_params": handoff_edge.decode_request(bad)},
            headers={"X-Request-Id": "e-1"})
        assert status == 400 and body["error"]["param"] == "kv_transfer_params", body
        assert "sign" in body["error"]["message"]
    assert engine_counter(d, "added") == added  # nothing reached D's engine
    status, body, _ = post(f"{d}/v1/completions", {
        "prompt": "hi", "max_tokens": 6, "kv_transfer_params": handoff_edge.decode_request(kv)},
        headers={"X-Request-Id": "e-1"})
    assert status == 200 and body["kv_transfer_stats"]["outcome"] == "ok", body
    assert engine_counter(d, "added") == added + 1
