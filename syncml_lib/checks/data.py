"""Chapter 04's exercises: a real scatter, the sampler's indices for an epoch, the owners of a key.

The scatter runs through a communicator that counts the collectives and the bytes each rank receives
by broadcast; the ring's owners are then put in place of kvstore.ring_owners inside a real store.
"""
import numpy as np

from .harness import _anyone, _call, _CountingComm, _in_place_of, _show, exercise_check

SCATTER_TRIALS = ((10, 3), (13, 2), (3, 4), (1000, 8))  # (rows, columns): 13 and 3 leave some ranks a row short
# the broadcasts a look-alike scatter might use: buffer-based ones with (the keyword and the position of) the
# buffer they fill; pickle-based ones (None) deliver the object they return
BROADCASTS = {"Bcast": ("buf", 0), "Allgather": ("recvbuf", 1), "bcast": None, "allgather": None}


def _received_bytes(name, args, kwargs, returned):
    """The bytes a broadcast delivered to this rank: the size of the buffer it filled, or of the pickle
    of the object it returned (what mpi4py sent: a ragged header or a list pickles as well as an array)."""
    if BROADCASTS[name] is None:
        from mpi4py import MPI  # here: the notebook's kernel imports the checks and never starts MPI

        return len(MPI.pickle.dumps(returned))
    keyword, position = BROADCASTS[name]
    buffer = kwargs[keyword] if keyword in kwargs else args[position]
    buffer = buffer[0] if isinstance(buffer, (list, tuple)) else buffer  # [array, MPI.DOUBLE] and the like
    return memoryview(buffer).nbytes


class _WatchingComm(_CountingComm):
    """A _CountingComm that also adds up the bytes each rank receives through broadcasts."""

    def __init__(self, comm):
        super().__init__(comm)
        self.broadcast_bytes = 0

    def __getattr__(self, name):
        attribute = super().__getattr__(name)
        if name not in BROADCASTS:
            return attribute

        def watched(*args, **kwargs):
            returned = attribute(*args, **kwargs)
            self.broadcast_bytes += _received_bytes(name, args, kwargs, returned)
            return returned
        return watched


_scatter_calls = [0]  # how many times this process ran the check: each run gets data of its own


def _scatter_rows_on_rank(comm, scatter_rows):
    from ..data import block_range

    problems = []
    _scatter_calls[0] += 1
    for trial, (n, d) in enumerate(SCATTER_TRIALS):
        # data that differs from any earlier run's, so rows left over in reused memory cannot pass
        full = np.random.default_rng([4000 + trial, _scatter_calls[0]]).normal(size=(n, d))
        block = block_range(n, comm.size, comm.rank)
        expected = full[block.start:block.stop]
        watching = _WatchingComm(comm)
        got, error = _call(scatter_rows, watching, full.copy() if comm.rank == 0 else None, n, d)
        called = comm.allgather("Scatterv" in watching.collectives)  # (on comm itself, not through the learner's)
        call = f"trial {trial} ({n} rows of {d} on {comm.size} ranks)"
        if error:
            problems.append(f"{call}: your function {error}")
        elif comm.rank != 0 and watching.broadcast_bytes >= full.nbytes:
            problems.append(f"{call}: this rank received {watching.broadcast_bytes} bytes through "
                            f"{', '.join(n for n in watching.collectives if n in BROADCASTS)}: all {n} rows "
                            f"({full.nbytes} bytes), to keep {len(block)}; a scatter sends each rank only its own "
                            f"rows, with comm.Scatterv")
        elif "Scatterv" not in watching.collectives:
            others = [r for r, did in enumerate(called) if did]
            problems.append(f"{call}: your function made the collective calls {watching.collectives or 'none'} on "
                            f"this rank; every rank must call comm.Scatterv (rank 0 with the data, the others "
                            f"with None)" + (f". Ranks {others} did call it: their messages stay unreceived (in this "
                                             f"check's own communicator, so the next check is not disturbed)"
                                             if others else ""))
        elif not isinstance(got, np.ndarray) or got.shape != expected.shape:
            problems.append(f"{call}: returned {type(got).__name__} of shape {getattr(got, 'shape', '?')}, expected "
                            f"this rank's rows {block.start}..{block.stop - 1}, shape {expected.shape}")
        elif not np.array_equal(got, expected):
            wrong = int(np.flatnonzero(got.ravel() != expected.ravel())[0])
            if wrong > 0:
                problems.append(f"{call}: the first {wrong} values of this rank's block are right, value {wrong} "
                                f"is not: check the counts, the number of elements (rows times d) each rank gets")
            else:
                found = [r for r in range(n) if np.array_equal(full[r], got[0])]
                problems.append(f"{call}: row 0 of this rank's block should be row {block.start} of the data, got "
                                + (f"row {found[0]}" if found else _show(got[0])) +
                                " (check the displacements: where each rank's block starts in the data, in elements)")
        if _anyone(comm, problems):
            break
    return problems


@exercise_check(_scatter_rows_on_rank)
def check_scatter_rows(scatter_rows):
    """scatter_rows(comm, data, n, d) must give rank r rows block_range(n, size, r) of root 0's data, by Scatterv."""


SAMPLER_CASES = ((10, 0, 11), (10, 1, 11), (12, 2, 11), (7, 0, 11), (3, 1, 11), (10, 0, 12))
# (items, epoch, seed); 10, 7 and 3 need padding on 4 ranks. Seed 12, epoch 0 against seed 11, epoch 1:
# seeding with seed + epoch would make them the same.


def _epoch_problem(everyone, n, epoch, size):
    """What is wrong with every rank's indices for one epoch (a list by rank), or None."""
    per_rank = -(-n // size)
    for rank, got in enumerate(everyone):
        if len(got) != per_rank:
            return (f"epoch {epoch}, n={n}: rank {rank} got {len(got)} indices, expected {per_rank} = ceil(n / size) "
                    f"on every rank, so that all ranks run the same number of steps (pad by repeating)")
        bad = [i for i in got if not 0 <= i < n]
        if bad:
            return f"epoch {epoch}, n={n}: rank {rank} got index {bad[0]}, outside 0..{n - 1}"
    counts = np.bincount(np.concatenate(everyone).astype(int), minlength=n) if n else np.zeros(0, int)
    if (counts == 0).any():
        item = int(np.flatnonzero(counts == 0)[0])
        return f"epoch {epoch}, n={n}: item {item} is visited by no rank"
    extra = per_rank * size - n  # the padding: this many visits may repeat an item
    if int((counts - 1).sum()) > extra:
        item = int(np.flatnonzero(counts > 1)[0])
        ranks = [r for r, got in enumerate(everyone) if item in got]
        return (f"epoch {epoch}, n={n}: item {item} is visited by ranks {ranks}, more repeats than the {extra} "
                f"that padding needs: do all ranks cut the same permutation? Seed it with seed and epoch, not rank")
    return None


def _padding(everyone, n):
    """The items visited more than once in one epoch (what the padding repeats), sorted."""
    counts = np.bincount(np.concatenate(everyone).astype(int), minlength=n)
    return sorted(np.flatnonzero(counts > 1).tolist())


def _epoch_indices_on_rank(comm, epoch_indices):
    problems, seen = [], {}
    for n, epoch, seed in SAMPLER_CASES:
        case = f"epoch {epoch}, n={n}" + (f", seed={seed}" if seed != 11 else "")
        got, error = _call(epoch_indices, n, comm.size, comm.rank, epoch, seed)
        again, _ = _call(epoch_indices, n, comm.size, comm.rank, epoch, seed) if not error else (None, None)
        if error:
            problems.append(f"{case}: your function {error}")
        elif np.asarray(got).dtype.kind not in "iu":
            problems.append(f"{case}: returned indices of dtype {np.asarray(got).dtype}: indices must be integers "
                            f"(each one picks an item of the data set)")
        elif not np.array_equal(np.asarray(got), np.asarray(again)):
            problems.append(f"{case}: two calls gave different indices {_show(np.asarray(got))} and "
                            f"{_show(np.asarray(again))}: every rank must be able to compute the same permutation, "
                            f"so draw it from a generator seeded with (seed, epoch)")
        everyone = comm.allgather(None if problems else [int(i) for i in np.asarray(got).ravel()])
        if problems or None in everyone:
            break
        # every rank has every rank's indices now: each judges the whole layout (the same verdict everywhere)
        problems += filter(None, [_epoch_problem(everyone, n, epoch, comm.size)])
        seen[n, epoch, seed] = everyone
        if problems:
            break
    if problems:
        return problems
    order = {key: [i for part in everyone for i in part] for key, everyone in seen.items()}
    if order[10, 0, 11] == order[10, 1, 11]:
        return ["epochs 0 and 1 (n=10) visit the items in the same order on every rank: the permutation must "
                "change with the epoch, or every epoch repeats the first one"]
    if order[10, 0, 11] == order[10, 0, 12]:
        return ["seeds 11 and 12 give the same order (n=10, epoch 0): the permutation must depend on the seed"]
    if order[10, 0, 12] == order[10, 1, 11]:
        return ["seed 12, epoch 0 gives the same order as seed 11, epoch 1 (n=10): seeding with seed + epoch makes "
                "runs with neighbouring seeds share epochs; seed the generator with the pair [seed, epoch]"]
    repeated = [_padding(seen[10, epoch, 11], 10) for epoch in (0, 1)]
    if repeated[0] and repeated[0] == repeated[1]:
        return [f"the padding repeats items {repeated[0]} in epochs 0 and 1 (n=10): pad with items of the epoch's "
                f"own shuffle (repeat its start), not fixed items, or those items are seen more often every epoch"]
    return []


@exercise_check(_epoch_indices_on_rank)
def check_epoch_indices(epoch_indices):
    """epoch_indices(n, size, rank, epoch, seed) must give the ranks disjoint, equal parts of one shuffle per epoch."""


RING_CASES = (  # (points, key_hash, replicas, why the answer is what it is)
    ([(10, "a"), (20, "b"), (30, "c")], 15, 1, "the first point at or after 15 is 20"),
    ([(10, "a"), (20, "b"), (30, "c")], 20, 1, "a key exactly on a point belongs to that point"),
    ([(10, "a"), (20, "b"), (30, "c")], 35, 1, "past the last point the ring wraps around to the first"),
    ([(10, "a"), (20, "b"), (30, "c")], 25, 3, "going clockwise from 25: c, then a (wrapping), then b"),
    ([(10, "a"), (20, "a"), (30, "b"), (40, "c")], 5, 2, "a server with two points counts once"),
    ([(10, "a"), (20, "b"), (30, "a"), (40, "b")], 35, 2, "replicas stop at 2 distinct servers"),
)


def _ring_owners_on_rank(comm, ring_owners):
    from .. import kvstore

    problems = []
    for points, key_hash, replicas, why in RING_CASES:  # on every rank, as every client asks the ring
        expected = kvstore.ring_owners(points, key_hash, replicas)
        got, error = _call(ring_owners, list(points), key_hash, replicas)
        call = f"ring_owners({points}, key_hash={key_hash}, replicas={replicas})"
        if error:
            problems.append(f"{call}: your function {error}")
        elif not isinstance(got, (list, tuple)) or list(got) != expected:
            problems.append(f"{call} returned {got!r}, expected {expected!r}: {why}")
        if problems:
            break
    if _anyone(comm, problems) or comm.size < 2:
        return problems
    # a real store with the learner's function in place: 60 keys on the servers, one server crashes
    n_servers = min(3, comm.size - 1)
    replicas = min(2, n_servers)
    ring = kvstore.HashRing(range(n_servers))
    expected = np.zeros(n_servers, dtype=int)
    for i in range(60):
        for server in kvstore.ring_owners(ring.points, kvstore.stable_hash(f"k{i}"), replicas):
            expected[server] += 1

    def client(store):
        if store.index == 0:
            for i in range(60):
                store.put(f"k{i}", np.full(2, float(i)))
            if replicas > 1:
                store.crash(n_servers - 1)
            for i in range(60):
                if not np.array_equal(store.get(f"k{i}"), np.full(2, float(i))):
                    return f"key 'k{i}' read back wrong after server {n_servers - 1} crashed"
        return None

    try:
        with _in_place_of(kvstore, "ring_owners", ring_owners):
            result = kvstore.run_kvstore(comm, client, n_servers=n_servers, replicas=replicas)
    except Exception as exc:
        return [f"a real store ({n_servers} servers, {replicas} replicas) with your function failed: "
                f"{type(exc).__name__}: {exc}"]
    if result.returns[0]:
        return [result.returns[0]]
    if result.keys_per_server != expected.tolist():
        return [f"a real store ({n_servers} servers, {replicas} replicas) with your function holds "
                f"{result.keys_per_server} keys per server, expected {expected.tolist()} from the ring"]
    return []


@exercise_check(_ring_owners_on_rank)
def check_ring_owners(ring_owners):
    """ring_owners(points, key_hash, replicas) must return the first `replicas` distinct servers clockwise."""
