"""EngineProcess start-up and shutdown, with no HTTP."""

from __future__ import annotations

import functools
import re

import pytest
import torch
from fakes import failing_factory, logging_factory, make_fake_engine

from hybridpd.server.engine_proc import EngineProcess, EngineStartupError

torch.set_num_threads(1)


def test_startup_failure_reports_child_traceback():
    proc = EngineProcess(failing_factory, startup_timeout_s=60.0)
    with pytest.raises(EngineStartupError, match="factory failed on purpose"):
        proc.start()
    assert not proc.is_alive()


def test_start_and_stop_within_deadline():
    proc = EngineProcess(functools.partial(make_fake_engine), startup_timeout_s=60.0)
    proc.start()
    try:
        assert proc.is_alive()
    finally:
        proc.stop(timeout_s=5.0)
    assert not proc.is_alive() and proc.exitcode == 0


@pytest.mark.parametrize("level,shown", [("info", True), ("warning", False)])
def test_engine_process_logs_hybridpd_records_to_stderr(capfd, level, shown):
    message = f"engine-log-probe-{level}"
    proc = EngineProcess(functools.partial(logging_factory, message), startup_timeout_s=60.0,
                         log_level=level)
    proc.start()
    proc.stop(timeout_s=5.0)
    err = capfd.readouterr().err
    line = re.search(rf"^\S+ \S+ INFO hybridpd\.transfer: {message}$", err, re.M)
    assert (line is not None) == shown, err
