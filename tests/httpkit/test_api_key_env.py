"""`--api-key` falls back to HYBRIDPD_API_KEY (read in env.py), for `serve` and `proxy` alike."""

from __future__ import annotations

import argparse

from hybridpd.env import api_key
from hybridpd.proxy import cli as proxy_cli
from hybridpd.server.cli import add_arguments


def test_the_flag_wins_then_the_variable_then_none(monkeypatch):
    monkeypatch.delenv("HYBRIDPD_API_KEY", raising=False)
    assert api_key(None) is None and api_key("") is None
    monkeypatch.setenv("HYBRIDPD_API_KEY", "from-env")
    assert api_key(None) == "from-env"
    assert api_key("from-flag") == "from-flag"
    monkeypatch.setenv("HYBRIDPD_API_KEY", "")
    assert api_key(None) is None


def test_serve_and_proxy_parse_the_cors_and_key_flags():
    for add in (add_arguments, proxy_cli.add_arguments):
        parser = argparse.ArgumentParser()
        add(parser)
        extra = ["--prefill", "http://p", "--decode", "http://d"] if add is not add_arguments \
            else []
        args = parser.parse_args([*extra, "--api-key", "k", "--allowed-origins", "https://a.b"])
        assert args.api_key == "k" and args.allowed_origins == ("https://a.b",)
