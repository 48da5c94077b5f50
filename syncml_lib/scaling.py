"""How chapter 06's training step scales with the number of ranks: measured, beside the cost model.

    row = measure_step(comm, p=3, model=WIDE, batch_size=240)     # on the first 3 ranks of comm
    row  # {'ranks': 3, 'batch': 240, 'step': 0.0041, 'compute': 0.0029, 'communication': 0.0012, ...}

Strong scaling keeps the global batch and adds ranks (each gets batch / p examples): ideally the step
takes 1/p of the time. Weak scaling keeps each rank's share (batch = p * per_rank): ideally the step
takes the same time while p times more examples are processed. Whatever does not shrink with p, the
allreduce, the step's fixed cost, is Amdahl's serial part (costmodel.amdahl): speedup <= 1 / s.

measure_step runs train() on a sub-communicator of the first p ranks (comm.Split) while the other
ranks wait asleep, so the same p engines measure every rank count. It reports medians over the steps
(the first steps, warm-up, left out), each step's time being the slowest rank's.
"""
import numpy as np

from .rpc import check_same_on_all_ranks, refuse_on_every_rank, wait_sleeping
from .training import MLP, train

__all__ = ["WIDE", "measure_step", "first_ranks"]

# chapter 06's digits network made wider, so that a step computes long enough to be worth splitting:
# 64-256-256-10, 85,002 parameters (680 KB of gradient)
WIDE = MLP((64, 256, 256, 10), name="wide")
WARM_UP = 2  # steps left out of the medians
IDLE_WHILE_TIMED = 5e-3  # seconds between looks of a rank waiting while others are timed


def first_ranks(comm, p):
    """A communicator of comm's ranks 0 .. p-1 on those ranks, None on the others (collective)."""
    from mpi4py import MPI

    sub = comm.Split(color=0 if comm.rank < p else MPI.UNDEFINED, key=comm.rank)
    return None if sub == MPI.COMM_NULL else sub


def measure_step(comm, p, *, model=WIDE, batch_size, epochs=2, lr=0.05, rounds=3, mechanism="allreduce", **options):
    """Median seconds per step of train(mechanism) on the first p ranks of comm, over the steps of `rounds`
    runs; the same dict on every rank: ranks, batch, step (the slowest rank's compute + communication),
    compute and communication (the slowest rank's), bytes_sent per rank per step, steps measured, and the
    test accuracy reached. Collective on comm: the ranks beyond p wait asleep until the others are done."""
    check_same_on_all_ranks(comm, "measure_step", p=p, batch_size=batch_size, rounds=rounds)
    if not (isinstance(p, int) and 1 <= p <= comm.size):
        raise ValueError(f"measure_step: p must be a rank count from 1 to {comm.size}, got {p!r}")
    comm = comm.Dup()  # this call's own: a run interrupted here (Ctrl-C) leaves nothing pending on the caller's
    sub = first_ranks(comm, p)
    mine = problem = None
    if sub is not None:
        rows = []
        try:
            for _ in range(rounds):
                result = train(sub, mechanism, model=model, epochs=epochs, batch_size=batch_size, lr=lr, **options)
                rows += [[r["compute"], r["communication"], r["bytes_sent"] or 0] for r in result.history[WARM_UP:]]
            mine = (rows, result.test_accuracy)
        except Exception as error:  # noqa: BLE001 - said on every rank below, also to the ranks that waited
            if getattr(error, "interrupted", False):  # Ctrl-C: the waiting ranks have left their wait too
                raise
            problem = f"train on the first {p} ranks failed: {type(error).__name__}: {error}"
        finally:
            sub.Free()
    # the ranks beyond p wait here while the first p train, looking every 5 ms only: at rpc's usual
    # interval (~60 us) two idle ranks took enough of 2 cores to slow 2 training ranks' compute by half
    wait_sleeping(comm.Ibarrier(), interval=IDLE_WHILE_TIMED)
    refuse_on_every_rank(comm, "measure_step", problem)
    everyone = comm.gather(mine, root=0)
    row = None
    if comm.rank == 0:
        steps = np.array([rows for rows, _ in everyone[:p]])  # ranks x steps x (compute, communication, bytes)
        slowest = steps.max(axis=0)
        row = dict(ranks=p, batch=batch_size, step=float(np.median(steps[:, :, :2].sum(axis=2).max(axis=0))),
                   compute=float(np.median(slowest[:, 0])), communication=float(np.median(slowest[:, 1])),
                   bytes_sent=float(np.mean(steps[:, :, 2])), steps=steps.shape[1], accuracy=everyone[0][1])
    row = comm.bcast(row, root=0)
    comm.Free()
    return row
