"""Real processes for end-to-end tests: instances, deployments, and a small HTTP client."""

from __future__ import annotations

import itertools
import json
import os
import time
import urllib.error
import urllib.request
from typing import Any

from hybridpd.cache.geometry import CacheGeometry
from hybridpd.config import ModelConfig
from hybridpd.launch.procs import Child, wait_healthy
from hybridpd.launch.up import Deployment, DeploymentSpec

_serial = itertools.count()
KB = 4  # kernel block size used by every e2e instance: several logical blocks stay short
# Leases and READ deadlines with room for a TP-4 instance sharing 2 cores with its peer (a READ
# took 3.2 s there); tests of expiry and of dead peers pass FAST_EXPIRY after these (last wins).
SERVE_ARGS = ("--kernel-block-size", str(KB), "--cache-memory", "16MiB", "--lease-s", "20",
              "--transfer-timeout-s", "20")
FAST_EXPIRY = ("--lease-s", "3", "--transfer-timeout-s", "2")


def block_tokens(model: str, tp: int = 1) -> int:
    return CacheGeometry.build(ModelConfig.from_dir(model), tp_size=tp, kernel_block_size=KB
                               ).block_tokens


def state_bytes(model: str, n: int, tp: int = 1) -> list[int]:
    """Bytes each rank of a TP-`tp` instance holds for an `n`-token state: its KV heads' K and
    V of n tokens per attention layer, and its conv + SSM slice per Mamba layer."""
    cfg = ModelConfig.from_dir(model)
    out = []
    for rank in range(tp):
        g = CacheGeometry.build(cfg, tp_size=tp, tp_rank=rank, kernel_block_size=KB)
        attn = sum(len(x) for x in g.attention_groups)
        mamba = sum(len(x) for x in g.mamba_groups)
        out.append(attn * n * 2 * g.kv_heads_local * g.head_dim * g.kv_itemsize
                   + mamba * (g.conv_bytes + g.ssm_bytes))
    return out


def start_instance(model: str, role: str, log_dir: str, *extra: str, tp: int = 1,
                   secret: str | None = None) -> Child:
    """An instance on ports it binds itself — HTTP and side channels, reported in its ready
    file: no free-port race; P/D roles without `secret` run with --insecure-dev."""
    name = f"{role}-{next(_serial)}-{os.getpid()}"
    ready = os.path.join(log_dir, f"{name}.ready.json")
    insecure = ("--insecure-dev",) if role != "both" and secret is None else ()
    argv = ["serve", "--model", model, "--role", role, "--port", "0", "--tp", str(tp),
            "--side-channel-port", "0", *SERVE_ARGS, *insecure, *extra, "--ready-file", ready]
    child = Child(name, argv, ready_file=ready)
    env = _env()
    env.pop("HYBRIDPD_KV_SECRET", None)
    if secret is not None:
        env["HYBRIDPD_KV_SECRET"] = secret
    child.start(env, log_dir)
    try:
        wait_healthy([child], 300)
    except BaseException:
        child.stop()
        raise
    return child


def side_channel_port(child: Child) -> int:
    """The port rank 0's side channel bound (the instance reports it in its ready file)."""
    assert child.ready_file is not None
    with open(child.ready_file) as f:
        address = json.load(f)["side_channels"][0]
    return int(address.rpartition(":")[2])


def start_deployment(model: str, log_dir: str, *extra: str, **spec: Any) -> Deployment:
    spec.setdefault("port", 0)  # the proxy binds its own port and reports it (no race)
    dep = Deployment(DeploymentSpec(model=model, log_dir=log_dir,
                                    extra_serve_args=(*SERVE_ARGS, *extra), **spec))
    return dep.start()


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


# ---- HTTP ------------------------------------------------------------------------------------
def post(url: str, body: dict[str, Any], timeout: float = 120, headers: dict | None = None
         ) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(url, json.dumps(body).encode(),
                                 {"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def get(url: str, timeout: float = 10) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def stream(url: str, body: dict[str, Any], timeout: float = 120) -> list[dict[str, Any]]:
    req = urllib.request.Request(url, json.dumps({**body, "stream": True}).encode(),
                                 {"content-type": "application/json"})
    chunks = []
    with urllib.request.urlopen(req, timeout=timeout) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                break
            chunks.append(json.loads(line[6:]))
    return chunks


def completion(base: str, model: str, prompt: Any, max_tokens: int = 10, **kw: Any
               ) -> tuple[int, dict[str, Any]]:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True, **kw}
    return post(base + "/v1/completions", body)


def wait_pool_free(base: str, timeout_s: float = 15) -> dict[str, Any]:
    """Poll /v1/pool until every block is free; returns the last answer."""
    deadline = time.monotonic() + timeout_s
    while True:
        pool = get(base + "/v1/pool")
        if pool["free_blocks"] == pool["total_blocks"] or time.monotonic() > deadline:
            return pool
        time.sleep(0.2)
