"""Session fixtures for end-to-end tests: demo models, co-located reference instances and the
pool of shared P/D instances."""

from __future__ import annotations

import pytest

from .cluster import InstancePool, start_instance

POOL_MAX_RANKS = 12  # engine ranks the pool keeps up (the references are two more)


@pytest.fixture(scope="session")
def e2e_models(tmp_path_factory) -> dict[str, str]:
    from hybridpd.demo.writer import write_demo_model

    root = tmp_path_factory.mktemp("e2e-models")
    return {
        "tiny": str(write_demo_model(root / "tiny", preset="tiny", seed=21).path),
        "small": str(write_demo_model(root / "small", preset="small", seed=22).path),
    }


@pytest.fixture(scope="session")
def logs(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("e2e-logs"))


@pytest.fixture(scope="session")
def references(e2e_models, logs):
    """One `--role both` instance per model: the token-for-token oracle."""
    refs = {name: start_instance(path, "both", logs) for name, path in e2e_models.items()}
    yield refs
    for child in refs.values():
        child.stop()


@pytest.fixture(scope="session")
def pool(logs):
    """Deployments whose instances several tests share (see `InstancePool`)."""
    shared = InstancePool(logs, POOL_MAX_RANKS)
    yield shared
    shared.close()
