"""Real processes for end-to-end tests: instances, deployments, a pool of shared ones, and a
small HTTP client."""

from __future__ import annotations

import itertools
import json
import os
import secrets
import time
import urllib.error
import urllib.request
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from hybridpd.cache.geometry import CacheGeometry
from hybridpd.config import ModelConfig
from hybridpd.engine.args import EngineArgs
from hybridpd.engine.worker import resolve_device, resolve_model_config
from hybridpd.launch.gpus import Placement
from hybridpd.launch.lifeline import Lifeline
from hybridpd.launch.procs import Child, wait_healthy
from hybridpd.launch.up import Deployment, DeploymentSpec, instance_argv, proxy_argv

_serial = itertools.count()
KB = 4  # kernel block size used by every e2e instance: several logical blocks stay short
# Leases and READ deadlines with room for a TP-4 instance sharing 2 cores with its peer (a READ
# took 3.2 s there); tests of expiry and of dead peers pass FAST_EXPIRY after these (last wins).
SERVE_ARGS = ("--kernel-block-size", str(KB), "--cache-memory", "16MiB", "--lease-s", "20",
              "--transfer-timeout-s", "20")
FAST_EXPIRY = ("--lease-s", "3", "--transfer-timeout-s", "2")


def instance_config(model: str) -> ModelConfig:
    """The model's config in the dtype an instance runs it in (`--dtype auto`: bf16 for a
    float32 checkpoint on CUDA), which sizes its pages and state bytes."""
    return resolve_model_config(EngineArgs(model_dir=model), resolve_device("auto"))


def block_tokens(model: str, tp: int = 1) -> int:
    return CacheGeometry.build(instance_config(model), tp_size=tp, kernel_block_size=KB
                               ).block_tokens


def state_bytes(model: str, n: int, tp: int = 1) -> list[int]:
    """Bytes each rank of a TP-`tp` instance holds for an `n`-token state: its KV heads' K and
    V of n tokens per attention layer, and its conv + SSM slice per Mamba layer."""
    cfg = instance_config(model)
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
    return start_instances(log_dir, (model, role, extra), tp=tp, secret=secret)[0]


def start_instances(log_dir: str, *instances: tuple[str, str, tuple[str, ...]], tp: int = 1,
                    secret: str | None = None) -> list[Child]:
    """Several instances as `start_instance` starts one, (model, role, extra flags) each,
    started together and waited on together (a pair's start-ups overlap)."""
    env = _env()
    env.pop("HYBRIDPD_KV_SECRET", None)
    if secret is not None:
        env["HYBRIDPD_KV_SECRET"] = secret
    children = []
    try:
        for model, role, extra in instances:
            name = f"{role}-{next(_serial)}-{os.getpid()}"
            ready = os.path.join(log_dir, f"{name}.ready.json")
            insecure = ("--insecure-dev",) if role != "both" and secret is None else ()
            argv = ["serve", "--model", model, "--role", role, "--port", "0", "--tp", str(tp),
                    "--side-channel-port", "0", *SERVE_ARGS, *insecure, *extra,
                    "--ready-file", ready]
            child = Child(name, argv, ready_file=ready)
            children.append(child)
            child.start(env, log_dir)
        wait_healthy(children, 300)
    except BaseException:
        for child in children:
            child.stop()
        raise
    return children


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


MAX_POOLED_PROXIES = 2  # the pool's proxies kept up (each polls its instances' /health)


@dataclass(frozen=True)
class InstanceKey:
    """Everything a pooled instance is started with: a test given it gets exactly the instance
    a fresh start would give it. `slot`: the k-th of its kind in one deployment (2P2D: 0, 1)."""

    model: str
    role: str
    tp: int
    handoff: str
    slot: int


@dataclass
class SharedDeployment:
    """A deployment made of pooled instances behind a pooled proxy; the pool stops them."""

    url: str
    prefill: list[Child]
    decode: list[Child]
    proxy: Child


class InstancePool:
    """Instances and proxies shared by the end-to-end tests of a session.

    Started exactly as `hybridpd up` starts them (`instance_argv` / `proxy_argv` of a
    `DeploymentSpec` with SERVE_ARGS, one deployment secret, a `Lifeline`), so a pooled
    deployment is an `up` deployment whose processes outlive one test. Sharing is sound for the
    tests that use it: each leaves both pools free (they assert it) and none reads a counter it
    did not set; tests that kill, freeze or misconfigure an instance start their own. At most
    `max_ranks` engine ranks stay up: starting more stops the least recently used instances
    first (and the proxies in front of them); of the proxies, the MAX_POOLED_PROXIES last used
    stay up; a pooled process that died is started again.
    """

    def __init__(self, log_dir: str, max_ranks: int) -> None:
        self.log_dir = log_dir
        self.max_ranks = max_ranks
        self.lifeline = Lifeline()
        self.env = {**_env(), "HYBRIDPD_KV_SECRET": secrets.token_hex(32)}
        self._instances: OrderedDict[InstanceKey, Child] = OrderedDict()  # oldest use first
        self._proxies: OrderedDict[tuple[InstanceKey, ...], Child] = OrderedDict()

    def deployment(self, model: str, num_prefill: int = 1, num_decode: int = 1,
                   prefill_tp: int = 1, decode_tp: int = 1, handoff: str = "first-token"
                   ) -> SharedDeployment:
        """The pooled `num_prefill` P + `num_decode` D deployment of `model`, started if
        needed."""
        keys = ([InstanceKey(model, "prefill", prefill_tp, handoff, k) for k in range(num_prefill)]
                + [InstanceKey(model, "decode", decode_tp, handoff, k) for k in range(num_decode)])
        children = self._acquire(keys)
        prefill, decode = children[:num_prefill], children[num_prefill:]
        proxy = self._proxies.get(tuple(keys))
        if proxy is not None and not proxy.alive():
            self._proxies.pop(tuple(keys)).stop()
            proxy = None
        if proxy is None:
            proxy = self._start_proxy(keys, prefill, decode)
        self._proxies.move_to_end(tuple(keys))
        while len(self._proxies) > MAX_POOLED_PROXIES:  # fewer health checkers polling
            self._proxies.popitem(last=False)[1].stop()
        return SharedDeployment(proxy.url, prefill, decode, proxy)

    def _spec(self, key: InstanceKey) -> DeploymentSpec:
        return DeploymentSpec(model=key.model, port=0, handoff=key.handoff,
                              extra_serve_args=SERVE_ARGS, log_dir=self.log_dir)

    def _acquire(self, keys: list[InstanceKey]) -> list[Child]:
        for key in keys:
            child = self._instances.get(key)
            if child is not None and not child.alive():
                self._drop(key)
            elif child is not None:
                self._instances.move_to_end(key)
        missing = [k for k in keys if k not in self._instances]
        self._make_room(sum(k.tp for k in missing), keep=set(keys))
        started = []
        for key in missing:
            name = f"pool-{key.role}-tp{key.tp}-{next(_serial)}-{os.getpid()}"
            ready = os.path.join(self.log_dir, f"{name}.ready.json")
            place = Placement(key.role, key.slot, key.tp, (), None, None)
            argv = instance_argv(self._spec(key), 0, place, key.model, ready)
            child = Child(name, argv, ready_file=ready, lifeline=self.lifeline)
            child.start(self.env, self.log_dir)
            self._instances[key] = child
            started.append(child)
        try:
            wait_healthy(started, 300)
        except BaseException:
            for key in missing:
                self._drop(key)
            raise
        return [self._instances[k] for k in keys]

    def _start_proxy(self, keys: list[InstanceKey], prefill: list[Child], decode: list[Child]
                     ) -> Child:
        name = f"pool-proxy-{next(_serial)}-{os.getpid()}"
        ready = os.path.join(self.log_dir, f"{name}.ready.json")
        argv = proxy_argv(self._spec(keys[0]), [c.url for c in prefill], [c.url for c in decode],
                          ready)
        proxy = Child(name, argv, ready_file=ready, lifeline=self.lifeline)
        proxy.start(self.env, self.log_dir)
        self._proxies[tuple(keys)] = proxy
        try:
            wait_healthy([proxy], 60)
        except BaseException:
            del self._proxies[tuple(keys)]
            proxy.stop()
            raise
        return proxy

    def _make_room(self, ranks: int, keep: set[InstanceKey]) -> None:
        alive = sum(k.tp for k in self._instances)
        for key in [k for k in self._instances if k not in keep]:  # least recently used first
            if alive + ranks <= self.max_ranks:
                return
            self._drop(key)
            alive -= key.tp

    def _drop(self, key: InstanceKey) -> None:
        """Stop one instance and every proxy in front of it."""
        for keys in [ks for ks in self._proxies if key in ks]:
            self._proxies.pop(keys).stop()
        self._instances.pop(key).stop()

    def close(self) -> None:
        for proxy in self._proxies.values():
            proxy.stop()
        for child in self._instances.values():
            child.stop()
        self._proxies.clear()
        self._instances.clear()
        self.lifeline.close()


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
