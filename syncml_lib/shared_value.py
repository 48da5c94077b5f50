"""A shared parameter updated by several workers at once: updates that get lost, and two fixes.

    result = run_shared_updates(comm, "overwrite", rounds=20)   # rank 0 serves, ranks 1.. update
    result.value     # array([1., 1., 1.]) on 4 ranks: each worker's updates that survived, one element each
    result.lost      # 57: 20 rounds x 3 workers = 60 updates made, 3 kept

Rank 0 serves named values, each an array with a version number that grows by one with every
change (rpc.serve); the other ranks are workers, worker w being rank w + 1. In each of `rounds`
rounds, worker w makes one update of the value "w": it adds delta = one-hot(w), so element w of the
value counts how many of worker w's updates are in it. How it adds is the `method`:

    overwrite  read the value, add delta to the copy, write the sum back. The server stores whatever
               it is sent, so when two workers have read the same value, the later write erases the
               earlier one's update: a lost update (read-modify-write is not atomic).
    add        send delta; the server adds it to what it holds (a push of a gradient, chapter 02).
               The read-modify-write happens inside the server, one request at a time: nothing lost.
    cas        read (value, version); send value + delta together with the version it read; the
               server stores it only if that version is still the current one (compare-and-set),
               and otherwise the worker reads again and retries. Nothing lost, at the price of retries.

The schedule. With gate=True (the default) the server answers the first read of each round only when
every worker has asked for it: all workers read before any of them writes, the worst interleaving,
the same in every run. Overwrite then keeps exactly one update of the W in each round, and cas fails
at least W - 1 compare-and-sets per round. With gate=False timing decides; `think` seconds between a
read and what follows (a worker computing on what it read) make overlaps, and so losses, likely.
With one worker (2 ranks) nothing can be lost: nobody else writes.

Cost per update: overwrite 2 requests, add 1, cas 2 plus 2 per retry (rpc: each request 2 small
pickled control messages plus the array, buffer-based). The update rules are module functions that
run_shared_updates looks up by name, so a learner's cas_update can run in the library's place.
"""
import time
from dataclasses import dataclass, field

import numpy as np

from . import rpc
from .rpc import check_same_on_all_ranks

__all__ = ["run_shared_updates", "SharedUpdates", "SharedStore", "METHODS", "overwrite_update", "add_update",
           "cas_update"]

METHODS = ("overwrite", "add", "cas")


# ----------------------------------------------------------------------------- the three ways to update

def overwrite_update(store, key, delta):
    """Read, add locally, write back: loses the updates of anyone who wrote in between."""
    value, _ = store.read(key)
    store.write(key, value + delta)


def add_update(store, key, delta):
    """Let the server add: one request, nothing lost."""
    store.add(key, delta)


def cas_update(store, key, delta):
    """Read with the version, write only if nobody else has written since; otherwise read again."""
    while True:
        value, version = store.read(key)
        if store.compare_and_set(key, value + delta, version):
            return


# ----------------------------------------------------------------------------- the worker's handle on the server

class SharedStore:
    """A worker's handle on the server's values: read, write, add, compare_and_set (each one request)."""

    def __init__(self, comm, server=0, think=0.0):
        self.comm, self.server, self.think = comm, server, think
        self.round, self._first_read = 0, False
        self.requests = 0

    def _start_round(self, round_):
        self.round, self._first_read = round_, True

    def _call(self, kind, header, arrays=()):
        self.requests += 1
        return rpc.call(self.comm, self.server, kind, dict(header, round=self.round), arrays)

    def read(self, key):
        """(a copy of the value, its version). Then `think` seconds pass: the worker computing on it."""
        header, (value,) = self._call("read", {"key": key, "first": self._first_read})
        self._first_read = False
        if self.think:
            time.sleep(self.think)
        return value, header["version"]

    def write(self, key, value):
        """Store `value` as it is, whatever the server held (the last writer wins)."""
        self._call("write", {"key": key}, [value])

    def add(self, key, delta):
        """Add `delta` to whatever the server holds."""
        self._call("add", {"key": key}, [delta])

    def compare_and_set(self, key, value, version):
        """Store `value` only if the server's version of `key` is still `version`; True if it stored."""
        header, _ = self._call("cas", {"key": key, "version": int(version)}, [value])
        return header["stored"]


# ----------------------------------------------------------------------------- the server

class _Server:
    """Named arrays with versions. Each change is logged: (time, worker, round, kind, stored)."""

    def __init__(self, comm, values, workers, gate, t0):
        self.comm, self.workers, self.gate, self.t0 = comm, workers, gate, t0
        self.values = {key: np.array(value, dtype=float) for key, value in values.items()}
        self.versions = dict.fromkeys(values, 0)
        self.gated = {}  # round -> (source, key) of the first reads waiting for the others'
        self.log = []

    def handlers(self):
        return {"read": self.read, "write": self.write, "add": self.add, "cas": self.cas}

    def _key(self, header):
        key = header["key"]
        if key not in self.values:
            raise KeyError(f"no value named {key!r} on the server (it holds {', '.join(map(repr, self.values))})")
        return key

    def _checked(self, key, array, what):
        held = self.values[key]
        if array.shape != held.shape or array.dtype != held.dtype:
            raise ValueError(f"{what} of {key!r} has shape {array.shape} and dtype {array.dtype}; the server holds "
                             f"shape {held.shape}, dtype {held.dtype}")
        return array

    def _answer_read(self, source, key):
        return {"version": self.versions[key]}, [self.values[key]]

    def read(self, source, header, arrays):
        key = self._key(header)
        if not (self.gate and header["first"]):
            return self._answer_read(source, key)
        waiting = self.gated.setdefault(header["round"], [])
        waiting.append((source, key))
        if len(waiting) == len(self.workers):  # the last worker has asked: everyone gets the same value
            for client, their_key in self.gated.pop(header["round"]):
                rpc.reply(self.comm, client, *self._answer_read(client, their_key))
        return rpc.DEFER

    def _change(self, source, header, kind, new_value, stored=True):
        key = header["key"]
        if stored:
            self.values[key] = new_value
            self.versions[key] += 1
        self.log.append(dict(time=time.perf_counter() - self.t0, worker=source - 1, round=header["round"],
                             kind=kind, stored=stored, version=self.versions[key]))

    def write(self, source, header, arrays):
        key = self._key(header)
        self._change(source, header, "write", self._checked(key, arrays[0], "a write").copy())
        return {}, []

    def add(self, source, header, arrays):
        key = self._key(header)
        self._change(source, header, "add", self.values[key] + self._checked(key, arrays[0], "an add"))
        return {}, []

    def cas(self, source, header, arrays):
        key = self._key(header)
        value = self._checked(key, arrays[0], "a compare-and-set")
        stored = header["version"] == self.versions[key]
        self._change(source, header, "cas", value.copy(), stored)
        return {"stored": stored}, []


# ----------------------------------------------------------------------------- one run

@dataclass
class SharedUpdates:
    """What a run_shared_updates left: the same on every rank."""
    method: str
    rounds: int
    workers: int
    value: np.ndarray          # the final value: element w = worker w's updates that survived
    version: int               # changes the server made (failed compare-and-sets change nothing)
    log: list = field(repr=False)  # the server's changes: dict(time, worker, round, kind, stored, version)
    requests: int = 0          # requests the workers sent, all together
    seconds: float = 0.0       # from the start to the last worker's last update

    @property
    def made(self):
        return self.rounds * self.workers

    @property
    def kept(self):
        return int(round(self.value.sum()))

    @property
    def lost(self):
        return self.made - self.kept

    @property
    def failed_cas(self):
        return sum(1 for row in self.log if row["kind"] == "cas" and not row["stored"])


def run_shared_updates(comm, method, *, rounds, gate=True, think=0.0, key="w"):
    """Collective: rank 0 serves the value "w" (zeros, one element per worker); in each round every
    worker adds one-hot(w) to `key` with `method` ("overwrite", "add" or "cas"). Returns SharedUpdates
    on every rank. A request for a value the server does not hold (key) ends the run on every rank
    with RunAborted naming it; arguments that differ across ranks are a ValueError on every rank."""
    with rpc.Run(comm, "run_shared_updates") as run:
        with run.setup():
            check_same_on_all_ranks(run.comm, "run_shared_updates", method=method, rounds=rounds, gate=gate, key=key)
            if method not in METHODS:
                raise ValueError(f"method must be one of {', '.join(map(repr, METHODS))}, got {method!r}")
            if not isinstance(rounds, int) or rounds < 1:
                raise ValueError(f"rounds must be a positive int, got {rounds!r}")
            me = rpc.roles(run.comm, 1)
            run.comm.Barrier()
            t0 = time.perf_counter()
        if me.is_server:
            server = _Server(run.comm, {"w": np.zeros(len(me.workers))}, me.workers, gate, t0)
            rpc.serve(run.comm, server.handlers(), clients=me.workers, name="the server (rank 0)")
            mine = dict(value=server.values["w"], version=server.versions["w"], log=server.log, requests=0, end=0.0)
        else:
            store = SharedStore(run.comm, think=think)
            update = globals()[f"{method}_update"]  # looked up now: a check may have put a learner's in its place
            delta = np.zeros(len(me.workers))
            delta[me.index] = 1.0
            for round_ in range(rounds):
                store._start_round(round_)
                try:
                    update(store, key, delta)
                except (rpc.RunAborted, KeyboardInterrupt):
                    raise
                except Exception as error:
                    run.own_failure(error, f"worker {me.index} (rank {run.comm.rank})", f"in round {round_}")
            end = time.perf_counter() - t0
            rpc.call(run.comm, 0, rpc.DONE)
            mine = dict(requests=store.requests, end=end)
        everyone = run.allgather(mine)
    served = everyone[0]
    return SharedUpdates(method, rounds, len(everyone) - 1, served["value"], served["version"], served["log"],
                         requests=sum(r["requests"] for r in everyone), seconds=max(r["end"] for r in everyone))
