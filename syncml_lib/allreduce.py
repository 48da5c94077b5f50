"""AllReduce five ways, with point-to-point messages only.

    y = allreduce(comm, x, op="sum", algorithm="ring")   # y is a new array, the same on every rank

Every rank holds an array x of the same shape and dtype; afterwards every rank holds the
elementwise reduction (sum, prod, max or min) of all ranks' arrays. The algorithms differ in how
many messages they send and how big those messages are. With p ranks, n bytes per rank, a latency
of alpha seconds per message, beta seconds per byte sent and gamma seconds per byte reduced:

    naive               gather to rank 0, reduce, send back     2(p-1) alpha + 2(p-1) n beta
    tree                binomial-tree reduce, then broadcast     2 log2(p) alpha + 2 log2(p) n beta
    recursive_doubling  exchange everything with rank ^ 1, ^ 2.. log2(p) alpha + log2(p) n beta
    ring                reduce-scatter + allgather around a ring 2(p-1) alpha + 2 (p-1)/p n beta
    rabenseifner        recursive halving + recursive doubling   2 log2(p) alpha + 2 (p-1)/p n beta

(costmodel.py has the exact formulas, with gamma and the extra steps for non-powers of two.)
Few, large messages (recursive doubling) win for small n; sending each byte only about twice
(ring, Rabenseifner) wins for large n. algorithm="auto" lets the cost model choose.

All messages are buffer-based (comm.Send/Recv/Sendrecv on numpy arrays, no pickling), and no two
ranks ever block sending to each other, so nothing deadlocks at any message size. The algorithms
only use comm.rank, comm.size, Send, Recv and Sendrecv, so they run unchanged on a
trace.TracedComm, which records every message.

Input rules: x must be a numpy array (TypeError otherwise: convert with np.asarray yourself, so
no rank silently reduces a list of Python objects) with an integer, float or complex dtype; x is
never modified. max and min raise ValueError for complex arrays, as they are not defined there
(MPI's MAX and MIN are not either). allreduce() first checks, with one small pickle-based
allgather, that all ranks passed the same shape, dtype, op and algorithm; if not, every rank
raises a ValueError that names the ranks and what they had.
"""
import functools

import numpy as np

from . import costmodel
from .rpc import check_same_on_all_ranks

__all__ = ["allreduce", "naive_allreduce", "tree_allreduce", "tree_reduce", "tree_broadcast", "hierarchical_allreduce",
           "split_nodes", "allreduce_in_levels", "recursive_doubling_allreduce",
           "ring_allreduce", "ring_reduce_scatter", "ring_allgather", "rabenseifner_allreduce",
           "OPS", "ALGORITHMS"]

OPS = {"sum": np.add, "prod": np.multiply, "max": np.maximum, "min": np.minimum}


# ----------------------------------------------------------------------------- checking the input

def _check(x, op):
    """Raise TypeError or ValueError if this rank's x or op cannot be reduced; return op's ufunc."""
    if not isinstance(x, np.ndarray):
        raise TypeError(f"allreduce: x must be a numpy array, got {type(x).__name__}; "
                        f"convert it with np.asarray first")
    kind = x.dtype.kind
    if kind not in "iufc":
        raise TypeError(f"allreduce: x must have an integer, float or complex dtype, got {x.dtype}")
    ufunc = OPS.get(op) if isinstance(op, str) else None
    if ufunc is None:
        raise ValueError(f"allreduce: unknown op {op!r}; valid ops are {', '.join(OPS)}")
    if kind == "c" and op in ("max", "min"):
        raise ValueError(f"allreduce: {op} is not defined for complex numbers (dtype {x.dtype})")
    return ufunc


def _working_copy(x, op):
    """Check x and op; return (a flat copy of x to reduce into, the numpy ufunc for op)."""
    ufunc = _check(x, op)
    return x.flatten(), ufunc  # flatten always copies, so x itself is never touched


def _input_and_output(x, op):
    """Check x and op; return (x flat, to read only; a new flat array for the result; op's ufunc).

    Reading this rank's data straight from x and writing every reduction into the output saves
    copying x first (x.reshape(-1) is a view of x unless x is not contiguous).
    """
    ufunc = _check(x, op)
    mine = x.reshape(-1)
    return mine, np.empty_like(mine), ufunc


_receive_buffers = {}  # dtype -> the largest receive buffer used so far, kept for the next call


def _receive_buffer(like):
    """A scratch array of like's size and dtype to receive into, reused from call to call.

    Allocating fresh megabytes at every call costs page faults and makes timings depend on what
    the memory allocator did last time; keeping one buffer per dtype (as big as the biggest
    message so far) avoids both.
    """
    kept = _receive_buffers.get(like.dtype)
    if kept is None or kept.size < like.size:
        kept = _receive_buffers[like.dtype] = np.empty(like.size, dtype=like.dtype)
    return kept[:like.size]


def _chunk_bounds(n, p):
    """Cut n elements into p chunks whose sizes differ by at most one, as np.array_split does (the
    first n % p chunks get one more element); chunk i is [bounds[i], bounds[i + 1])."""
    size, extra = divmod(n, p)
    return [i * size + min(i, extra) for i in range(p + 1)]


# ----------------------------------------------------------------------------- naive

def naive_allreduce(comm, x, op="sum"):
    """Every rank sends its array to rank 0; rank 0 reduces them one by one and sends the result back.

    Rank 0 handles every message itself, one after the other:
    time = 2(p-1) (alpha + n beta) + (p-1) n gamma.
    """
    buf, op = _working_copy(x, op)
    if comm.rank == 0:
        incoming = _receive_buffer(buf)
        for source in range(1, comm.size):
            comm.Recv(incoming, source=source)
            op(buf, incoming, out=buf)
        for dest in range(1, comm.size):
            comm.Send(buf, dest=dest)
    else:
        comm.Send(buf, dest=0)
        comm.Recv(buf, source=0)
    return buf.reshape(x.shape)


# ----------------------------------------------------------------------------- binomial tree

def tree_reduce(comm, buf, op=np.add):
    """Binomial-tree reduce into rank 0, in place: afterwards buf on rank 0 holds op over all ranks'
    buf (the other ranks' buf holds partial results). op is a numpy ufunc.

    In round k = 0, 1, ... the ranks whose bit k is set send to rank - 2^k and drop out, so after
    ceil(log2 p) rounds rank 0 has everything: time = ceil(log2 p) (alpha + n beta + n gamma).
    """
    rank, p = comm.rank, comm.size
    incoming = _receive_buffer(buf)
    mask = 1
    while mask < p:
        if rank & mask:
            comm.Send(buf, dest=rank - mask)
            break
        if rank + mask < p:
            comm.Recv(incoming, source=rank + mask)
            op(buf, incoming, out=buf)
        mask <<= 1


def tree_broadcast(comm, buf):
    """Binomial-tree broadcast of rank 0's buf, in place: tree_reduce's rounds backwards.
    time = ceil(log2 p) (alpha + n beta)."""
    rank, p = comm.rank, comm.size
    mask = 1
    while mask < p:  # receive from the rank we would have sent to in tree_reduce
        if rank & mask:
            comm.Recv(buf, source=rank - mask)
            break
        mask <<= 1
    mask >>= 1
    while mask > 0:  # then pass on to the ranks below us in the tree
        if rank + mask < p:
            comm.Send(buf, dest=rank + mask)
        mask >>= 1


def tree_allreduce(comm, x, op="sum"):
    """Reduce up a binomial tree to rank 0, then broadcast down the same tree.

    time = 2 ceil(log2 p) (alpha + n beta) + ceil(log2 p) n gamma.
    """
    buf, op = _working_copy(x, op)
    tree_reduce(comm, buf, op)
    tree_broadcast(comm, buf)
    return buf.reshape(x.shape)


# ----------------------------------------------------------------------------- recursive doubling

@functools.cache
def _fold_plan(p):
    """How p ranks become q = 2^floor(log2 p): (q, extra, survivors). The first 2 * extra ranks pair
    up, even rank r folding into odd rank r + 1; survivors[i] is the rank that plays number i of the
    q ranks left. When p is a power of two: (p, 0, (0, 1, ..., p-1))."""
    q = 1 << (p.bit_length() - 1)
    extra = p - q
    return q, extra, tuple(2 * i + 1 if i < extra else i + extra for i in range(q))


def _fold_in(comm, mine, out, op):
    """Make the number of ranks a power of two (_fold_plan): the first `extra` even ranks send their
    data to the odd rank after them, which reduces it into out, and sit out.
    Returns where this rank's data is now (mine, or out), or None on the ranks that sit out."""
    rank = comm.rank
    _, extra, _ = _fold_plan(comm.size)
    if rank >= 2 * extra:  # always, when p is a power of two
        return mine
    if rank % 2 == 0:
        comm.Send(mine, dest=rank + 1)
        return None
    incoming = _receive_buffer(mine)
    comm.Recv(incoming, source=rank - 1)
    op(incoming, mine, out=out)
    return out


def _fold_out(comm, out):
    """Give the ranks that sat out the finished result (the reverse of _fold_in)."""
    rank = comm.rank
    _, extra, _ = _fold_plan(comm.size)
    if rank < 2 * extra:
        if rank % 2 == 0:
            comm.Recv(out, source=rank + 1)
        else:
            comm.Send(out, dest=rank - 1)


def recursive_doubling_allreduce(comm, x, op="sum"):
    """Exchange the whole array with the rank at distance 1, 2, 4, ... and reduce after each exchange.

    For p a power of two, rank r exchanges with r ^ 1, then r ^ 2, r ^ 4, ...: after k steps it
    holds the reduction over the 2^k ranks that share its high bits, so after log2 p steps it holds
    everything. time = log2 p (alpha + n beta + n gamma).
    Otherwise the first p - 2^floor(log2 p) even ranks fold into their odd neighbour first and get
    the result back at the end: 2 more steps, 2 (alpha + n beta) + n gamma.
    """
    result, op = _working_copy(x, op)  # my running result, starting as a copy of x
    q, _, survivors = _fold_plan(comm.size)  # rank survivors[i] is number i of the q ranks that take part
    if _fold_in(comm, result, result, op) is not None:
        me = survivors.index(comm.rank)
        incoming = _receive_buffer(result)
        distance = 1
        while distance < q:
            partner = survivors[me ^ distance]
            comm.Sendrecv(result, dest=partner, recvbuf=incoming, source=partner)
            # Both partners compute op(lower rank's data, higher rank's data): the same operands in
            # the same order, so they agree bit for bit (complex a * b need not equal b * a exactly).
            if comm.rank < partner:
                op(result, incoming, out=result)
            else:
                op(incoming, result, out=result)
            distance *= 2
    _fold_out(comm, result)
    return result.reshape(x.shape)


# ----------------------------------------------------------------------------- ring

def ring_reduce_scatter(comm, chunks, op=np.add, out=None):
    """Ring reduce-scatter: afterwards chunk (rank + 1) % p is reduced over all ranks.

    chunks is a list of p views of this rank's data (sizes differing by at most one) and op a
    numpy ufunc. The reductions go into chunks themselves (in place), or into out, a list of p
    chunks of the same sizes, leaving chunks untouched. At step s = 0 .. p-2, rank r sends chunk
    (r - s) % p to its right neighbour (its own data at step 0, then what it reduced the step
    before) and reduces chunk (r - s - 1) % p, arriving from its left neighbour, with its own.
    time = (p-1) alpha + (p-1)/p n beta + (p-1)/p n gamma.
    """
    rank, p = comm.rank, comm.size
    sums = chunks if out is None else out
    right, left = (rank + 1) % p, (rank - 1) % p
    incoming = _receive_buffer(chunks[0])  # chunk 0 is the largest one
    for step in range(p - 1):
        send = chunks[rank] if step == 0 else sums[(rank - step) % p]
        chunk = (rank - step - 1) % p
        received = incoming[:chunks[chunk].size]
        comm.Sendrecv(send, dest=right, recvbuf=received, source=left)
        op(chunks[chunk], received, out=sums[chunk])
    if p == 1:
        sums[0][...] = chunks[0]  # alone, my data is the whole reduction


def ring_allgather(comm, chunks):
    """Ring allgather, in place: rank r starts with chunk (r + 1) % p complete and ends with all of them.

    At step s = 0 .. p-2, rank r sends chunk (r + 1 - s) % p right and receives chunk (r - s) % p
    from the left, straight into place.  time = (p-1) alpha + (p-1)/p n beta.
    """
    rank, p = comm.rank, comm.size
    right, left = (rank + 1) % p, (rank - 1) % p
    for step in range(p - 1):
        comm.Sendrecv(chunks[(rank + 1 - step) % p], dest=right,
                      recvbuf=chunks[(rank - step) % p], source=left)


def ring_allreduce(comm, x, op="sum"):
    """Ring allreduce: cut the array into p chunks, reduce-scatter them around the ring, then allgather.

    Each rank sends 2(p-1) messages of n/p bytes, so every byte crosses each link about twice,
    whatever p is: time = 2(p-1) alpha + 2 (p-1)/p n beta + (p-1)/p n gamma.
    """
    mine, out, op = _input_and_output(x, op)
    bounds = _chunk_bounds(mine.size, comm.size)  # chunk i is [bounds[i], bounds[i + 1])
    my_chunks = [mine[bounds[i]:bounds[i + 1]] for i in range(comm.size)]
    out_chunks = [out[bounds[i]:bounds[i + 1]] for i in range(comm.size)]
    ring_reduce_scatter(comm, my_chunks, op, out=out_chunks)  # reads x, writes out: no copy of x
    ring_allgather(comm, out_chunks)
    return out.reshape(x.shape)


# ----------------------------------------------------------------------------- Rabenseifner

def rabenseifner_allreduce(comm, x, op="sum"):
    """Reduce-scatter by recursive halving, then allgather by recursive doubling (MPICH's long-message allreduce).

    With p a power of two and the array cut into p chunks: at distance p/2, p/4, ..., 1 each rank
    sends the half of its current window that its partner keeps and reduces the half it keeps, so
    it ends with its own chunk fully reduced; then the windows double back up to the whole array.
    time = 2 log2 p alpha + 2 (p-1)/p n beta + (p-1)/p n gamma.
    Other p: fold into 2^floor(log2 p) ranks first, as recursive doubling does (2 more steps).
    """
    mine, out, op = _input_and_output(x, op)
    data = _fold_in(comm, mine, out, op)  # my partial results: x itself until the first reduction
    if data is not None:
        q, _, survivors = _fold_plan(comm.size)  # rank survivors[i] is number i of the q ranks left
        me = survivors.index(comm.rank)
        bounds = _chunk_bounds(mine.size, q)  # chunk i is elements [bounds[i], bounds[i + 1])

        def elements(chunks):
            """The elements of the chunks first .. last - 1, for chunks = (first, last)."""
            return slice(bounds[chunks[0]], bounds[chunks[1]])

        incoming = _receive_buffer(mine)

        # Reduce-scatter by recursive halving: my window of chunks halves at every step, until it is
        # chunk `me` alone, reduced over all ranks. The partner keeps the other half of the window.
        window = (0, q)
        distance = q // 2
        while distance > 0:
            partner = survivors[me ^ distance]
            middle = window[0] + distance
            lower, upper = (window[0], middle), (middle, window[1])
            kept_chunks, given_chunks = (upper, lower) if me & distance else (lower, upper)
            keep, give = elements(kept_chunks), elements(given_chunks)
            received = incoming[:keep.stop - keep.start]
            comm.Sendrecv(data[give], dest=partner, recvbuf=received, source=partner)
            op(data[keep], received, out=out[keep])
            data = out
            window = kept_chunks
            distance //= 2
        if data is mine:  # p == 1: nothing to reduce
            out[...] = mine

        # Allgather by recursive doubling: swap windows with the partner, so they double each step.
        distance = 1
        while distance < q:
            partner = me ^ distance
            my_window = (me - me % distance, me - me % distance + distance)
            their_window = (partner - partner % distance, partner - partner % distance + distance)
            comm.Sendrecv(out[elements(my_window)], dest=survivors[partner],
                          recvbuf=out[elements(their_window)], source=survivors[partner])
            distance *= 2
    _fold_out(comm, out)
    return out.reshape(x.shape)


# ----------------------------------------------------------------------------- hierarchical

def two_per_node(p):
    """The default grouping: ranks 0, 1 on node 0, ranks 2, 3 on node 1, ... (nodes[r] = r // 2)."""
    return [r // 2 for r in range(p)]


def _check_nodes(nodes, p):
    """Raise ValueError unless nodes lists an integer node id for each of the p ranks."""
    if not isinstance(nodes, (list, tuple)) or not all(
            isinstance(node, (int, np.integer)) and not isinstance(node, bool) for node in nodes):
        raise ValueError(f"hierarchical_allreduce: nodes must be a list of integer node ids, one per rank "
                         f"(nodes[r] is rank r's node), got {nodes!r}")
    if len(nodes) < p:
        raise ValueError(f"hierarchical_allreduce: nodes has {len(nodes)} entries for {p} ranks: "
                         f"rank{'s' if p - len(nodes) > 1 else ''} {', '.join(map(str, range(len(nodes), p)))} "
                         f"{'have' if p - len(nodes) > 1 else 'has'} no node")
    if len(nodes) > p:
        raise ValueError(f"hierarchical_allreduce: nodes has {len(nodes)} entries for {p} ranks: "
                         f"there is no rank {', '.join(map(str, range(p, len(nodes))))}")


def split_nodes(comm, nodes):
    """(node_comm, leaders_comm): comm cut into one communicator per node (comm.Split; the colour is the
    node's place among the sorted node ids, as colours must be >= 0; ranks keep comm's order), and one
    of the node leaders (rank 0 of each node); leaders_comm is None on the other ranks.
    Collective; free both with .Free() when done."""
    from mpi4py import MPI

    colour = sorted(set(nodes)).index(nodes[comm.rank])
    node_comm = comm.Split(color=colour, key=comm.rank)
    leaders_comm = comm.Split(color=0 if node_comm.rank == 0 else MPI.UNDEFINED, key=comm.rank)
    return node_comm, (None if leaders_comm == MPI.COMM_NULL else leaders_comm)


def hierarchical_allreduce(comm, x, op="sum", nodes=None):
    """Allreduce in three levels, for ranks grouped into nodes (nodes[r]: rank r's node; default two per node).

    1. split: one communicator per node, and one of the node leaders (split_nodes);
    2. reduce inside each node to its leader (binomial tree over the fast links);
    3. ring allreduce among the leaders (the only messages that cross the slow links);
    4. broadcast inside each node from its leader.

    With N nodes of g ranks, intra-node (a_in, b_in) and inter-node (a_out, b_out) links:
    time = 2 ceil(log2 g)(a_in + n b_in) + 2(N-1) a_out + 2 (N-1)/N n b_out (+ reductions),
    against a flat ring on all p = N g ranks, whose every step waits for a slow link:
    2(p-1) a_out + 2 (p-1)/p n b_out. So it saves 2(p-N) slow latencies, and the inter-node bytes
    shrink a little (N-1)/N < (p-1)/p, at the price of log2 g fast steps (costmodel.predict_hierarchical).
    Same input rules and errors as allreduce; nodes must be the same on every rank.
    """
    check_same_on_all_ranks(comm, "hierarchical_allreduce",
                            type=type(x).__name__, shape=getattr(x, "shape", None),
                            dtype=str(x.dtype) if isinstance(x, np.ndarray) else None,
                            op=op if isinstance(op, str) else repr(op), nodes=repr(nodes))
    nodes = two_per_node(comm.size) if nodes is None else nodes
    _check_nodes(nodes, comm.size)
    _check(x, op)
    node_comm, leaders_comm = split_nodes(comm, nodes)
    try:
        return allreduce_in_levels(node_comm, leaders_comm, x, op)
    finally:
        node_comm.Free()
        if leaders_comm is not None:
            leaders_comm.Free()


def allreduce_in_levels(node_comm, leaders_comm, x, op="sum"):
    """Steps 2-4 of hierarchical_allreduce on communicators split_nodes made: keep them and call this
    to save the two comm.Split calls (collective) of every hierarchical_allreduce. No input checks."""
    buf, ufunc = _working_copy(x, op)
    tree_reduce(node_comm, buf, ufunc)
    if leaders_comm is not None:
        buf = ring_allreduce(leaders_comm, buf, op)
    tree_broadcast(node_comm, buf)
    return buf.reshape(x.shape)


# ----------------------------------------------------------------------------- the entry point

ALGORITHMS = {
    "naive": naive_allreduce,
    "tree": tree_allreduce,
    "recursive_doubling": recursive_doubling_allreduce,
    "ring": ring_allreduce,
    "rabenseifner": rabenseifner_allreduce,
}


_auto_choices = {}  # (nbytes, p) -> costmodel.choose(nbytes, p); auto asks at every call, so remember


def allreduce(comm, x, op="sum", algorithm="ring", check=True):
    """Return a new array, equal on every rank, holding op ("sum", "prod", "max", "min") over all ranks' x.

    algorithm is one of ALGORITHMS or "auto", which asks costmodel.choose for the fastest one at
    this size and rank count (with costmodel.DEFAULT_PARAMS). check=True (the default) first makes sure, with one small allgather,
    that all ranks passed the same shape, dtype, op and algorithm, and raises ValueError on every
    rank if not; check=False skips that collective (the benchmark does, to time the algorithm alone).
    """
    if check:
        check_same_on_all_ranks(comm, "allreduce",
                                type=type(x).__name__,
                                shape=getattr(x, "shape", None),
                                dtype=str(x.dtype) if isinstance(x, np.ndarray) else None,
                                op=op if isinstance(op, str) else repr(op),
                                algorithm=algorithm if isinstance(algorithm, str) else repr(algorithm))
    if algorithm == "auto":
        key = (getattr(x, "nbytes", 0), comm.size)  # the algorithm itself checks x
        algorithm = _auto_choices.get(key) or _auto_choices.setdefault(key, costmodel.choose(*key))
    run = ALGORITHMS.get(algorithm) if isinstance(algorithm, str) else None
    if run is None:
        raise ValueError(f"allreduce: unknown algorithm {algorithm!r}; "
                         f"valid algorithms are {', '.join(ALGORITHMS)}, auto")
    return run(comm, x, op)
