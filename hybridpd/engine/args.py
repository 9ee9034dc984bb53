"""Engine arguments: everything an engine instance is started with (frozen, resolved once).

Owns `EngineArgs`, the role / failure-policy / dtype Enums (the hand-off mode is P/D's own
`HandoffMode`, from `disagg/params.py`), and the command-line description of each engine field
(`cli_options()`: flag names, help, value parser, choices; the default is the field's own), so
`hybridpd serve` generates its engine flags from this one source. Also the value parsers those
flags use (byte sizes, fractions). Knows nothing of HTTP and nothing of argparse beyond raising
`argparse.ArgumentTypeError` from the parsers.
"""

from __future__ import annotations

import argparse
import enum
import re
import uuid
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from hybridpd.config import canonical_dtype
from hybridpd.disagg.params import HandoffMode


class Role(str, enum.Enum):
    BOTH = "both"  # co-located prefill + decode
    PREFILL = "prefill"
    DECODE = "decode"


class FailurePolicy(str, enum.Enum):
    RECOMPUTE = "recompute"  # a failed transfer is recomputed locally from scratch
    FAIL = "fail"  # a failed transfer fails the request with a clear error


class DType(str, enum.Enum):
    """`--dtype` values (vLLM's names). AUTO: see `engine/worker.py:auto_dtype`."""

    AUTO = "auto"
    HALF = "half"
    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"
    FLOAT = "float"
    FLOAT32 = "float32"


BYTE_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 1024, "m": 1e6, "mb": 1e6,
              "mib": 1024**2, "g": 1e9, "gb": 1e9, "gib": 1024**3, "t": 1e12, "tb": 1e12,
              "tib": 1024**4}


def parse_bytes(text: str) -> int:
    """'1073741824', '1GiB', '512MiB', '2.5GB' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if m is None or m.group(2).lower() not in BYTE_UNITS:
        raise argparse.ArgumentTypeError(f"not a byte size: {text!r} (e.g. 4GiB, 512MiB)")
    return int(float(m.group(1)) * BYTE_UNITS[m.group(2).lower()])


def _checked(convert: Callable[[str], Any], ok: Callable[[Any], bool], what: str
             ) -> Callable[[str], Any]:
    """A flag's value parser: `convert`, then `ok`; anything else is "not {what}"."""

    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"not {what}: {text!r}")
        return value

    return parse


fraction = _checked(float, lambda v: 0.0 < v <= 1.0, "a fraction in (0, 1]")  # e.g. '0.4'
non_negative = _checked(float, lambda v: v >= 0.0, "a number >= 0")
positive_float = _checked(float, lambda v: v > 0.0, "a number > 0")
positive_int = _checked(int, lambda v: v >= 1, "an integer >= 1")
port_number = _checked(int, lambda v: 0 <= v < 65536, "a port number in [0, 65535]")


@dataclass(frozen=True)
class CliOption:
    """How one `EngineArgs` field appears on the command line."""

    dest: str  # the field name (and the argparse dest)
    flags: tuple[str, ...]
    help: str
    default: Any
    parse: Callable[[str], Any] | None = None  # None with `choices`: the Enum's value
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    is_flag: bool = False  # a boolean switch (store_true)


def _cli(default: Any, help: str, *flags: str, parse: Callable[[str], Any] | None = None,
         enum_type: type[enum.Enum] | None = None, metavar: str | None = None) -> Any:
    """A dataclass field with its command-line description in `metadata`."""
    meta = {"cli": {"flags": flags, "help": help, "parse": parse, "enum": enum_type,
                    "metavar": metavar}}
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class EngineArgs:
    model_dir: str
    role: Role = _cli(Role.BOTH, "what this instance does: both (co-located prefill and decode), "
                      "prefill or decode (P/D)", enum_type=Role)
    handoff: HandoffMode = _cli(
        HandoffMode.FIRST_TOKEN, "P/D hand-off: first-token (P samples the first output token) or "
        "n-1 (P prefills N-1 tokens, D computes the last)", enum_type=HandoffMode)
    on_transfer_failure: FailurePolicy = _cli(
        FailurePolicy.RECOMPUTE, "what a decode instance does when a KV transfer fails: "
        "recompute the request locally, or fail it", enum_type=FailurePolicy)
    device: str = _cli("auto", "cpu, cuda or cuda:N; auto: cuda when available, else cpu")
    dtype: str = _cli(
        DType.AUTO.value, "weights and activations dtype; auto: the checkpoint's dtype, except "
        "float32 checkpoints run in bfloat16 on CUDA (float16 where the GPU lacks bf16), as "
        "vLLM does, and every checkpoint runs in float32 on CPU", enum_type=DType)
    ssm_state_dtype: str | None = _cli(
        None, "dtype of the SSM state in the cache (default: the config's "
        "mamba_ssm_cache_dtype, else float32)", enum_type=DType)
    cache_memory: int | None = _cli(
        None, "bytes for the page pool, e.g. 4GiB (default: 256 MiB on CPU; on GPU from "
        "--gpu-memory-utilization, else 0.85 of the memory free after loading)",
        parse=parse_bytes, metavar="BYTES")
    gpu_memory_fraction: float = 0.85  # of free GPU memory, when cache_memory is None
    # this instance's share of its GPU's *total* memory (weights + pool), when cache_memory is
    # None: instances sharing a GPU each size their pool from their share, not from free memory
    gpu_memory_utilization: float | None = _cli(
        None, "this instance's share of its GPU's *total* memory (weights + page pool), e.g. "
        "0.4 for two instances on one GPU; the pool is sized from it, not from free memory "
        "(GPU only; ignored on CPU; --cache-memory overrides it)", parse=fraction,
        metavar="FRACTION")
    kv_transport_floor_gbps: float | None = _cli(
        None, "calibrated P->D bandwidth below which the pair is called slow (default: 5 GB/s "
        "for GPU-to-GPU pairs, none for CPU pairs)", parse=non_negative, metavar="GBPS")
    kv_require_fast_transport: bool = _cli(
        False, "refuse a P/D pair whose calibrated bandwidth is below the floor (its requests "
        "then fall back per --on-transfer-failure)")
    kernel_block_size: int = _cli(16, "attention kernel block size in tokens",
                                  parse=positive_int)
    enforce_eager: bool = _cli(False, "no CUDA graphs for decode steps (eager everywhere)")
    max_num_batched_tokens: int = _cli(512, "tokens scheduled per engine step at most",
                                       parse=positive_int)
    max_num_seqs: int = _cli(64, "sequences running at once at most", parse=positive_int)
    max_model_len: int | None = _cli(
        None, "longest sequence (prompt + output) served; refused when above the model's "
        "max_position_embeddings (default: that limit)", parse=positive_int)
    tp_size: int = _cli(1, "tensor-parallel size (GPUs, or CPU processes, per instance)",
                        "-tp", "--tensor-parallel-size", "--tp", parse=positive_int, metavar="N")
    seed: int = _cli(0, "seed of the sampler's random generator", parse=int)
    engine_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    side_channel_host: str = "127.0.0.1"  # serve derives it from --side-channel-host / --host
    side_channel_port: int = _cli(
        0, "P/D side-channel port of the instance (0: ephemeral): one per instance, on rank 0",
        parse=port_number,
        metavar="PORT")
    lease_s: float = _cli(
        10.0, "how long a prefill instance holds a request's state without a renewal from D",
        parse=positive_float, metavar="SECONDS")
    # P frees a hand-off's blocks this long after issuing it however often D renews (None:
    # 6 x lease_s); D refuses signed hand-offs older than this.
    max_lease_s: float | None = _cli(
        None, "a prefill instance frees a hand-off's state this long after issuing it, however "
        "often D renews (default: 6 x --lease-s)", parse=positive_float, metavar="SECONDS")
    transfer_timeout_s: float = _cli(30.0, "deadline on one KV transfer (READ)",
                                     parse=positive_float, metavar="SECONDS")
    handshake_timeout_s: float = _cli(5.0, "deadline on the P/D side-channel handshake",
                                      "--kv-handshake-timeout-s", parse=positive_float,
                                      metavar="SECONDS")
    queue_timeout_s: float | None = None  # a request not started within it fails (queue timeout)
    kv_secret: str | None = field(default=None, repr=False)  # signs / checks hand-offs

    def __post_init__(self) -> None:
        object.__setattr__(self, "role", Role(self.role))
        object.__setattr__(self, "handoff", HandoffMode(self.handoff))
        object.__setattr__(self, "on_transfer_failure", FailurePolicy(self.on_transfer_failure))
        dtype = DType.AUTO.value if self.dtype in (None, DType.AUTO) else self.dtype
        object.__setattr__(self, "dtype", dtype if dtype == DType.AUTO.value
                           else canonical_dtype(dtype))
        if self.ssm_state_dtype not in (None, DType.AUTO):
            object.__setattr__(self, "ssm_state_dtype", canonical_dtype(self.ssm_state_dtype))
        else:
            object.__setattr__(self, "ssm_state_dtype", None)
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


def cli_options() -> tuple[CliOption, ...]:
    """Every `EngineArgs` field that has a command-line flag, in declaration order."""
    out = []
    for f in fields(EngineArgs):
        meta = f.metadata.get("cli")
        if meta is None:
            continue
        enum_type = meta["enum"]
        default = f.default if f.default is not MISSING else None
        if isinstance(default, enum.Enum):
            default = default.value
        out.append(CliOption(
            dest=f.name, flags=meta["flags"] or (f"--{f.name.replace('_', '-')}",),
            help=meta["help"], default=default, parse=meta["parse"],
            choices=None if enum_type is None else tuple(e.value for e in enum_type),
            metavar=meta["metavar"], is_flag=isinstance(default, bool),
        ))
    return tuple(out)


def engine_kwargs(values: dict[str, Any]) -> dict[str, Any]:
    """The `EngineArgs` keyword arguments among `values` (e.g. `vars(parsed_args)`)."""
    names = {o.dest for o in cli_options()}
    return {k: v for k, v in values.items() if k in names}
