"""NIXL READ throughput of one request's state: our planner's descriptors vs the seed's scheme.

Two spawned processes, each with a page pool (`PoolTensors`) on its own device: P holds the
pools of the P ranks that D rank `--d-rank` reads from (rank pairing of `hybridpd.disagg.plan`),
filled with random bytes; D builds both descriptor lists once per scheme (`plan_read`: coalesced
ranges of our layout; `seed_read`: one descriptor per kernel block per K/V half per layer, plus
x, B, C, SSM per Mamba layer) and times whole READs (descriptor list creation + post + wait, one
READ per P rank, posted together), median of `--repeats`. The bytes our plan lands are checked
against P's with a digest. A torch copy of the same byte count between the same devices (GPU:
`tensor.copy_` across devices; CPU: memcpy in one process) gives the hardware reference. When
both sides are on one GPU a third scheme, `cuda-ipc`, times the same-GPU transport
(`disagg/cuda_ipc.py`: P's pool mapped over CUDA IPC, our plan applied by device copies).

Usage (CPU, this repo's venv):
    python bench/transfer_bench.py --device-p cpu --device-d cpu --num-layers 10 --tokens 2048
GPU (two cards):
    python bench/transfer_bench.py --device-p cuda:0 --device-d cuda:1 --tokens 8192
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing as mp
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from hybridpd.bench.seed_plan import seed_read
from hybridpd.bench.transfer_case import TransferCase, model_from_preset
from hybridpd.cache.tensors import PoolTensors
from hybridpd.disagg.cuda_ipc import IpcExport, IpcReads, export_buffer
from hybridpd.disagg.nixl_agent import MemKind, TransferAgent, XferState
from hybridpd.disagg.plan import ReadPlan, plan_read

CPU_UCX = {"UCX_TLS": "tcp,cma", "UCX_NET_DEVICES": "lo"}
GPU_UCX = {"UCX_TLS": "cuda_ipc,cuda_copy,tcp,cma", "UCX_NET_DEVICES": "lo"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="nemotron-h-8b")
    p.add_argument("--num-layers", type=int, default=None, help="cut the model to N layers")
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--p-tp", type=int, default=1)
    p.add_argument("--d-tp", type=int, default=1)
    p.add_argument("--d-rank", type=int, default=0, help="the D rank whose READs are timed")
    p.add_argument("--kernel-block-size", type=int, default=16)
    p.add_argument("--device-p", default="cpu")
    p.add_argument("--device-d", default="cpu")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--consecutive-blocks", action="store_true",
                   help="consecutive block ids instead of shuffled ones")
    p.add_argument("--timeout", type=float, default=300.0, help="deadline of every wait (s)")
    return p.parse_args(argv)


def _case(args: argparse.Namespace) -> TransferCase:
    return TransferCase(
        model=model_from_preset(args.preset, args.num_layers), num_tokens=args.tokens,
        p_tp=args.p_tp, d_tp=args.d_tp, d_rank=args.d_rank,
        kernel_block_size=args.kernel_block_size,
        shuffle_seed=None if args.consecutive_blocks else 0,
    )


def _setup_device(device: str) -> None:
    """Pin the process to its device (UCX settings are applied when the agent is built)."""
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    torch.set_num_threads(1)


def _agent(name: str, device: str) -> TransferAgent:
    return TransferAgent(name, ucx_env=GPU_UCX if device.startswith("cuda") else CPU_UCX)


def _recv(conn: Any, timeout_s: float) -> Any:
    if not conn.poll(timeout_s):
        raise TimeoutError(f"no message from the peer process within {timeout_s}s")
    return conn.recv()


def _digest(buffer: torch.Tensor, offsets: np.ndarray, lengths: np.ndarray) -> str:
    flat = buffer.view(-1)
    parts = [flat[int(o) : int(o) + int(n)] for o, n in zip(offsets, lengths)]
    return hashlib.sha256(torch.cat(parts).cpu().numpy().tobytes()).hexdigest()


# ---- P process -------------------------------------------------------------------------------
def p_main(conn: Any, args: argparse.Namespace) -> None:
    _setup_device(args.device_p)
    case = _case(args)
    agent = _agent("bench-p", args.device_p)
    gen = torch.Generator(device=args.device_p).manual_seed(7)
    pools, info = {}, {}
    for rank in case.p_ranks:
        side = case.p_side(rank)
        pool = PoolTensors(side.geometry, side.num_blocks, args.device_p)
        pool.buffer.random_(0, 256, generator=gen)  # (num_blocks, S, page_bytes) random bytes
        region = agent.register(pool.buffer)
        pools[rank] = pool
        info[rank] = (region.base_addr, region.device_id, region.nbytes, region.mem_type.value)
    exports = {r: export_buffer(pools[r].buffer) for r in case.p_ranks}  # None on CPU
    conn.send({"metadata": agent.metadata(), "regions": info,
               "exports": {r: e.to_dict() for r, e in exports.items() if e is not None}})
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        if not conn.poll(0.05):
            agent.get_notifs()  # drain READ notifications
            continue
        msg = conn.recv()
        if msg[0] == "stop":
            break
        _, rank, offsets, lengths = msg  # ("digest", rank, src offsets, lengths)
        conn.send(_digest(pools[rank].buffer, offsets, lengths))
    agent.close()


# ---- D process -------------------------------------------------------------------------------
@dataclass(frozen=True)
class SchemeResult:
    scheme: str
    descriptors: int
    nbytes: int
    seconds: float  # median
    all_seconds: tuple[float, ...]

    @property
    def gbps(self) -> float:
        return self.nbytes / self.seconds / 1e9


def _read_once(agent: TransferAgent, peer: str, region: Any, plans: list[ReadPlan],
               remote: dict[int, tuple], timeout_s: float, tag: bytes) -> float:
    start = time.perf_counter()
    handles = []
    for plan in plans:
        base, dev, nbytes, mem = remote[plan.p_rank]
        handles.append(agent.read(peer, region, plan.dst_offset, base, dev, plan.src_offset,
                                  plan.length, tag, remote_nbytes=nbytes,
                                  remote_mem_type=MemKind(mem)))
    states = [agent.wait(h, timeout_s) for h in handles]
    elapsed = time.perf_counter() - start
    for h in handles:
        agent.release(h)
    if any(s is not XferState.DONE for s in states):
        raise RuntimeError(f"READ failed: {states}")
    return elapsed


def _ipc_read_once(reads: IpcReads, exports: dict[int, IpcExport], plans: list[ReadPlan],
                   timeout_s: float, tag: bytes) -> float:
    """One READ of every plan by device copies from P's IPC-mapped pools (same GPU)."""
    start = time.perf_counter()
    handles = [reads.read("bench-p", exports[p.p_rank], p, tag) for p in plans]
    states = [reads.wait(h, timeout_s) for h in handles]
    elapsed = time.perf_counter() - start
    if any(s is not XferState.DONE for s in states):
        raise RuntimeError(f"IPC READ failed: {states}")
    return elapsed


def _time_schemes(schemes: dict[str, tuple[list[ReadPlan], Any]],
                  args: argparse.Namespace) -> list[SchemeResult]:
    """Warm-ups, then repeats interleaved across schemes (machine noise hits all alike);
    each scheme is (plans, read_once(plans, tag) -> seconds)."""
    times: dict[str, list[float]] = {name: [] for name in schemes}
    for i in range(args.warmup + args.repeats):
        for name, (plans, once) in schemes.items():
            t = once(plans, f"{name}-{i}".encode())
            if i >= args.warmup:
                times[name].append(t)
    return [SchemeResult(name, sum(p.num_descriptors for p in plans),
                         sum(p.total_bytes for p in plans), statistics.median(times[name]),
                         tuple(times[name]))
            for name, (plans, _) in schemes.items()]


def _verify(conn: Any, pool: PoolTensors, plans: list[ReadPlan], timeout_s: float) -> bool:
    for plan in plans:
        conn.send(("digest", plan.p_rank, plan.src_offset, plan.length))
        if _recv(conn, timeout_s) != _digest(pool.buffer, plan.dst_offset, plan.length):
            return False
    return True


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))


def torch_copy_seconds(nbytes: int, src_device: str, dst_device: str, repeats: int) -> float:
    """Median seconds of one `dst.copy_(src)` of `nbytes` bytes between the two devices."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=src_device).random_(0, 256)  # (nbytes,)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=dst_device)  # (nbytes,)
    times = []
    for i in range(repeats + 1):
        _sync(src_device)
        _sync(dst_device)
        start = time.perf_counter()
        dst.copy_(src, non_blocking=False)
        _sync(src_device)
        _sync(dst_device)
        if i:  # the first copy is a warm-up
            times.append(time.perf_counter() - start)
    if not torch.equal(src.cpu()[:4096], dst.cpu()[:4096]):
        raise RuntimeError("torch copy baseline copied wrong bytes")
    return statistics.median(times)


def d_main(conn: Any, out: Any, args: argparse.Namespace) -> None:
    _setup_device(args.device_d)
    case = _case(args)
    d = case.d_side()
    pool = PoolTensors(d.geometry, d.num_blocks, args.device_d)
    agent = _agent("bench-d", args.device_d)
    region = agent.register(pool.buffer)
    hello = _recv(conn, args.timeout)
    peer = agent.add_peer(hello["metadata"])
    remote = hello["regions"]
    ours, seed = [], []
    for rank in case.p_ranks:
        p = case.p_side(rank)
        plan_args = (d.peer(region.base_addr), d.block_ids, p.peer(remote[rank][0]),
                     p.block_ids, case.num_tokens)
        ours.append(plan_read(*plan_args))
        seed.append(seed_read(*plan_args))
    kw = dict(agent=agent, peer=peer, region=region, remote=remote)

    def nixl(plans: list[ReadPlan], tag: bytes) -> float:
        return _read_once(**kw, plans=plans, timeout_s=args.timeout, tag=tag)

    schemes: dict[str, tuple[list[ReadPlan], Any]] = {"ours": (ours, nixl), "seed": (seed, nixl)}
    same_gpu = args.device_p == args.device_d and args.device_d.startswith("cuda")
    exports = {int(r): IpcExport.from_dict(e) for r, e in hello.get("exports", {}).items()}
    if same_gpu and exports:  # the same-GPU transport: CUDA IPC + device copies
        reads = IpcReads(pool.buffer, agent.send_notif)

        def ipc(plans: list[ReadPlan], tag: bytes) -> float:
            return _ipc_read_once(reads, exports, plans, args.timeout, tag)

        schemes["cuda-ipc"] = (ours, ipc)
    results = _time_schemes(schemes, args)
    ours_result, seed_result = results[0], results[1]
    pool.buffer.zero_()
    _read_once(**kw, plans=ours, timeout_s=args.timeout, tag=b"verify")
    verified = _verify(conn, pool, ours, args.timeout)
    ipc_result = results[2] if len(results) > 2 else None
    if ipc_result is not None:
        pool.buffer.zero_()
        _ipc_read_once(reads, exports, ours, args.timeout, b"verify-ipc")
        verified = verified and _verify(conn, pool, ours, args.timeout)
    conn.send(("stop",))
    agent.close()
    copy_s = torch_copy_seconds(ours_result.nbytes, args.device_p, args.device_d, args.repeats)
    out.send({"ours": ours_result, "seed": seed_result, "ipc": ipc_result, "verified": verified,
              "copy_seconds": copy_s, "geometry": d.geometry, "p_ranks": case.p_ranks})


# ---- parent ----------------------------------------------------------------------------------
def _table(res: dict[str, Any]) -> str:
    ours, seed = res["ours"], res["seed"]
    copy_gbps = ours.nbytes / res["copy_seconds"] / 1e9
    rows = [f"{'scheme':<12}{'descriptors':>12}{'bytes':>14}{'median s':>12}{'GB/s':>10}"]
    for r in (ours, seed, *([res["ipc"]] if res.get("ipc") else [])):
        rows.append(f"{r.scheme:<12}{r.descriptors:>12}{r.nbytes:>14}{r.seconds:>12.6f}"
                    f"{r.gbps:>10.3f}")
    rows.append(f"{'torch copy':<12}{'-':>12}{ours.nbytes:>14}{res['copy_seconds']:>12.6f}"
                f"{copy_gbps:>10.3f}")
    rows.append(f"ours/seed throughput: {ours.gbps / seed.gbps:.2f}x   "
                f"ours/torch copy: {ours.gbps / copy_gbps:.1%}   "
                f"seed/torch copy: {seed.gbps / copy_gbps:.1%}   "
                f"our bytes verified: {res['verified']}")
    if res.get("ipc"):
        rows.append(f"cuda-ipc/torch copy: {res['ipc'].gbps / copy_gbps:.1%}   "
                    f"cuda-ipc/ours (NIXL): {res['ipc'].gbps / ours.gbps:.1f}x")
    return "\n".join(rows)


def _describe(args: argparse.Namespace, res: dict[str, Any]) -> str:
    geo = res["geometry"]
    env = {k: os.environ.get(k, (GPU_UCX if args.device_d.startswith("cuda") else CPU_UCX)[k])
           for k in ("UCX_TLS", "UCX_NET_DEVICES")}
    return (f"preset {args.preset}, layers {len(geo.layer_pattern)} ({geo.layer_pattern}), "
            f"tokens {args.tokens}, P_TP {args.p_tp} -> D_TP {args.d_tp} (D rank {args.d_rank} "
            f"reads P ranks {list(res['p_ranks'])}), {args.device_p} -> {args.device_d}\n"
            f"D geometry: page {geo.page_bytes} B, r {geo.r}, logical block "
            f"{geo.block_tokens} tokens, {geo.num_regions} regions; repeats {args.repeats}; "
            f"UCX {env}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ctx = mp.get_context("spawn")
    p_conn, d_conn = ctx.Pipe()
    out_recv, out_send = ctx.Pipe(duplex=False)
    procs = [ctx.Process(target=p_main, args=(p_conn, args), name="bench-p"),
             ctx.Process(target=d_main, args=(d_conn, out_send, args), name="bench-d")]
    for proc in procs:
        proc.start()
    out_send.close()  # so a dead D process reads as EOF here, not as a timeout
    try:
        res = _recv(out_recv, args.timeout)
    except (TimeoutError, EOFError) as exc:
        print(f"transfer bench failed: {exc}", file=sys.stderr)
        return 1
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
    print(_describe(args, res))
    print(_table(res))
    return 0 if res["verified"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
