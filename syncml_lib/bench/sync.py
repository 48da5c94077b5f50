"""`bench sync`: what chapter 01's mechanisms cost per operation, against MPI's own (chapter 01).

    make bench BENCH=sync
    make bench BENCH=sync BENCH_ARGS="--steps 20 --rounds 20 --repeat 3"
Two tables. Barriers: a step of nothing but synchronization, by MPI's Barrier, by MPI's Ibarrier
waited for asleep (barrier.run_barrier_steps), and by clock messages among the workers
(consistency.run_clocked_workers with BSP and SSP s = 1): time per step, ratio to MPI's Barrier.
Shared updates: one update of a shared value per worker and round, by each method of
shared_value.run_shared_updates (free-running and gated), against MPI's own atomic update of a value
on rank 0, one-sided MPI_Accumulate in a passive-target epoch: time per round, ratio to
MPI_Accumulate, and the updates each lost. Needs 2 ranks (a server and a worker).
"""
import functools

import numpy as np
from mpi4py import MPI

from ..barrier import run_barrier_steps
from ..consistency import run_clocked_workers
from ..shared_value import run_shared_updates
from .common import format_time, print_table, progress, require_ranks, time_calls


def mpi_barriers(comm, steps):
    for _ in range(steps):
        comm.Barrier()


def time_barriers(comm, steps, repeat):
    """{name: seconds per step} of `steps` steps that do nothing but synchronize."""
    zeros = np.zeros(steps)
    calls = {"MPI Barrier": functools.partial(mpi_barriers, comm, steps),
             "Ibarrier, waited asleep": functools.partial(run_barrier_steps, comm, zeros),
             "clock messages, BSP": functools.partial(run_clocked_workers, comm, zeros, 0),
             "clock messages, SSP s=1": functools.partial(run_clocked_workers, comm, zeros, 1)}
    return {name: seconds / steps for name, seconds in time_calls(comm, calls, repeat).items()}


def mpi_accumulates(comm, window, rounds, delta):
    """Every worker adds delta to the value on rank 0, `rounds` times, with MPI's own atomic update."""
    if comm.rank:
        for _ in range(rounds):
            window.Lock(0, MPI.LOCK_SHARED)
            window.Accumulate(delta, 0, op=MPI.SUM)
            window.Unlock(0)
    comm.Barrier()


def accumulates_lost(comm, window, rounds, delta):
    """One more run of mpi_accumulates on a value set to zeros first: the updates it lost (rank 0 reads)."""
    held = np.frombuffer(window.tomemory(), dtype=np.float64) if comm.rank == 0 else None
    if comm.rank == 0:
        window.Lock(0, MPI.LOCK_EXCLUSIVE)
        held[:] = 0.0
        window.Unlock(0)
    comm.Barrier()
    mpi_accumulates(comm, window, rounds, delta)
    lost = 0
    if comm.rank == 0:
        window.Lock(0, MPI.LOCK_EXCLUSIVE)
        lost = int(round(rounds * len(held) - held.sum()))
        window.Unlock(0)
    return comm.bcast(lost)


UPDATES = [("add", False), ("overwrite", False), ("cas", False), ("overwrite", True), ("cas", True)]


def time_updates(comm, rounds, repeat):
    """({name: seconds per round}, {name: (lost, made)}): every worker updates once per round."""
    workers = comm.size - 1
    window = MPI.Win.Allocate(workers * 8 if comm.rank == 0 else 0, disp_unit=8, comm=comm)
    delta = np.zeros(workers)
    if comm.rank:
        delta[comm.rank - 1] = 1.0
    calls = {"MPI Accumulate": functools.partial(mpi_accumulates, comm, window, rounds, delta)}
    for method, gate in UPDATES:
        calls[f"{method}{', gated' if gate else ''}"] = functools.partial(run_shared_updates, comm, method,
                                                                          rounds=rounds, gate=gate)
    times = {name: seconds / rounds for name, seconds in time_calls(comm, calls, repeat).items()}
    losses = {"MPI Accumulate": (accumulates_lost(comm, window, rounds, delta), rounds * workers, 0.0)}
    window.Free()
    for method, gate in UPDATES:
        result = run_shared_updates(comm, method, rounds=rounds, gate=gate)
        losses[f"{method}{', gated' if gate else ''}"] = (result.lost, result.made, result.requests / result.made)
    return times, losses


def main(args):
    comm = MPI.COMM_WORLD
    require_ranks(comm, "sync", 2, "a server and a worker")
    progress(comm, "barriers")
    barriers = time_barriers(comm, args.steps, args.repeat)
    progress(comm, "updates of a shared value")
    updates, losses = time_updates(comm, args.rounds, args.repeat)
    if comm.rank:
        return
    p = comm.size
    print(f"a step of synchronization only on {p} ranks: median over {args.repeat} runs of {args.steps} steps of the "
          f"slowest rank's time, per step (ratio to MPI Barrier)")
    base = barriers["MPI Barrier"]
    print_table(["barrier", "time per step", "ratio"],
                [[name, format_time(seconds), f"{seconds / base:.2f}x"] for name, seconds in barriers.items()])
    print(f"\none update of a shared value per worker and round, {p - 1} workers, {args.rounds} rounds: median over "
          f"{args.repeat} runs of the slowest rank's time, per round (ratio to MPI's atomic Accumulate on rank 0)")
    base = updates["MPI Accumulate"]
    rows = [[name, format_time(updates[name]), f"{updates[name] / base:.2f}x", f"{lost} of {made}",
             f"{requests:.2f}" if requests else "none (one-sided)"] for name, (lost, made, requests) in losses.items()]
    print_table(["method", "time per round", "ratio", "updates lost", "requests per update"], rows)
