"""Fixtures for engine tests: a tiny demo model written once per session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    from hybridpd.demo.writer import write_demo_model

    return str(write_demo_model(tmp_path_factory.mktemp("models") / "tiny", preset="tiny",
                                seed=3).path)


@pytest.fixture(scope="session")
def small_model(tmp_path_factory) -> str:
    from hybridpd.demo.writer import write_demo_model

    return str(write_demo_model(tmp_path_factory.mktemp("models") / "small", preset="small",
                                seed=5).path)
