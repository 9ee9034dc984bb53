"""Engine arguments: everything an engine instance is started with (frozen, resolved once).

Owns `EngineArgs` and the role / failure-policy Enums (the hand-off mode is P/D's own
`HandoffMode`, from `disagg/params.py`). Knows nothing of HTTP.
"""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass, field

from hybridpd.disagg.params import HandoffMode


class Role(str, enum.Enum):
    BOTH = "both"  # co-located prefill + decode
    PREFILL = "prefill"
    DECODE = "decode"


class FailurePolicy(str, enum.Enum):
    RECOMPUTE = "recompute"  # a failed transfer is recomputed locally from scratch
    FAIL = "fail"  # a failed transfer fails the request with a clear error


@dataclass(frozen=True)
class EngineArgs:
    model_dir: str
    role: Role = Role.BOTH
    handoff: HandoffMode = HandoffMode.FIRST_TOKEN
    on_transfer_failure: FailurePolicy = FailurePolicy.RECOMPUTE
    device: str = "auto"  # "auto": cuda when available, else cpu
    dtype: str | None = None  # None: the checkpoint's dtype (float32 on CPU when it is bf16)
    ssm_state_dtype: str | None = None  # None: config's mamba_ssm_cache_dtype (float32)
    cache_memory: int | None = None  # bytes for the page pool; None: a default per device
    gpu_memory_fraction: float = 0.85  # of free GPU memory, when cache_memory is None
    # this instance's share of its GPU's *total* memory (weights + pool), when cache_memory is
    # None: instances sharing a GPU each size their pool from their share, not from free memory
    gpu_memory_utilization: float | None = None
    kv_transport_floor_gbps: float | None = None  # None: 5 GB/s for GPU pairs, none for CPU
    kv_require_fast_transport: bool = False  # refuse a pair calibrated below the floor
    kernel_block_size: int = 16
    enforce_eager: bool = False  # True: no CUDA graphs for decode steps (eager everywhere)
    max_num_batched_tokens: int = 512
    max_num_seqs: int = 64
    max_model_len: int | None = None
    tp_size: int = 1
    seed: int = 0
    engine_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    side_channel_host: str = "127.0.0.1"
    side_channel_port: int = 0  # 0: ephemeral; rank r listens on port + r when non-zero
    lease_s: float = 10.0  # how long P holds a request's blocks without a renewal from D
    # P frees a hand-off's blocks this long after issuing it however often D renews (None:
    # 6 x lease_s); D refuses signed hand-offs older than this.
    max_lease_s: float | None = None
    transfer_timeout_s: float = 30.0  # deadline on one READ
    handshake_timeout_s: float = 5.0
    queue_timeout_s: float | None = None  # a request that cannot start within it fails (503)
    kv_secret: str | None = field(default=None, repr=False)  # signs / checks hand-offs

    def __post_init__(self) -> None:
        object.__setattr__(self, "role", Role(self.role))
        object.__setattr__(self, "handoff", HandoffMode(self.handoff))
        object.__setattr__(self, "on_transfer_failure", FailurePolicy(self.on_transfer_failure))
        if self.max_lease_s is None:
            object.__setattr__(self, "max_lease_s", 6.0 * self.lease_s)
        if self.lease_s <= 0 or self.max_lease_s < self.lease_s:  # type: ignore[operator]
            raise ValueError(f"need 0 < lease_s <= max_lease_s, got {self.lease_s} and "
                             f"{self.max_lease_s}")
        if self.tp_size < 1:
            raise ValueError(f"tp_size must be >= 1, got {self.tp_size}")
        if self.max_num_batched_tokens < 1 or self.max_num_seqs < 1:
            raise ValueError("max_num_batched_tokens and max_num_seqs must be >= 1")
        u = self.gpu_memory_utilization
        if u is not None and not 0.0 < u <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {u}")
        if self.kv_transport_floor_gbps is not None and self.kv_transport_floor_gbps < 0:
            raise ValueError("kv_transport_floor_gbps must be >= 0")
        if self.queue_timeout_s is not None and not self.queue_timeout_s > 0:
            raise ValueError(f"queue_timeout_s must be > 0, got {self.queue_timeout_s}")
