"""`hybridpd up` as a subprocess: refusing GPU flags on a CPU machine in one line, passing
serve flags to its children (read back through their HTTP APIs), children binding their own
ports, and every child exiting when `up` is SIGKILLed."""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from hybridpd.cache.geometry import CacheGeometry
from hybridpd.cache.tensors import num_blocks_for_budget
from hybridpd.config import ModelConfig

from .cluster import get
from .test_up_lifecycle import _descendants, _running

EXIT_DEADLINE_S = 5.0
PREFILL_CACHE, DECODE_CACHE = 8 * 2**20, 4 * 2**20


def _up(*argv: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "hybridpd.cli", "up", *argv],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.device_count() > 0


@pytest.mark.skipif(_has_gpu(), reason="needs a machine without GPUs")
@pytest.mark.parametrize("argv,expect", [
    (["--gpus", "0"], "no visible CUDA GPU"),
    (["--share-gpus", "--gpu-memory-utilization", "0.4"], "needs GPUs"),
])
def test_gpu_flags_on_a_machine_without_gpus_fail_in_one_line(argv, expect):
    proc = _up(*argv)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2
    lines = out.strip().splitlines()
    assert len(lines) == 1 and expect in lines[0] and "Traceback" not in out, out


@pytest.fixture(scope="module")
def up(e2e_models) -> Iterator[tuple[subprocess.Popen, dict[str, str]]]:
    proc = _up("--model", e2e_models["tiny"], "--port", "0", "--served-model-name", "zed",
               "--max-model-len", "48", "--prefill-cache-memory", str(PREFILL_CACHE),
               "--decode-cache-memory", str(DECODE_CACHE), "--kernel-block-size", "4")
    out = b""
    try:
        deadline = time.monotonic() + 240
        fd = proc.stdout.fileno()
        while time.monotonic() < deadline and proc.poll() is None:
            ready, _, _ = select.select([fd], [], [], 1.0)
            if ready:
                out += os.read(fd, 65536)  # raw reads: select then sees every new byte
                if re.search(rb"^\s+proxy\s+http://\S+\n", out, re.M):
                    break
        text = out.decode()
        urls = dict(re.findall(r"^\s+(\w+)\s+(http://\S+)$", text, re.M))
        assert set(urls) == {"prefill0", "decode0", "proxy"}, text
        yield proc, urls
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


def _blocks(model: str, budget: int) -> int:
    """Usable blocks of a pool of `budget` bytes (block 0, the null block, is not counted)."""
    cfg = ModelConfig.from_dir(model).with_overrides(dtype="float32")  # CPU default dtype
    return num_blocks_for_budget(CacheGeometry.build(cfg, kernel_block_size=4), budget) - 1


@pytest.mark.skipif(_has_gpu(), reason="CPU pool sizes")
def test_up_passes_serve_flags_to_its_children(up, e2e_models):
    _proc, urls = up
    for name in ("proxy", "prefill0", "decode0"):
        models = get(urls[name] + "/v1/models")["data"]
        assert [m["id"] for m in models] == ["zed"], name
        if name != "proxy":
            assert models[0]["max_model_len"] == 48
    model = e2e_models["tiny"]
    assert get(urls["prefill0"] + "/v1/pool")["total_blocks"] == _blocks(model, PREFILL_CACHE)
    assert get(urls["decode0"] + "/v1/pool")["total_blocks"] == _blocks(model, DECODE_CACHE)
    assert _blocks(model, PREFILL_CACHE) != _blocks(model, DECODE_CACHE)
    ports = {int(u.rsplit(":", 1)[1]) for u in urls.values()}
    assert len(ports) == 3 and 0 not in ports  # each child bound its own port and reported it


def test_bench_through_up_counts_server_tokens_and_reports_phases(up):
    """`hybridpd bench`'s load generator against the real proxy: exact token counts from the
    server (not from text: random weights often decode to none) and the proxy's P/D phases."""
    import asyncio

    from hybridpd.bench.loadgen import Endpoint, LoadSpec, run_load
    from hybridpd.bench.metrics import summarize

    _proc, urls = up
    spec = LoadSpec(url=urls["proxy"], endpoint=Endpoint.COMPLETIONS, model="zed",
                    num_requests=4, prompt_len=12, output_len=7, warmup=1)
    results, duration = asyncio.run(run_load(spec, 2))
    assert all(r.ok for r in results), [r.error for r in results]
    assert [r.output_tokens for r in results] == [7] * 4
    assert all(r.token_source == "usage" and len(r.itls_s) == 6 for r in results)
    s = summarize(results, duration, 2)
    assert {"prefill_s", "transfer_s", "handover_s", "d_first_token_s"} <= set(s.phases)
    assert all(d.count == 4 for d in s.phases.values())


def test_sigkill_of_up_leaves_no_child(up):
    proc, _urls = up
    children = _descendants(proc.pid)
    assert len(children) >= 5  # 2 instances + their engine processes + the proxy
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    deadline = time.monotonic() + EXIT_DEADLINE_S
    while (alive := [p for p in children if _running(p)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive, f"children alive {EXIT_DEADLINE_S}s after SIGKILL of up: {alive}"
