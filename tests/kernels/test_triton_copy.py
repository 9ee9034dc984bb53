"""The one-launch byte-range gather vs `copy_ranges_ref` on fresh random bytes: word and byte
paths, ranges of very different lengths, zero-length ranges, unsorted and scattered offsets.
Interpreted on CPU (TRITON_INTERPRET=1); on a GPU with 8B-page-sized ranges."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

pytest.importorskip("triton")

from hybridpd.kernels.copy import copy_ranges_ref  # noqa: E402
from hybridpd.kernels.triton_copy import copy_pieces_triton, piece_bytes, warm_up  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
CASES = [(40, 5000, 8, 0), (37, 3001, 1, 1), (6, 20000, 16, 2)]
if CUDA:
    CASES += [(95, 4259840, 16, 3), (400, 65536, 8, 4)]


def _ranges(n: int, max_len: int, align: int, g: np.random.Generator, pool: int
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n disjoint destination ranges (shuffled order) and source ranges anywhere."""
    length = (g.integers(0, max_len // align + 1, n) * align).astype(np.int64)
    length[0] = 0  # a zero-length range copies nothing
    slots = g.permutation(n)
    dst = (slots * max_len).astype(np.int64)
    src = (g.integers(0, (pool - max_len) // align, n) * align).astype(np.int64)
    return src, dst, length


@pytest.mark.parametrize("n,max_len,align,seed", CASES)
def test_gather_equals_the_reference(n, max_len, align, seed) -> None:
    g = np.random.default_rng(seed)
    pool = n * max_len + max_len
    src_off, dst_off, length = _ranges(n, max_len, align, g, pool)
    src = torch.from_numpy(g.integers(0, 256, pool, dtype=np.uint8)).to(DEV)
    got = torch.zeros(pool, dtype=torch.uint8, device=DEV)
    want = torch.zeros(pool, dtype=torch.uint8, device=DEV)
    copy_ranges_ref(src, want, src_off.tolist(), dst_off.tolist(), length.tolist())
    from hybridpd.disagg.cuda_ipc import _pieces
    from hybridpd.disagg.plan import ReadPlan

    words = align % 8 == 0
    pieces = _pieces(ReadPlan(0, src_off, dst_off, length), piece_bytes(words))
    assert int(pieces[2].max()) <= piece_bytes(words)
    offs = [torch.from_numpy(a).to(DEV) for a in pieces]
    copy_pieces_triton(src, got, *offs, words=words)
    assert torch.equal(got, want)


def test_bad_inputs_are_refused() -> None:
    z = torch.zeros(16, dtype=torch.int64, device=DEV)
    u8 = torch.zeros(16, dtype=torch.uint8, device=DEV)
    with pytest.raises(ValueError, match="uint8"):
        copy_pieces_triton(z, u8, z[:1], z[:1], z[:1], False)
    with pytest.raises(ValueError, match="alike"):
        copy_pieces_triton(u8, u8, z[:1], z[:2], z[:1], False)
    with pytest.raises(ValueError, match="whole words"):
        copy_pieces_triton(u8[:12], u8, z[:1], z[:1], z[:1] + 8, True)
    warm_up(DEV)  # both variants compile and run
