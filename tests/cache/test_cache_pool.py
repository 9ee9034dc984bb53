"""BlockPool: null block, lowest-first allocation, exact freeing, misuse detection."""

from __future__ import annotations

import numpy as np
import pytest

from hybridpd.cache.pool import NULL_BLOCK, BlockPool, OutOfBlocksError


def test_allocate_lowest_first_and_never_null():
    pool = BlockPool(6)
    assert pool.num_total_usable == 5 and pool.num_free == 5 and pool.num_blocks == 6
    a = pool.allocate(3)
    assert a == [1, 2, 3] and NULL_BLOCK not in a
    b = pool.allocate(2)
    assert b == [4, 5] and pool.num_free == 0 and pool.num_allocated == 5
    pool.free([2, 4])
    assert pool.allocate(2) == [2, 4]


def test_exhaustion_raises_and_changes_nothing():
    pool = BlockPool(4)
    pool.allocate(2)
    assert not pool.can_allocate(2) and pool.can_allocate(1)
    with pytest.raises(OutOfBlocksError):
        pool.allocate(2)
    assert pool.num_free == 1
    assert pool.allocate(0) == []
    with pytest.raises(ValueError):
        pool.allocate(-1)


@pytest.mark.parametrize("bad", [[0], [7], [-1], [True], ["1"], [1.0]])
def test_free_rejects_foreign_ids(bad):
    pool = BlockPool(7)
    pool.allocate(6)
    with pytest.raises(ValueError):
        pool.free(bad)
    assert pool.num_free == 0


def test_double_free_and_repeats_raise_without_partial_free():
    pool = BlockPool(8)
    ids = pool.allocate(4)
    pool.free(ids[:2])
    with pytest.raises(ValueError, match="double free"):
        pool.free([ids[2], ids[0]])  # ids[0] is already free
    assert pool.is_allocated(ids[2]) and pool.num_free == 5
    with pytest.raises(ValueError):
        pool.free([ids[3], ids[3]])
    assert pool.is_allocated(ids[3])


def test_random_churn_never_leaks_or_duplicates():
    rng = np.random.default_rng(0)
    pool = BlockPool(33)
    held: list[list[int]] = []
    for _ in range(400):
        if held and (rng.random() < 0.5 or not pool.can_allocate(4)):
            pool.free(held.pop(int(rng.integers(len(held)))))
        else:
            held.append(pool.allocate(int(rng.integers(0, 5))))
        owned = [b for h in held for b in h]
        assert len(owned) == len(set(owned))
        assert pool.num_free + len(owned) == 32
    for h in held:
        pool.free([np.int64(b) for b in h])  # numpy ints are accepted
    assert pool.num_free == 32 and pool.allocate(32) == list(range(1, 33))
