"""What a plain `pip install hybridpd` (no extras) must be enough for: the P/D data path and
the metrics are plain dependencies, and serving a request on CPU imports none of the optional
packages (triton for GPU kernels, matplotlib for plots, nor the test-only transformers/openai).

The full check — a fresh virtual environment, `pip install .`, `hybridpd up`, one P/D request —
takes minutes and the network, so it is done by hand (docs/architecture.md, "Packaging"); this
test covers its two halves that can fail without one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
OPTIONAL = ("triton", "matplotlib", "transformers", "openai")

BLOCKER = f"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {OPTIONAL!r}:
            raise ImportError(f"{{name}} is optional and must not be imported here")
sys.meta_path.insert(0, Block())
from hybridpd import LLM, SamplingParams
import hybridpd.cli, hybridpd.launch.up, hybridpd.server.api, hybridpd.proxy.app
import hybridpd.disagg.nixl_agent as nixl_agent
nixl_agent.load_nixl_bindings()
out = LLM().generate(["417+285="], SamplingParams(max_tokens=8, temperature=0.0))[0]
print(repr(out.text))
"""


def test_the_pd_path_and_metrics_are_plain_dependencies():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {d.split(">")[0].split("=")[0].split("[")[0].strip().lower().replace("_", "-")
             for d in project["dependencies"]}
    assert {"nixl-cu13", "prometheus-client", "torch", "aiohttp"} <= names
    assert not set(OPTIONAL) & names


def test_serving_on_cpu_imports_no_optional_package(tmp_path):
    env = {**os.environ, "HYBRIDPD_CACHE": str(tmp_path), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", BLOCKER], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "'702'"  # the trained demo model's answer
