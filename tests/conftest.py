"""Shared pytest setup: single-threaded torch and a `device` fixture.

Owns process-wide test settings only (thread count, device parametrization). Knows nothing of
hybridpd modules.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

_DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=_DEVICES)
def device(request: pytest.FixtureRequest) -> torch.device:
    """Each test using this fixture runs on the CPU and, where present, on CUDA."""
    return torch.device(request.param)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`gpu` tests skip without CUDA; `slow` tests skip unless HYBRIDPD_SLOW=1."""
    run_slow = os.environ.get("HYBRIDPD_SLOW") == "1"
    has_cuda = torch.cuda.is_available()
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if "slow" in item.keywords and not run_slow:
            item.add_marker(pytest.mark.skip(reason="slow: set HYBRIDPD_SLOW=1 to run"))
