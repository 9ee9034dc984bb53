"""bench/transfer_bench.py end to end on CPU (tiny shape): both schemes READ, ours verified."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

from hybridpd.disagg.errors import TransferError  # noqa: E402
from hybridpd.disagg.nixl_agent import load_nixl_bindings  # noqa: E402

try:
    load_nixl_bindings()
except TransferError:
    pytest.skip("NIXL is not installed", allow_module_level=True)

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "transfer_bench.py"


@pytest.mark.parametrize("p_tp,d_tp", [(1, 2)])
def test_transfer_bench_cpu(p_tp: int, d_tp: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(SCRIPT), "--preset", "tiny", "--tokens", "96", "--repeats", "1",
           "--p-tp", str(p_tp), "--d-tp", str(d_tp), "--d-rank", "1", "--timeout", "60"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {line.split()[0]: line.split() for line in proc.stdout.splitlines() if line.strip()}
    ours, seed = rows["ours"], rows["seed"]
    assert int(ours[2]) == int(seed[2]) > 0  # same bytes: 96 tokens = 6 whole kernel blocks
    assert int(seed[1]) > int(ours[1]) > 0  # more descriptors in the seed's scheme
    assert "our bytes verified: True" in proc.stdout
