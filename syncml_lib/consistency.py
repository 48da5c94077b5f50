"""BSP, SSP and ASP as one rule over iteration clocks, run by workers that message each other.

    run = run_clocked_workers(comm, delays, staleness=1)   # delays[t]: this rank's work at iteration t
    run.iterations[0]  # {'rank': 0, 'iteration': 0, 'start': 0.0, 'end': 0.011, 'slowest': 0, 'staleness': 0}
    run.messages       # every clock message, as trace records (syncml_lib.trace), for diagrams and Lamport clocks

Every rank is a worker with an *iteration clock*: the number of iterations it has finished. After each
iteration it sends its new clock to every other worker (a one-element int64 array, buffer-based
Isend). The consistency model is one rule about when a worker may start iteration t:

    every other worker's clock, as far as this worker has heard, is at least t - s

    BSP  s = 0     iteration t waits for everyone to finish iteration t - 1: a barrier at every step
    SSP  s > 0     nobody runs more than s iterations ahead of the slowest (Ho et al., NIPS 2013)
    ASP  s = None  nobody ever waits

`staleness` in each row is t minus the slowest clock the worker had heard of when it started: how
many of the slowest worker's iterations it had not seen, at most s. Cost per iteration: p - 1 small
messages sent and p - 1 received by every worker; the waiting is what the rule costs.

The waits are loops that sleep between looks (rpc.wait_until): interruptible, and the run is on its
own duplicate communicator (rpc.Run), so an interrupt or an error on one rank ends it on every rank.
"""
import time
from dataclasses import dataclass, field

import numpy as np

from . import rpc
from .trace import TracedComm

__all__ = ["run_clocked_workers", "ClockedRun", "makespan_floor", "CLOCK_TAG"]

CLOCK_TAG = 11  # every clock message has this tag: between two ranks they arrive in the order they were sent


@dataclass
class ClockedRun:
    staleness: object       # s, or None for ASP
    iterations: list        # one dict per rank and iteration: rank, iteration, start, end, slowest, staleness
    messages: list = field(repr=False)  # the clock messages' trace records of every rank (trace.gather_trace)

    def of_rank(self, rank):
        return [row for row in self.iterations if row["rank"] == rank]

    @property
    def makespan(self):
        """Seconds from the common start to the last iteration's end."""
        return max((row["end"] for row in self.iterations), default=0.0)

    @property
    def waited(self):
        """Seconds each rank spent waiting before its iterations (start minus the previous end), by rank."""
        waited = []
        for rank in sorted({row["rank"] for row in self.iterations}):
            rows = self.of_rank(rank)
            previous_ends = [0.0] + [row["end"] for row in rows[:-1]]
            waited.append(sum(row["start"] - end for row, end in zip(rows, previous_ends)))
        return waited


def makespan_floor(delays, staleness):
    """When the last iteration would end if messages cost nothing: delays[r][t] is rank r's work at
    iteration t, and a rank starts iteration t after its own t - 1 and after every rank's iteration
    t - staleness - 1 (None: never waits). A floor that a measured run stays above."""
    delays = np.asarray(delays, dtype=float)
    ends = np.zeros_like(delays)
    for t in range(delays.shape[1]):
        own = ends[:, t - 1] if t else 0.0
        everyone = ends[:, t - staleness - 1].max() if staleness is not None and t > staleness else 0.0
        ends[:, t] = np.maximum(own, everyone) + delays[:, t]
    return float(ends.max(initial=0.0))


class _Peers:
    """The clocks this rank has heard from the others: one Irecv posted per peer at a time, in order."""

    def __init__(self, traced, iterations):
        self.traced, self.expected = traced, iterations
        self.peers = [q for q in range(traced.size) if q != traced.rank]
        self.clock = {q: 0 for q in self.peers}
        self.buffers = {q: np.zeros(1, dtype=np.int64) for q in self.peers}
        self.pending = {q: self._post(q) for q in self.peers if iterations > 0}

    def _post(self, q):
        return self.traced.Irecv(self.buffers[q], source=q, tag=CLOCK_TAG)

    def poll(self):
        """Take in every clock message that has arrived; True if any did."""
        arrived = False
        for q, request in list(self.pending.items()):
            while request is not None and self.traced.Testall([request]):
                self.clock[q], arrived = int(self.buffers[q][0]), True
                request = self._post(q) if self.clock[q] < self.expected else None
            if request is None:
                del self.pending[q]
            else:
                self.pending[q] = request
        return arrived

    def heard(self, enough):
        """Take in what has arrived, then enough(the slowest clock heard of)."""
        self.poll()
        return enough(self.slowest())

    def slowest(self):
        return min(self.clock.values(), default=None)


def run_clocked_workers(comm, delays, staleness):
    """Collective: each rank runs len(delays) iterations of delays[t] seconds (a sleep: its work),
    starting iteration t only when every other rank's clock is >= t - staleness (None: never wait),
    and telling the others its clock after each. Every rank must pass the same number of iterations
    and the same staleness (else ValueError on every rank). Returns ClockedRun on every rank."""
    delays = np.asarray(delays, dtype=float)
    with rpc.Run(comm, "run_clocked_workers") as run:
        with run.setup():
            bad = delays.ndim != 1 or (delays < 0).any() or not np.isfinite(delays).all()
            rpc.refuse_on_every_rank(run.comm, "run_clocked_workers",
                                     "delays must be a 1-D array of seconds >= 0" if bad else None)
            rpc.check_same_on_all_ranks(run.comm, "run_clocked_workers", iterations=len(delays), staleness=staleness)
            if staleness is not None and (not isinstance(staleness, int) or staleness < 0):
                raise ValueError(f"run_clocked_workers: staleness must be an int >= 0 or None (ASP), got {staleness!r}")
            traced = TracedComm(run.comm)  # a barrier: the common start, time 0
        peers, sends, rows = _Peers(traced, len(delays)), [], []
        for t, delay in enumerate(delays):
            if staleness is not None and peers.peers:
                rpc.wait_until(run.comm, lambda: peers.heard(lambda slowest: slowest >= t - staleness))
            else:
                peers.poll()
            slowest = peers.slowest()
            start = traced.now()
            time.sleep(delay)
            end = traced.now()
            clock = np.array([t + 1], dtype=np.int64)
            sends += [(clock, traced.Isend(clock, dest=q, tag=CLOCK_TAG)) for q in peers.peers]
            rows.append(dict(rank=run.comm.rank, iteration=t, start=start, end=end, slowest=slowest,
                             staleness=None if slowest is None else max(0, t - slowest)))
        # every clock message is received (and every send completed) before the run ends
        rpc.wait_until(run.comm, lambda: peers.heard(lambda slowest: not peers.pending))
        rpc.wait_until(run.comm, lambda: traced.Testall([request for _, request in sends]))
        everyone = run.allgather((rows, traced.records))
    return ClockedRun(staleness, [row for rows, _ in everyone for row in rows],
                      [record for _, records in everyone for record in records])
