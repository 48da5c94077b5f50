"""data.py: the three shardings and the sampler in process; scatter_rows under real mpiexec with 1-5 ranks.

Every layout is checked against its definition with plain Python (which rank should hold which item),
and for the property that matters: every item on exactly one rank.
"""
import functools
import os
import subprocess
import sys

import numpy as np
import pytest

from syncml_lib.data import (DistributedSampler, block_range, cyclic_range, epoch_indices, hash_owner, scatter_rows,
                             stable_hash)
from syncml_lib.mpirun import run

LAYOUTS = [(n, p) for n in (0, 1, 3, 4, 10, 13, 100) for p in (1, 2, 3, 4, 5)]


@pytest.mark.parametrize("n, size", LAYOUTS)
def test_block_range_covers_every_item_once_in_order_and_balanced(n, size):
    ranges = [block_range(n, size, rank) for rank in range(size)]
    assert [i for r in ranges for i in r] == list(range(n))        # every item once, rank by rank
    lengths = [len(r) for r in ranges]
    assert max(lengths) - min(lengths) <= 1
    assert lengths == sorted(lengths, reverse=True)                  # the larger blocks come first
    assert all(r.step == 1 for r in ranges)


@pytest.mark.parametrize("n, size", LAYOUTS)
def test_cyclic_range_deals_items_like_cards(n, size):
    owner = {i: rank for rank in range(size) for i in cyclic_range(n, size, rank)}
    assert owner == {i: i % size for i in range(n)}


def test_bad_layouts_are_refused():
    with pytest.raises(ValueError, match="0 <= rank < size"):
        block_range(10, 4, 4)
    with pytest.raises(ValueError, match="n >= 0"):
        cyclic_range(-1, 4, 0)
    with pytest.raises(TypeError, match="n must be an integer, got float"):
        block_range(10.0, 4, 0)


def test_stable_hash_is_the_same_in_another_process_but_python_hash_is_not():
    keys = [f"user-{i}" for i in range(20)]
    code = ("import sys; from syncml_lib.data import stable_hash; keys = sys.argv[1:]; "
            "print(' '.join(str(stable_hash(k)) for k in keys)); print(' '.join(str(hash(k)) for k in keys))")
    outputs = []
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        proc = subprocess.run([sys.executable, "-c", code, *keys], env=env, capture_output=True, text=True, check=True)
        outputs.append(proc.stdout.splitlines())
    assert outputs[0][0] == outputs[1][0] == " ".join(str(stable_hash(k)) for k in keys)
    assert outputs[0][1] != outputs[1][1]                            # the built-in hash() moved
    owners = [hash_owner(k, 4) for k in keys]
    assert set(owners) <= {0, 1, 2, 3} and len(set(owners)) > 1


def test_stable_hash_takes_str_bytes_and_int_keys_only_and_keeps_them_apart():
    assert len({stable_hash(1), stable_hash("1"), stable_hash(b"1")}) == 3
    assert stable_hash(np.int64(7)) == stable_hash(7)
    for key in (object(), 1.5, True, ("a", 1)):
        with pytest.raises(TypeError, match="keys must be str, bytes or int"):
            stable_hash(key)


@pytest.mark.parametrize("n, size", [(10, 3), (12, 4), (7, 5), (1, 3), (0, 2), (100, 4)])
def test_epoch_indices_split_one_shuffle_per_epoch(n, size):
    for epoch in range(3):
        parts = [epoch_indices(n, size, rank, epoch, seed=5) for rank in range(size)]
        assert len({len(p) for p in parts}) == 1 and len(parts[0]) == -(-n // size)  # equal: ceil(n / p)
        seen = np.concatenate(parts)
        assert set(seen.tolist()) == set(range(n))                    # nothing missing
        assert len(seen) - n < size                                   # repeats: only the padding
        if n:
            interleaved = np.stack([np.resize(p, -(-n // size)) for p in parts], axis=1).reshape(-1)[:n]
            assert sorted(interleaved.tolist()) == list(range(n))      # the first n, dealt out, are a permutation
    if n > 3:
        epoch0 = [epoch_indices(n, size, 0, 0, seed=5) for _ in range(2)]
        assert np.array_equal(*epoch0)                               # the same epoch: the same order
        assert not np.array_equal(np.concatenate([epoch_indices(n, size, r, 0, 5) for r in range(size)]),
                                  np.concatenate([epoch_indices(n, size, r, 1, 5) for r in range(size)]))


def test_sampler_without_shuffle_is_cyclic_and_follows_set_epoch():
    sampler = DistributedSampler(10, size=4, rank=1, shuffle=False)
    assert list(sampler) == [1, 5, 9] and len(sampler) == 3
    shuffled = DistributedSampler(10, size=4, rank=1, seed=3)
    first = list(shuffled)
    assert list(shuffled) == first                                   # no set_epoch: the same order again
    shuffled.set_epoch(1)
    assert list(shuffled) != first and list(shuffled) == epoch_indices(10, 4, 1, 1, seed=3).tolist()


# ----------------------------------------------------------------------------- scatter_rows under mpiexec

SHAPES = [(10, 3), (3,), (0, 2), (7, 0), (13, 2, 2), (2, 5)]  # (3,) and (2, 5): fewer rows than some rank counts
STRUCTURED = np.dtype([("label", "<i4"), ("weight", "<f8")])  # must arrive with its fields, not as raw bytes


def scatter_job(comm):
    """For each shape and dtype, scatter from root 0 and from the last rank; return what each rank got."""
    got = []
    for shape in SHAPES:
        for dtype in (np.float32, np.int64, np.complex128, STRUCTURED):
            for root in {0, comm.size - 1}:
                full = (np.arange(np.prod(shape)).reshape(shape) * 3 - 7).astype(dtype)
                got.append((shape, np.dtype(dtype), root, scatter_rows(comm, full if comm.rank == root else None, root)))
    return got


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_scatter_rows_gives_each_rank_exactly_its_block(n):
    reports = run(scatter_job, n, timeout=60)
    for rank, got in enumerate(reports):
        for shape, dtype, root, mine in got:
            full = (np.arange(np.prod(shape)).reshape(shape) * 3 - 7).astype(dtype)
            block = block_range(shape[0], n, rank)
            expected = full[block.start:block.stop]
            assert mine.dtype == expected.dtype and mine.shape == expected.shape, (rank, shape, dtype, root)
            assert np.array_equal(mine, expected), (rank, shape, dtype, root)


def bad_scatter_job(comm, data_kind):
    data = {"list": [1, 2, 3], "scalar": np.float64(3.0), "0-d": np.array(3.0),
            "object": np.array([object()] * 4)}[data_kind]
    try:
        scatter_rows(comm, data if comm.rank == 0 else None)
    except TypeError as error:
        return str(error)
    return "no error"


@pytest.mark.parametrize("data_kind, message", [("list", "got list"), ("scalar", "at least one dimension"),
                                                ("0-d", "got a 0-d array"), ("object", "not objects")])
def test_bad_data_raises_the_same_error_on_every_rank(data_kind, message):
    reports = run(functools.partial(bad_scatter_job, data_kind=data_kind), 3, timeout=60)
    assert len(set(reports)) == 1 and message in reports[0], reports
