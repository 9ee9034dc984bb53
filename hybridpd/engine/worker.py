"""One tensor-parallel rank's compute: its model shard, its slice of the page pool, its runner.

Owns device/dtype resolution, pool sizing and construction, and model loading for one rank.
Knows nothing of request lifecycles (the engine core) or HTTP. The transfer endpoint of a rank
(its NIXL agent: the data plane only) is attached by the executor; the side channel that
answers peers for it is rank 0's transfer service's.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from hybridpd.cache.geometry import CacheGeometry
from hybridpd.cache.tensors import PoolTensors, num_blocks_for_budget
from hybridpd.config import ModelConfig, canonical_dtype
from hybridpd.disagg.commands import RankTransferReport, TransferCommand
from hybridpd.engine.args import EngineArgs, Role
from hybridpd.engine.runner import ModelRunner, StepResult
from hybridpd.engine.sampler import Sampler
from hybridpd.engine.scheduler import SchedulerOutput

if TYPE_CHECKING:  # imported lazily at run time (NIXL, the model) where they are built
    from hybridpd.disagg.endpoint import KVEndpoint, RankAdvert
    from hybridpd.disagg.receiver import KVReceiver
    from hybridpd.model.parallel import TPGroup

log = logging.getLogger(__name__)

CPU_DEFAULT_CACHE_BYTES = 256 * 2**20
MIN_BLOCKS = 4
FINGERPRINT_WINDOW = 256 * 1024


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def auto_dtype(checkpoint_dtype: str, device: torch.device) -> str:
    """`--dtype auto`, vLLM's rule on GPUs: the checkpoint's dtype, but a float32 checkpoint
    runs in bfloat16 (float16 where the GPU lacks bf16) and a bfloat16 one in float16 where
    the GPU lacks bf16. On CPU every checkpoint runs in float32 (bf16 matmuls crawl there)."""
    if device.type != "cuda":
        return "float32"
    bf16 = torch.cuda.is_bf16_supported()
    if checkpoint_dtype == "float32":
        return "bfloat16" if bf16 else "float16"
    if checkpoint_dtype == "bfloat16" and not bf16:
        return "float16"
    return checkpoint_dtype


def resolve_model_config(args: EngineArgs, device: torch.device) -> ModelConfig:
    """The model's config with the dtype it runs in (`--dtype`, or `auto_dtype`)."""
    cfg = ModelConfig.from_dir(args.model_dir, ssm_state_dtype=args.ssm_state_dtype)
    if args.dtype not in (None, "auto"):
        return cfg.with_overrides(dtype=canonical_dtype(args.dtype))
    return cfg.with_overrides(dtype=auto_dtype(cfg.dtype, device))


def pool_budget(args: EngineArgs, device: torch.device) -> int:
    """Bytes for the page pool (called after the weights are loaded): `cache_memory`, else on
    GPU the instance's share of *total* memory minus what this process already holds
    (`gpu_memory_utilization`; no race with other instances on the GPU), else 0.85 of free."""
    if args.cache_memory is not None:
        return int(args.cache_memory)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        if args.gpu_memory_utilization is not None:
            held = torch.cuda.memory_reserved(device)
            budget = int(total * args.gpu_memory_utilization) - held
            if budget <= 0:
                raise ValueError(
                    f"--gpu-memory-utilization {args.gpu_memory_utilization} gives "
                    f"{total * args.gpu_memory_utilization / 2**30:.1f} GiB of this GPU's "
                    f"{total / 2**30:.1f} GiB, but the model already holds "
                    f"{held / 2**30:.1f} GiB: raise the share")
            return budget
        return int(free * args.gpu_memory_fraction)
    return CPU_DEFAULT_CACHE_BYTES


class Worker:
    def __init__(
        self,
        args: EngineArgs,
        rank: int = 0,
        tp_group: TPGroup | None = None,
        agree: Callable[[int], int] | None = None,  # TP: all ranks settle on one pool size
    ) -> None:
        from hybridpd.model.nemotron_h import NemotronHForCausalLM

        self.args = args
        self.rank = rank
        self.device = resolve_device(args.device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", rank % max(torch.cuda.device_count(), 1))
            torch.cuda.set_device(self.device)
        self.model_config = resolve_model_config(args, self.device)
        self.geometry = CacheGeometry.build(
            self.model_config,
            tp_size=args.tp_size,
            tp_rank=rank,
            kernel_block_size=args.kernel_block_size,
        )
        self.model = NemotronHForCausalLM(self.model_config, self.device, tp_group)
        self.model.load_weights(args.model_dir, progress=rank == 0)
        self.model.eval()
        self.num_blocks = max(
            MIN_BLOCKS, num_blocks_for_budget(self.geometry, pool_budget(args, self.device))
        )
        if agree is not None:
            self.num_blocks = agree(self.num_blocks)
        self.pool = PoolTensors(self.geometry, self.num_blocks, self.device)
        self.runner = ModelRunner(
            self.model,
            self.pool,
            self.geometry.block_tokens,
            len(self.geometry.attention_groups),
            len(self.geometry.mamba_groups),
            self.device,
            Sampler(args.seed),
        )
        if self.device.type == "cuda" and not args.enforce_eager and args.tp_size == 1:
            if self.model.graph_safe:  # after the pool is sized: graphs view its one buffer
                self.runner.capture_decode_graphs(
                    args.max_num_seqs, self.model_config.context_limit(args.max_model_len))
            else:
                log.info("decode steps run eagerly: %s MoE has no sync-free path on %s",
                         self.model_config.dtype, self.device)

        self.endpoint: KVEndpoint | None = None
        self.receiver: KVReceiver | None = None

    def execute(self, out: SchedulerOutput) -> StepResult:
        return self.runner.execute(out, sample=self.rank == 0)

    # ---- P/D transfer endpoint ------------------------------------------------------------
    def attach_endpoint(self) -> RankAdvert:
        """Register the pool with NIXL; returns what a peer's handshake needs of this rank
        (rank 0's transfer service answers it on the instance's side channel)."""
        from hybridpd.disagg.endpoint import KVEndpoint
        from hybridpd.disagg.receiver import KVReceiver
        from hybridpd.disagg.transport import TransportPolicy

        a = self.args
        endpoint = self.endpoint = KVEndpoint(
            a.engine_id, self.geometry, self.num_blocks, self.pool.buffer,
            model_fingerprint(a.model_dir), secret=a.kv_secret,
        )
        if a.role == Role.DECODE:
            policy = TransportPolicy(a.kv_transport_floor_gbps, a.kv_require_fast_transport)
            self.receiver = KVReceiver(endpoint, a.handshake_timeout_s,
                                       a.transfer_timeout_s, policy)
        return endpoint.advert()

    def transfer(self, cmd: TransferCommand) -> RankTransferReport:
        if self.endpoint is None:
            return RankTransferReport(self.rank)
        if self.receiver is not None:
            for rid in cmd.cancel:
                self.receiver.cancel(rid)
            for job in cmd.start:
                self.receiver.start(job)
            results = tuple(self.receiver.poll())
        else:
            results = ()
        return RankTransferReport(
            self.rank,
            notices=tuple(self.endpoint.read_notices()),
            results=results,
        )

    def close(self) -> None:
        if self.receiver is not None:
            self.receiver.close()
            self.receiver = None
        if self.endpoint is not None:
            self.endpoint.close()
            self.endpoint = None


def model_fingerprint(model_dir: str) -> str:
    """Identity of a checkpoint, cheap even at 16 GB: its config, and per weight file its name,
    size, header and eight sampled 256 KiB windows of tensor bytes (two checkpoints of one
    shape but other weights differ there)."""
    root = Path(model_dir)
    h = hashlib.sha256((root / "config.json").read_bytes())
    for f in sorted(root.glob("*.safetensors")):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with f.open("rb") as fh:
            for k in range(8):
                fh.seek(size * k // 8)
                h.update(fh.read(FINGERPRINT_WINDOW))
    return h.hexdigest()
