"""httpkit's metric set (prometheus_client, one registry per app, model_name on every sample)
and CORS policy units (list parsing, what a policy allows, preflight answers on a real app)."""

from __future__ import annotations

import argparse
import asyncio

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from hybridpd.httpkit.cors import (
    CorsPolicy,
    add_cors_arguments,
    cors_policy_from,
    install_cors,
    parse_list,
)
from hybridpd.httpkit.metrics import MetricSet, sanitize_name


def samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_two_sets_with_the_same_names_do_not_clash_and_label_every_sample():
    a, b = MetricSet("model-a"), MetricSet("model-b")
    for m, n in ((a, 2), (b, 5)):
        c = m.counter("x_requests_total", "Requests.", ["outcome"])
        c.inc(n, {"outcome": "ok"})
        h = m.histogram("x_latency_seconds", "Latency.", buckets=(0.1, 1.0))
        for v in (0.05, 0.5, 3.0):
            h.observe(v)
        m.gauge("x_running", "Running.").set(n)
    sa, sb = samples(a.render()), samples(b.render())
    assert sa[("x_requests_total", (("model_name", "model-a"), ("outcome", "ok")))] == 2
    assert sb[("x_requests_total", (("model_name", "model-b"), ("outcome", "ok")))] == 5
    assert sa[("x_latency_seconds_bucket", (("le", "1.0"), ("model_name", "model-a")))] == 2
    assert sa[("x_latency_seconds_count", (("model_name", "model-a"),))] == 3
    assert all(dict(labels).get("model_name") == "model-a" for _, labels in sa)
    assert not [name for name, _ in sa if name.endswith("_created")]


def test_counters_only_go_up_and_labels_must_be_declared():
    m = MetricSet("m")
    c = m.counter("y_total", "Y.", ["role"])
    with pytest.raises(ValueError, match="only goes up"):
        c.inc(-1, {"role": "p"})
    with pytest.raises(ValueError, match="undeclared"):
        c.inc(1, {"colour": "red"})
    c.inc(3, {"role": "p"})
    assert c.value({"role": "p"}) == 3 and c.value({"role": "d"}) == 0
    with pytest.raises(ValueError):
        m.counter("y_total", "again")  # one name once per set


def test_mirrored_counters_expose_the_latest_totals_and_never_go_down():
    m = MetricSet("m")
    mirror = m.mirrored_counters("z_engine_", "Engine counter {name}.")
    mirror.update({"added": 3, "kv transfer/bytes": 10})
    mirror.update({"added": 2})  # a stale report must not make a counter go down
    s = samples(m.render())
    assert s[("z_engine_added_total", (("model_name", "m"),))] == 3
    assert s[("z_engine_kv_transfer_bytes_total", (("model_name", "m"),))] == 10
    assert sanitize_name("9 lives") == "_9_lives"


def test_model_name_can_be_learned_later():
    m = MetricSet()
    m.gauge("g", "G.").set(1)
    m.model_name = "learned"
    m.gauge("h", "H.").set(1)
    s = samples(m.render())
    assert (("g", (("model_name", "unknown"),))) in s and ("h", (("model_name", "learned"),)) in s


@pytest.mark.parametrize("text,want", [
    ('["https://a.example", "http://b:3000"]', ("https://a.example", "http://b:3000")),
    ("GET, POST", ("GET", "POST")), ("*", ("*",)), ("[]", ()),
])
def test_parse_list(text, want):
    assert parse_list(text) == want


@pytest.mark.parametrize("text", ['["a", 1]', '["a"', '{"a": 1}'])
def test_parse_list_refuses_malformed_json(text):
    with pytest.raises(ValueError, match="JSON list of strings"):
        parse_list(text)


def test_flags_turn_cors_on_only_when_given():
    parser = argparse.ArgumentParser()
    add_cors_arguments(parser)
    assert cors_policy_from(parser.parse_args([])) is None
    policy = cors_policy_from(parser.parse_args(["--allowed-origins", '["https://a.example"]',
                                                 "--allow-credentials"]))
    assert policy == CorsPolicy(("https://a.example",), ("*",), ("*",), True)
    with pytest.raises(SystemExit):
        parser.parse_args(["--allowed-methods", '["GET"'])


def test_policy_decisions():
    p = CorsPolicy(("https://a.example",), ("GET", "POST"), ("Authorization",), True)
    assert p.origin_allowed("https://a.example") and not p.origin_allowed("https://b.example")
    assert p.method_allowed("post") and not p.method_allowed("DELETE")
    assert p.headers_allowed(["authorization", "Content-Type"])  # a safe header is always ok
    assert not p.headers_allowed(["X-Other"])
    assert p.allow_origin_value("https://a.example") == "https://a.example"  # credentials
    assert CorsPolicy().allow_origin_value("https://z.example") == "*"


async def _exchange(policy: CorsPolicy, method: str, path: str,
                    headers: dict[str, str]) -> tuple[int, dict[str, str], str]:
    @web.middleware
    async def deny_all(request: web.Request, handler):  # an API-key check stand-in
        raise web.HTTPUnauthorized()

    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="fine")

    app = web.Application(middlewares=[deny_all])
    app.router.add_post("/v1/x", ok)
    install_cors(app, policy)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(timeout=timeout) as s:
            async with s.request(method, f"http://127.0.0.1:{port}{path}",
                                 headers=headers) as r:
                return r.status, dict(r.headers), await r.text()
    finally:
        await runner.cleanup()


def test_preflight_runs_before_other_middlewares_and_names_what_is_refused():
    policy = CorsPolicy(("https://a.example",), ("POST",), ("Authorization",), True)
    ask = {"Origin": "https://a.example", "Access-Control-Request-Method": "POST",
           "Access-Control-Request-Headers": "Authorization"}
    status, headers, _ = asyncio.run(_exchange(policy, "OPTIONS", "/v1/x", ask))
    assert status == 200
    assert headers["Access-Control-Allow-Origin"] == "https://a.example"
    assert headers["Access-Control-Allow-Credentials"] == "true"
    assert headers["Access-Control-Allow-Methods"] == "POST"
    assert headers["Access-Control-Allow-Headers"] == "Authorization"
    assert headers["Vary"] == "Origin"
    status, _, text = asyncio.run(_exchange(policy, "OPTIONS", "/v1/x", {
        **ask, "Access-Control-Request-Method": "DELETE", "Access-Control-Request-Headers": "X"}))
    assert status == 400 and text == "Disallowed CORS method, headers"
    status, headers, _ = asyncio.run(_exchange(policy, "POST", "/v1/x", {
        "Origin": "https://a.example"}))
    assert status == 401 and headers["Access-Control-Allow-Origin"] == "https://a.example"
    status, _, _ = asyncio.run(_exchange(policy, "OPTIONS", "/v1/x", {}))  # not a preflight
    assert status == 401


def test_unlabelled_metrics_are_exposed_at_zero_once_the_model_is_known():
    known, unknown = MetricSet("m"), MetricSet()
    for m in (known, unknown):
        m.counter("a_total", "A.")
        m.gauge("b", "B.")
        m.counter("c_total", "C.", ["role"])  # labelled: no series until observed
    s = samples(known.render())
    assert s == {("a_total", (("model_name", "m"),)): 0, ("b", (("model_name", "m"),)): 0}
    assert samples(unknown.render()) == {}  # the proxy's, until a backend names the model
