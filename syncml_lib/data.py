"""Sharding a data set over ranks, and sampling it epoch by epoch.

    block_range(10, size=4, rank=1)         # range(3, 6): contiguous, sizes 3 3 2 2
    cyclic_range(10, size=4, rank=1)        # range(1, 10, 4): 1, 5, 9
    hash_owner("user-42", size=4)           # the same rank in every process, every run
    mine = scatter_rows(comm, X if comm.rank == 0 else None)    # rank r gets X[block_range(len(X), p, r)]
    sampler = DistributedSampler(n=1000, size=4, rank=comm.rank, seed=0)
    sampler.set_epoch(3); indices = list(sampler)                 # this rank's 250 indices of epoch 3

Three ways to cut n items over p ranks, each giving every item to exactly one rank:

    block    rank r holds a contiguous range; the first n % p ranks hold one item more. Good for
             reading a file in one piece; bad when neighbouring items cost alike (sorted data).
    cyclic   rank r holds items r, r + p, r + 2p, ...: costs and classes spread evenly.
    hash     item with key k goes to stable_hash(k) % p: no index needed, keys can arrive in any
             order on any rank. It must be a hash that every process computes alike (not Python's
             hash() of a str, which differs per process: see stable_hash).

A sampler decides which items a rank visits in an epoch: one random permutation per epoch, the
same on every rank (seeded by seed and epoch), padded by wrapping around to a multiple of p, then
cut cyclically. So in every epoch the ranks see disjoint parts of one shuffle, each the same
number of items, and the shuffle changes from epoch to epoch.
"""
import hashlib

import numpy as np
from mpi4py import MPI

__all__ = ["block_range", "cyclic_range", "stable_hash", "hash_owner", "scatter_rows", "epoch_indices",
           "DistributedSampler"]


def _check_layout(n, size, rank):
    for name, value in (("n", n), ("size", size), ("rank", rank)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
            raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    if n < 0 or size < 1 or not 0 <= rank < size:
        raise ValueError(f"need n >= 0, size >= 1 and 0 <= rank < size; got n={n}, size={size}, rank={rank}")


def block_range(n, size, rank):
    """The contiguous range of the n items that `rank` of `size` ranks holds. The first n % size ranks
    hold n // size + 1 items, the others n // size: sizes differ by at most one, nothing is lost."""
    _check_layout(n, size, rank)
    base, extra = divmod(n, size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


def cyclic_range(n, size, rank):
    """Items rank, rank + size, rank + 2 size, ... of n: dealt out like cards."""
    _check_layout(n, size, rank)
    return range(rank, n, size)


def stable_hash(key):
    """A 64-bit hash of key (a str, bytes or int) that is the same in every process and every run (BLAKE2b).

    Python's built-in hash() of a str is salted per process (PYTHONHASHSEED): two ranks computing
    hash("user-42") % p get different owners, so an item lands on two ranks or on none. Other key types
    are refused: str() of an arbitrary object may hold its memory address, which differs per process."""
    if isinstance(key, bytes):
        data = b"b:" + key
    elif isinstance(key, str):
        data = b"s:" + key.encode()
    elif isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        data = b"i:" + str(int(key)).encode()  # so 1 and "1" are different keys
    else:
        raise TypeError(f"stable_hash: keys must be str, bytes or int, got {type(key).__name__}")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def hash_owner(key, size):
    """The rank of `size` ranks that holds key: stable_hash(key) % size."""
    return stable_hash(key) % size


def scatter_rows(comm, data, root=0):
    """Cut `data` (a numpy array on root; None elsewhere) into block_range row blocks and send rank r
    its block, with one buffer-based comm.Scatterv. Returns this rank's rows (a new array).

    Each rank receives only its own n/p rows: root sends n rows in all, once. (Broadcasting all of
    data and slicing on each rank looks the same from the outside, but moves p times the bytes and
    needs room for all of it on every rank.) Collective. The shape and dtype travel first in one
    small pickled bcast, so a bad `data` raises the same error on every rank."""
    header = None
    if comm.rank == root:
        if not isinstance(data, np.ndarray) or data.ndim < 1:
            what = "a 0-d array" if isinstance(data, np.ndarray) else type(data).__name__
            header = ("error", TypeError, f"scatter_rows: root's data must be a numpy array with at least one "
                                          f"dimension (rows to cut), got {what}")
        elif data.dtype.hasobject:
            header = ("error", TypeError, f"scatter_rows: data must hold numbers, not objects (dtype {data.dtype})")
        else:
            header = ("ok", data.shape, data.dtype)  # the dtype itself: structured dtypes keep their fields
    header = comm.bcast(header, root=root)
    if header[0] == "error":
        raise header[1](header[2])
    _, shape, dtype = header
    n, row = shape[0], int(np.prod(shape[1:], dtype=np.int64))
    counts = [len(block_range(n, comm.size, r)) * row for r in range(comm.size)]
    displacements = np.concatenate([[0], np.cumsum(counts)[:-1]]).tolist()
    mine = np.empty((len(block_range(n, comm.size, comm.rank)),) + shape[1:], dtype=dtype)
    send = None
    if comm.rank == root:
        flat = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
        itemsize = data.dtype.itemsize
        send = [flat, [c * itemsize for c in counts], [d * itemsize for d in displacements], MPI.BYTE]
    comm.Scatterv(send, [mine.reshape(-1).view(np.uint8), MPI.BYTE], root=root)
    return mine


def epoch_indices(n, size, rank, epoch, seed=0, shuffle=True):
    """The indices of n items that `rank` visits in `epoch`, as a numpy array.

    order = a permutation of range(n) from a generator seeded with (seed, epoch), the same on every
    rank (or range(n) itself without shuffle); padded by wrapping around to a multiple of size, so
    every rank gets ceil(n / size) indices; rank r takes order[r::size]."""
    _check_layout(n, size, rank)
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    total = -(-n // size) * size
    padded = np.resize(order, total) if n else order  # np.resize repeats from the start
    return padded[rank::size]


class DistributedSampler:
    """Which items this rank visits, epoch by epoch (the idea of PyTorch's DistributedSampler).

        sampler = DistributedSampler(n=len(X), size=comm.size, rank=comm.rank, seed=0)
        for epoch in range(3):
            sampler.set_epoch(epoch)           # forget this and every epoch repeats epoch 0's order
            for i in sampler: ...

    len(sampler) is ceil(n / size) on every rank, so the ranks run the same number of steps.
    """

    def __init__(self, n, size, rank, seed=0, shuffle=True):
        _check_layout(n, size, rank)
        self.n, self.size, self.rank, self.seed, self.shuffle = n, size, rank, seed, shuffle
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        return iter(epoch_indices(self.n, self.size, self.rank, self.epoch, self.seed, self.shuffle).tolist())

    def __len__(self):
        return -(-self.n // self.size)

