"""Which GPUs each instance of a local deployment gets (pure: no CUDA, no processes).

Owns `place_instances`: prefill instances first, then decode, each taking `tp` consecutive
GPUs of the list it is given (so its TP ranks see devices 0..tp-1 through
`CUDA_VISIBLE_DEVICES`); refusing when there are too few; with `share=True` wrapping around
so that several instances share a GPU, each then with an explicit memory share
(`--gpu-memory-utilization`) whose sum per GPU must not exceed 1. Also maps the launcher's
device indices to the values children need when the launcher itself runs under
`CUDA_VISIBLE_DEVICES`. Must not know how instances are started.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass


class PlacementError(ValueError):
    """The requested GPUs cannot hold the deployment; the message is one line for the user."""


@dataclass(frozen=True)
class Placement:
    """One instance's devices: `visible` is its CUDA_VISIBLE_DEVICES (None: leave as is)."""

    role: str
    index: int
    tp: int
    gpus: tuple[int, ...]  # the launcher's device indices (empty on CPU)
    visible: str | None
    memory_utilization: float | None


def parse_gpu_list(text: str) -> list[int]:
    """'0,1,3' -> [0, 1, 3]; raises PlacementError on anything else (or duplicates)."""
    try:
        ids = [int(x) for x in text.split(",") if x.strip() != ""]
    except ValueError:
        raise PlacementError(f"--gpus takes comma-separated device indices, got {text!r}"
                             ) from None
    if not ids or any(i < 0 for i in ids) or len(set(ids)) != len(ids):
        raise PlacementError(f"--gpus takes distinct non-negative indices, got {text!r}")
    return ids


def place_instances(
    *,
    num_prefill: int,
    num_decode: int,
    prefill_tp: int,
    decode_tp: int,
    visible_count: int,
    gpus: list[int] | None,
    share: bool = False,
    memory_utilization: float | None = None,
    parent_visible: str | None = None,
) -> list[Placement]:
    """Prefill instances, then decode instances, with their GPUs.

    `visible_count`: GPUs the launcher sees; `gpus`: the `--gpus` list (None: all visible, or
    none on a machine without GPUs); `parent_visible`: the launcher's own
    CUDA_VISIBLE_DEVICES, to which the indices refer.
    """
    roles = [("prefill", i, prefill_tp) for i in range(num_prefill)] + [
        ("decode", i, decode_tp) for i in range(num_decode)
    ]
    if gpus is not None and visible_count == 0:
        raise PlacementError(f"--gpus {','.join(map(str, gpus))} given, but this machine has "
                             "no visible CUDA GPU (leave --gpus out to run on CPU)")
    if visible_count == 0:
        if share:
            raise PlacementError("--share-gpus needs GPUs; this machine has none visible")
        return [Placement(r, i, tp, (), None, memory_utilization) for r, i, tp in roles]
    ids = list(range(visible_count)) if gpus is None else gpus
    missing = [g for g in ids if g >= visible_count]
    if missing:
        raise PlacementError(f"--gpus names device {missing[0]}, but only {visible_count} "
                             f"GPU(s) are visible (0..{visible_count - 1})")
    need = sum(tp for _, _, tp in roles)
    if max(tp for _, _, tp in roles) > len(ids):
        raise PlacementError(f"an instance needs {max(tp for _, _, tp in roles)} GPUs (its "
                             f"TP size) but only {len(ids)} are given")
    if need > len(ids) and not share:
        raise PlacementError(
            f"{num_prefill} prefill x TP {prefill_tp} + {num_decode} decode x TP {decode_tp} "
            f"need {need} GPUs, {len(ids)} given ({','.join(map(str, ids))}); give more with "
            "--gpus or put several instances on one GPU with --share-gpus "
            "--gpu-memory-utilization F")
    shared = need > len(ids)
    if shared and memory_utilization is None:
        raise PlacementError(
            f"--share-gpus puts {need} GPU slots on {len(ids)} GPU(s): give each instance an "
            "explicit share with --gpu-memory-utilization (e.g. 0.4 for two per GPU)")
    out, cursor = [], 0
    for role, i, tp in roles:
        mine = tuple(ids[(cursor + k) % len(ids)] for k in range(tp))
        cursor += tp
        out.append(Placement(role, i, tp, mine, _visible(mine, parent_visible),
                             memory_utilization))
    if memory_utilization is not None:
        per_gpu = Counter(g for p in out for g in p.gpus)
        worst, count = per_gpu.most_common(1)[0]
        if count * memory_utilization > 1.0 + 1e-9:
            raise PlacementError(
                f"GPU {worst} holds {count} instances at --gpu-memory-utilization "
                f"{memory_utilization}: {count * memory_utilization:.2f} of its memory (> 1); "
                f"use at most {1.0 / count:.2f}")
    return out


def _visible(gpus: tuple[int, ...], parent_visible: str | None) -> str:
    if parent_visible is None or parent_visible.strip() == "":
        return ",".join(map(str, gpus))
    entries = [e.strip() for e in parent_visible.split(",") if e.strip()]
    return ",".join(entries[g] for g in gpus)
