"""The proxy's operator surface over real HTTP, in front of keyed fake instances (real engine
processes, the demo model's tokenizer, a deployment secret): the API key required of clients
and sent to the backends, /version, /tokenize and /detokenize forwarded, /v1/abort sent to both
legs, /v1/pool aggregated, CORS preflights, and a backend's 4xx counted as the client's error
apart from backend errors."""

from __future__ import annotations

import functools
import json

import pytest
from fakes import make_fake_engine
from harness import MODEL, LoopThread
from http_util import get, metric_value, request, wait_until
from test_proxy_abuse import Backend
from test_proxy_abuse import Deployment as ScriptedDeployment

import hybridpd
from hybridpd.demo.embedded import SHIPPED_DIR
from hybridpd.disagg.auth import HANDOFF_AUTH_HEADER, sign_handoff_request
from hybridpd.httpkit.cors import CorsPolicy
from hybridpd.httpkit.site import start_site
from hybridpd.proxy.app import build_app
from hybridpd.server.runtime import start_instance
from hybridpd.server.serving import ServerConfig
from hybridpd.tokenizer import Tokenizer

KEY = "proxy-and-instances-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
SECRET = "deployment-secret"
ORIGIN = "https://ui.example"


class Keyed:
    """One keyed prefill and one keyed decode instance behind a keyed proxy."""

    def __init__(self) -> None:
        self.lt = LoopThread()
        self.instances, self.runners, self.urls = [], [], {}
        tokenizer = Tokenizer.from_dir(SHIPPED_DIR)
        for role in ("prefill", "decode"):
            config = ServerConfig(model_name=MODEL, max_model_len=256, role=role, api_key=KEY,
                                  deployment_secret=SECRET)
            factory = functools.partial(make_fake_engine, 0.0, role)
            inst = self.lt.call(start_instance(factory, tokenizer, config,
                                               startup_timeout_s=60.0))
            self.instances.append(inst)
            self.urls[role] = f"http://127.0.0.1:{inst.port}"
        app = build_app([self.urls["prefill"]], [self.urls["decode"]], health_interval_s=0.2,
                        api_key=KEY, secret=SECRET, cors=CorsPolicy(allowed_origins=(ORIGIN,)))
        runner, port = self.lt.call(start_site(app, "127.0.0.1", 0))
        self.runners.append(runner)
        self.proxy = f"http://127.0.0.1:{port}"

    def close(self) -> None:
        for runner in self.runners:
            self.lt.call(runner.cleanup())
        for inst in self.instances:
            self.lt.call(inst.stop())
        self.lt.close()


@pytest.fixture(scope="module")
def dep():
    d = Keyed()
    try:
        yield d
    finally:
        d.close()


def post(url: str, body: object, headers: dict[str, str] | None = None):
    return request("POST", url, body, headers={**AUTH, **(headers or {})})


def test_the_key_is_required_of_clients_and_sent_to_the_backends(dep):
    body = {"model": MODEL, "prompt": [5, 6, 7], "max_tokens": 4}
    status, answer, _ = request("POST", f"{dep.proxy}/v1/completions", body)
    assert status == 401 and answer["error"]["type"] == "authentication_error"
    status, answer, _ = post(f"{dep.proxy}/v1/completions", body)
    assert status == 200 and answer["usage"]["completion_tokens"] == 4, answer
    # the proxy's own calls (the model card it learns limits and model_name from) were keyed
    text = get(f"{dep.proxy}/metrics")[1]
    assert metric_value(text, "hybridpd_proxy_requests_total", outcome="ok",
                        model_name=MODEL) >= 1
    for path in ("/health", "/metrics", "/version"):
        assert get(f"{dep.proxy}{path}")[0] == 200, path


def test_version(dep):
    assert get(f"{dep.proxy}/version")[1] == {"version": hybridpd.__version__}


def test_tokenize_and_detokenize_are_forwarded(dep):
    for path, body in (("/tokenize", {"prompt": "417+285="}),
                       ("/tokenize", {"messages": [{"role": "user", "content": "hi"}]}),
                       ("/detokenize", {"tokens": [1, 40, 41]}),
                       ("/tokenize", {"prompt": 5})):  # an error is passed through too
        via_proxy = post(f"{dep.proxy}{path}", body)
        direct = post(f"{dep.urls['decode']}{path}", body)
        assert via_proxy[:2] == direct[:2], path
    assert request("POST", f"{dep.proxy}/tokenize", {"prompt": "a"})[0] == 401


def test_abort_reaches_both_legs_and_releases_what_p_holds(dep):
    p = dep.urls["prefill"]

    def used() -> int:
        return request("GET", f"{p}/v1/pool", headers=AUTH)[1]["used_blocks"]

    before = used()  # the fake P holds what earlier tests handed off (nobody released it)
    raw = json.dumps({"prompt": [5, 6, 7], "max_tokens": 8,
                      "kv_transfer_params": {"do_remote_decode": True}}).encode()
    signed = {**AUTH, "X-Request-Id": "held-1", "Content-Type": "application/json",
              HANDOFF_AUTH_HEADER: sign_handoff_request(SECRET, "held-1", raw)}
    status, answer, _ = request("POST", f"{p}/v1/completions", raw=raw, headers=signed)
    assert status == 200 and answer["kv_transfer_params"], answer
    assert used() == before + 1
    status, answer, _ = post(f"{dep.proxy}/v1/abort", {"request_id": "held-1"})
    assert status == 200 and answer["aborted"] is True, answer
    by_role = {b["role"]: b for b in answer["backends"]}
    assert by_role["prefill"]["aborted"] is True and by_role["prefill"]["status"] == 200
    assert by_role["decode"]["aborted"] is False and by_role["decode"]["status"] == 404
    assert wait_until(lambda: used() == before)
    status, answer, _ = post(f"{dep.proxy}/v1/abort", {"request_id": "nobody"})
    assert status == 404 and answer["aborted"] is False
    assert request("POST", f"{dep.proxy}/v1/abort", {"request_id": "x"})[0] == 401
    assert post(f"{dep.proxy}/v1/abort", {"request_id": 5})[0] == 400


def test_pool_is_aggregated_per_role(dep):
    status, answer, _ = request("GET", f"{dep.proxy}/v1/pool", headers=AUTH)
    assert status == 200, answer
    assert answer["roles"]["prefill"]["total_blocks"] == 100
    assert answer["roles"]["decode"]["total_blocks"] == 100
    for role in answer["roles"].values():
        assert role["free_blocks"] + role["used_blocks"] == role["total_blocks"]
    assert sorted(b["role"] for b in answer["backends"]) == ["decode", "prefill"]
    assert request("GET", f"{dep.proxy}/v1/pool")[0] == 401


def test_cors_preflight_on_the_proxy(dep):
    ask = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
           "Access-Control-Request-Headers": "authorization"}
    status, _, headers = request("OPTIONS", f"{dep.proxy}/v1/completions", headers=ask)
    assert status == 200 and headers["Access-Control-Allow-Origin"] == ORIGIN
    status, _, _ = request("OPTIONS", f"{dep.proxy}/v1/completions",
                           headers={**ask, "Access-Control-Request-Method": "PATCH",
                                    "Origin": "https://other.example"})
    assert status == 400


def test_a_backend_refusal_is_the_clients_error_not_a_backend_error(dep):
    def counts() -> tuple[float, float, float]:
        text = get(f"{dep.proxy}/metrics")[1]
        return (metric_value(text, "hybridpd_proxy_requests_total", outcome="client_error"),
                metric_value(text, "hybridpd_proxy_backend_errors_total", role="prefill"),
                metric_value(text, "hybridpd_proxy_backend_client_errors_total",
                             role="prefill", status="400"))

    before = counts()
    rejected = list(b"REJECT")  # token ids the fake engine refuses (a 400 from P)
    status, answer, _ = post(f"{dep.proxy}/v1/completions", {"prompt": rejected})
    assert status == 400, answer
    after = counts()
    assert (after[0] - before[0], after[1] - before[1], after[2] - before[2]) == (1, 0, 1)


def test_a_failing_backend_is_a_backend_error():
    d = ScriptedDeployment([Backend("prefill", "fail")], [Backend("decode")])
    try:
        assert request("POST", f"{d.proxy}/v1/completions", {"prompt": "hi"})[0] == 500
        text = get(f"{d.proxy}/metrics")[1]
        assert metric_value(text, "hybridpd_proxy_requests_total", outcome="backend_error",
                            model_name="m") == 1
        assert metric_value(text, "hybridpd_proxy_backend_errors_total", role="prefill") == 1
        assert metric_value(text, "hybridpd_proxy_requests_total", outcome="client_error") == 0
    finally:
        d.close()


def test_abort_through_a_proxy_with_a_secret_needs_its_key():
    d = ScriptedDeployment([Backend("prefill")], [Backend("decode")], secret=SECRET)
    try:
        status, answer, _ = request("POST", f"{d.proxy}/v1/abort", {"request_id": "r"})
        assert status == 401 and "API key" in answer["error"]["message"], answer
    finally:
        d.close()
