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

The barrier is MPI's own (comm.Ibarrier), waited for asleep: a rank waiting at it leaves its core to
the others and can be interrupted; the run uses its own duplicate communicator (rpc.Run), so a step
that was interrupted leaves no barrier half-entered for the next run.
"""
import time
from dataclasses import dataclass

import numpy as np

from . import rpc

__all__ = ["harmonic", "expected_slowest", "expected_wait", "run_barrier_steps", "BarrierSteps"]


def harmonic(n):
    """H_n = 1 + 1/2 + ... + 1/n (H_0 = 0)."""
    return float(sum(1.0 / k for k in range(1, n + 1)))


def expected_slowest(n_workers, mean):
    """E[max of n_workers independent exponential delays of this mean] = H_n * mean."""
    return harmonic(n_workers) * mean


def expected_wait(n_workers, mean):
    """The expected time one of n_workers waits at the barrier for the slowest: (H_n - 1) * mean."""
    return (harmonic(n_workers) - 1.0) * mean


@dataclass
class BarrierSteps:
    delays: np.ndarray      # (ranks, steps): each rank's work at each step, seconds
    waits: np.ndarray       # (ranks, steps): the time from a rank's arrival at the barrier to its release
    step_times: np.ndarray  # (steps,): from the step's common start to the last rank's release

    @property
    def floor(self):
        """What each step would cost if the barrier were free: the slowest rank's work."""
        return self.delays.max(axis=0)


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
