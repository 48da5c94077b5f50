"""`bench data`: cutting rows over the ranks and the key-value store, against bare MPI (chapter 04).

    make bench BENCH=data
    make bench BENCH=data BENCH_ARGS="--sizes 8K 64K --repeat 5"
Two tables, one row per size. Scatter: MPI's Scatterv, data.scatter_rows and the look-alike that
broadcasts everything and slices (time_scatter). Key-value store: one put (1 and 2 replicas) and one
get by a client of a store with 2 servers, against the same bytes sent with bare MPI (time_kvstore);
it needs 3 ranks (2 servers and a client): on 2 ranks only the scatter runs.
"""
import time

import numpy as np
from mpi4py import MPI

from ..data import block_range, scatter_rows
from ..kvstore import run_kvstore
from .common import format_size, format_time, parse_size, print_table, progress, repeats_for, require_ranks, time_calls

KV_RANKS = 3  # 2 servers and a client
SCATTER = ["MPI Scatterv", "scatter_rows", "Bcast + slice"]
KVSTORE = ["MPI Send + reply", "kv put, R=1", "kv put, R=2", "kv get"]


def time_scatter(comm, nbytes, repeat):
    """{name: seconds} of cutting nbytes of float64 rows (8 per row) from rank 0 over all ranks:
    MPI's Scatterv called directly into a new array (scatter_rows returns a new array too),
    scatter_rows (the same, plus its header bcast and Python) and the look-alike that broadcasts
    everything and slices."""
    rows = nbytes // 64
    full = np.random.default_rng(0).random((rows, 8)) if comm.rank == 0 else None
    blocks = [block_range(rows, comm.size, r) for r in range(comm.size)]
    counts, starts = [len(b) * 8 for b in blocks], [b.start * 8 for b in blocks]
    everything = np.empty((rows, 8))

    def mpi_scatterv():
        mine = np.empty((len(blocks[comm.rank]), 8))
        comm.Scatterv([full, counts, starts, MPI.DOUBLE] if comm.rank == 0 else None, mine, root=0)
        return mine

    def broadcast_then_slice():
        comm.Bcast(full if comm.rank == 0 else everything, root=0)
        return (full if comm.rank == 0 else everything)[blocks[comm.rank].start:blocks[comm.rank].stop].copy()

    return time_calls(comm, {"MPI Scatterv": mpi_scatterv, "scatter_rows": lambda: scatter_rows(comm, full),
                             "Bcast + slice": broadcast_then_slice}, repeat)


def time_kvstore(comm, nbytes, repeat):
    """{name: seconds} of one put of a new key (1 and 2 replicas) and one get of an nbytes array, by the
    first client of a store with 2 servers; and of the same bytes sent with bare MPI: Send, then a
    0-byte reply. Median over `repeat` operations, on one client while the other ranks wait (asleep
    in rpc). Each put stores a new key, so its servers need new memory for it, as a store filling up
    does (the first touch of new pages is part of the cost)."""
    value = np.random.default_rng(1).random(nbytes // 8)
    times = {}
    for replicas in (1, 2):
        def client(store):
            if store.index != 0:
                return None
            puts, gets = [], []
            for i in range(repeat + 2):  # the first two warm up
                start = time.perf_counter()
                store.put(f"k{i}", value)
                puts.append(time.perf_counter() - start)
                start = time.perf_counter()
                store.get(f"k{i}")
                gets.append(time.perf_counter() - start)
            return float(np.median(puts[2:])), float(np.median(gets[2:]))
        put, get = run_kvstore(comm, client, n_servers=2, replicas=replicas).returns[0]
        times[f"kv put, R={replicas}"] = put
        if replicas == 1:
            times["kv get"] = get
    # bare MPI between the first client (rank 2) and server 0: the array one way, an empty reply back
    ack, samples = np.empty(0), []
    received = np.empty_like(value)
    for i in range(repeat + 2):
        comm.Barrier()
        start = time.perf_counter()
        if comm.rank == 2:
            comm.Send(value, dest=0)
            comm.Recv(ack, source=0)
        elif comm.rank == 0:
            comm.Recv(received, source=2)
            comm.Send(ack, dest=2)
        samples.append(time.perf_counter() - start)
    times["MPI Send + reply"] = comm.bcast(float(np.median(samples[2:])), root=2)
    return times


def bench_data(comm, sizes, repeat, kvstore=True):
    """One row per size: the times of time_scatter and, if kvstore, of time_kvstore."""
    rows = []
    for n in sizes:
        progress(comm, f"scatter{' and key-value store' if kvstore else ''} of {format_size(n)}")
        rows.append(dict(nbytes=n, **time_scatter(comm, n, repeats_for(n, repeat)),
                         **(time_kvstore(comm, n, repeats_for(n, repeat)) if kvstore else {})))
    return rows


def print_data_table(rows, p):
    """The scatter table; the key-value store's table too if the rows have its times."""
    print(f"cutting float64 rows over {p} ranks from rank 0 (median of the slowest rank; ratio to MPI Scatterv)")
    print_table(["size", *SCATTER], [[format_size(row["nbytes"])] + [
        f"{format_time(row[name])} ({row[name] / row['MPI Scatterv']:.2f}x)" for name in SCATTER] for row in rows])
    if not all(KVSTORE[0] in row for row in rows):
        return
    print(f"\nkey-value store, 2 servers, one client putting (new keys) and getting one array (median per "
          f"operation; ratio to sending the same bytes with MPI Send and a 0-byte reply)")
    print_table(["size", *KVSTORE], [[format_size(row["nbytes"])] + [
        f"{format_time(row[name])} ({row[name] / row['MPI Send + reply']:.2f}x)" for name in KVSTORE] for row in rows])


def main(args):
    comm = MPI.COMM_WORLD
    require_ranks(comm, "data", 2, "rows cut over one rank stay where they are")
    kvstore = comm.size >= KV_RANKS
    if comm.rank == 0 and not kvstore:
        print(f"bench data: the key-value store needs {KV_RANKS} ranks (2 servers and a client); on {comm.size} "
              f"ranks its table is skipped", flush=True)
    rows = bench_data(comm, [parse_size(s) for s in args.sizes], args.repeat, kvstore)
    if comm.rank == 0:
        print_data_table(rows, comm.size)
