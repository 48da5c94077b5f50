"""The price of a barrier: every step lasts as long as its slowest worker.

    steps = run_barrier_steps(comm, delays)     # delays[t]: this rank's work at step t, in seconds
    steps.step_times     # per step, the time from the step's start to the barrier's end (the same on all ranks)
    steps.waits          # per rank and step, the time that rank spent waiting at the barrier

A BSP step is: compute, then wait at a barrier until every worker has computed. With W workers whose
step times are independent draws, the step takes the largest of W draws, and a worker waits, on
average, E[max] - mean. For exponential delays with mean m, E[max of W] = H_W * m, with H_W = 1 +
1/2 + ... + 1/W the harmonic number (the maximum of W exponentials is a sum of exponentials with
rates W, W-1, ..., 1): so the expected wait of one worker is (H_W - 1) * m, which grows like
ln(W) * m without bound.

The wait comes from the spread of the step times, not from their mean: a constant that every worker
spends (the same work on every rank) moves the slowest by as much as everyone, and cancels from the
wait. delays_with_spread(rng, mean, spread, n) draws the constant mean - spread plus an exponential of
mean `spread` (standard deviation `spread`): E[max of W] = mean - spread + H_W * spread, and a worker
waits (H_W - 1) * spread = expected_wait(W, spread), whatever the mean.

The barrier is MPI's own (comm.Ibarrier), waited for asleep: a rank waiting at it leaves its core to
the others and can be interrupted; the run uses its own duplicate communicator (rpc.Run), so a step
that was interrupted leaves no barrier half-entered for the next run.
"""
import time
from dataclasses import dataclass

import numpy as np

from . import rpc

__all__ = ["harmonic", "expected_slowest", "expected_wait", "delays_with_spread", "run_barrier_steps",
           "BarrierSteps"]


def harmonic(n):
    """H_n = 1 + 1/2 + ... + 1/n (H_0 = 0)."""
    return float(sum(1.0 / k for k in range(1, n + 1)))


def expected_slowest(n_workers, mean):
    """E[max of n_workers independent exponential delays of this mean] = H_n * mean."""
    return harmonic(n_workers) * mean


def expected_wait(n_workers, mean):
    """The expected time one of n_workers waits at the barrier for the slowest: (H_n - 1) * mean."""
    return (harmonic(n_workers) - 1.0) * mean


def delays_with_spread(rng, mean, spread, size):
    """`size` step times of this mean and standard deviation `spread` (0 <= spread <= mean): the constant
    mean - spread plus an exponential draw of mean `spread`; spread = mean is the plain exponential. Two
    calls with generators of the same seed draw the same standard exponentials, scaled by the spread, so
    runs that differ only in the spread compare like with like. Cost: one draw per step."""
    if not 0 <= spread <= mean:
        raise ValueError(f"the spread must be between 0 and the mean ({mean}); got {spread}")
    return mean - spread + spread * rng.standard_exponential(size)


@dataclass
class BarrierSteps:
    delays: np.ndarray      # (ranks, steps): each rank's work at each step, seconds
    waits: np.ndarray       # (ranks, steps): the time from a rank's arrival at the barrier to its release
    step_times: np.ndarray  # (steps,): from the step's common start to the last rank's release

    @property
    def floor(self):
        """What each step would cost if the barrier were free: the slowest rank's work."""
        return self.delays.max(axis=0)

    @property
    def floor_waits(self):
        """(ranks, steps): what each rank would wait if the barrier were free, the slowest's work minus its own."""
        return self.floor - self.delays


def run_barrier_steps(comm, delays):
    """Collective: for each step t, sleep delays[t] seconds (this rank's work), then wait at a barrier.
    Every rank must pass the same number of steps, each >= 0 (else ValueError on every rank). Returns BarrierSteps
    on every rank. Cost: one barrier per step, about 2 log2(p) message latencies after the last arrival."""
    delays = np.asarray(delays, dtype=float)
    with rpc.Run(comm, "run_barrier_steps") as run:
        with run.setup():
            bad = delays.ndim != 1 or (delays < 0).any() or not np.isfinite(delays).all()
            rpc.refuse_on_every_rank(run.comm, "run_barrier_steps", "delays must be a 1-D array of seconds >= 0" if bad else None)
            rpc.check_same_on_all_ranks(run.comm, "run_barrier_steps", steps=len(delays))
        waits, step_times = np.zeros(len(delays)), np.zeros(len(delays))
        for t, delay in enumerate(delays):
            start = time.perf_counter()
            time.sleep(delay)
            arrived = time.perf_counter()
            rpc.complete(run.comm, [run.comm.Ibarrier()])
            released = time.perf_counter()
            waits[t], step_times[t] = released - arrived, released - start
        everyone = run.allgather((delays, waits, step_times))
    return BarrierSteps(np.array([d for d, _, _ in everyone]), np.array([w for _, w, _ in everyone]),
                        np.max([s for _, _, s in everyone], axis=0))
