"""Distributed task scheduling: a master hands out tasks, workers run them, nothing is lost.

    result = run_tasks(comm, tasks=list(range(100)), task_fn=lambda t: t * t, schedule="dynamic")
    result.results           # [0, 1, 4, ...]: task_fn(task) for every task, in task order, on every rank
    result.trace[0]          # {'task': 0, 'worker': 0, 'start': 0.0002, 'end': 0.0003}
    result.makespan          # seconds from the start to the last result

Rank 0 is the master, the other ranks are workers (rpc.roles with one server). A worker asks the
master for work, runs what it got, and asks again with its results, until the master says stop.
How the master decides who gets which task is the schedule:

    static   before the run, worker w is given block w of the tasks (data.block_range). No choice
             at run time: one slow worker, or one block of expensive tasks, and everybody waits.
    cyclic   worker w is given tasks w, w + W, w + 2W, ...: spreads sorted costs, still fixed.
    dynamic  self-scheduling: a free worker gets the next `chunk` tasks of one queue. The fast do
             more; the price is one request per chunk.
    guided   like dynamic, with chunks that shrink: guided_chunk(remaining, W, chunk) = max(chunk,
             ceil(remaining / W)). Few hand-outs; but its first chunk, a 1/W share, goes to whoever
             asks first, and if that is a straggler the run lasts as long as static's.
    factoring  chunks that shrink in batches: W chunks of ceil(remaining / (2W)), then the next
             batch from what is left (factoring_chunks). The first chunk is half guided's, so a
             straggler that draws it holds up half as much.

Workers that die. MPI ends the whole job when a process dies (by default: ULFM, MPI's fault-
tolerance proposal, lets the others go on), so a worker "dies" here by going silent: `die={w: n}`
makes worker w stop after n tasks, holding the tasks it got next, and never
report again. The master cannot tell silent from slow. So every hand-out is a lease with a
deadline (`lease` seconds per task it holds: a big chunk gets the time its tasks need); when it expires, its unfinished tasks go back to a queue that any
worker may take from (expired_leases). If the first worker reports after all, its results are
dropped (record_result): each task may run more than once, and each result counts once. Without
leases (lease=None) a silent worker's tasks are never done, and run_tasks says which. (It can say so
because this is a simulation: it knows which workers went silent and ends the run when everybody else
waits. A real master sees nothing of a dead worker and, without leases, would wait forever.)

Cost: one request and one reply (pickled, small) per hand-out, to and from one master: the master
serializes them, so tiny tasks want bigger chunks. Tasks and results should be small (they are
pickled); large data belongs in the data chapter's storage.
"""
import math
import time
from collections import deque
from dataclasses import dataclass

from . import rpc
from .rpc import check_same_on_all_ranks
from .data import block_range, cyclic_range

__all__ = ["run_tasks", "TaskResult", "SCHEDULES", "guided_chunk", "factoring_chunks", "expired_leases",
           "record_result"]

SCHEDULES = ("static", "cyclic", "dynamic", "guided", "factoring")


# ----------------------------------------------------------------------------- the three rules of the chapter
# Small functions the master calls by name, so the chapter's exercises can put a learner's version in
# their place (checks.py does) and run the whole scheduler with it.

def guided_chunk(remaining, workers, min_chunk):
    """Guided self-scheduling's chunk: a 1/workers share of what remains, never fewer than min_chunk
    (and never more than remains)."""
    return min(remaining, max(min_chunk, math.ceil(remaining / workers)))


def factoring_chunks(n_tasks, workers, min_chunk):
    """Factoring's chunk sizes for n_tasks, in hand-out order: batches of `workers` chunks of
    max(min_chunk, ceil(remaining / (2 * workers))), `remaining` counted at the start of each batch; no
    chunk larger than what is left, and the sizes add up to n_tasks."""
    sizes, remaining = [], n_tasks
    while remaining > 0:
        size = max(min_chunk, math.ceil(remaining / (2 * workers)))
        for _ in range(workers):
            if remaining == 0:
                break
            sizes.append(min(size, remaining))
            remaining -= sizes[-1]
    return sizes


def expired_leases(leases, now):
    """The ids of the leases whose deadline has passed. leases maps lease id -> (worker, task ids,
    deadline); a deadline of None never passes."""
    return [lease for lease, (_, _, deadline) in leases.items() if deadline is not None and deadline <= now]


def record_result(done, task, result):
    """Keep the first result of each task: store it in `done` (task id -> result) and return True, or
    return False if the task has one already (a second run, after its lease expired)."""
    if task in done:
        return False
    done[task] = result
    return True


# ----------------------------------------------------------------------------- the master

class _Master:
    """The queues, the leases and the results; answers "next" (results in, tasks out) and "silent"."""

    def __init__(self, comm, n_tasks, workers, schedule, chunk, lease):
        self.comm, self.n_tasks, self.workers, self.schedule, self.chunk, self.lease = (
            comm, n_tasks, workers, schedule, chunk, lease)
        W = len(workers)
        self.index = {rank: w for w, rank in enumerate(workers)}  # reports name workers 0 .. W-1, not ranks
        if schedule == "static":
            self.own = {rank: deque(block_range(n_tasks, W, w)) for w, rank in enumerate(workers)}
        elif schedule == "cyclic":
            self.own = {rank: deque(cyclic_range(n_tasks, W, w)) for w, rank in enumerate(workers)}
        else:
            self.own = {rank: deque() for rank in workers}
        self.shared = deque(range(n_tasks)) if schedule in ("dynamic", "guided", "factoring") else deque()
        self.planned = deque(factoring_chunks(n_tasks, W, chunk)) if schedule == "factoring" else deque()
        self.leases, self.next_lease = {}, 0  # lease id -> (worker rank, task ids, deadline)
        self.done, self.trace, self.duplicates, self.reassigned = {}, [], 0, []
        self.waiting, self.silent = [], []  # ranks whose "next" is held back; ranks gone silent

    def handlers(self):
        return {"next": self.next, "silent": self.went_silent}

    def finished(self):
        return len(self.done) == self.n_tasks

    def next(self, source, header, arrays):
        """A worker reports the results of its last lease and asks for more."""
        for task, result, start, end in header.get("results", []):
            if record_result(self.done, task, result):
                self.trace.append({"task": task, "worker": self.index[source], "start": start, "end": end})
            else:
                self.duplicates += 1
        self.leases.pop(header.get("lease"), None)
        if self.finished():
            self.release_everyone()
            return {"stop": True}, []
        self.check_leases()
        return self._answer(source)

    def went_silent(self, source, header, arrays):
        """A worker that 'died': it will never speak again. The master does not use this to detect
        anything (a dead process sends nothing); it only keeps the request, to release the process
        when the run is over."""
        self.silent.append(source)
        return rpc.DEFER

    def check_leases(self):
        """Give the unfinished tasks of every expired lease to whoever asks next; then serve waiters."""
        for lease in expired_leases(self.leases, time.monotonic()):
            rank, tasks, _ = self.leases.pop(lease)
            lost = [t for t in tasks if t not in self.done]
            self.shared.extend(lost)
            self.reassigned.extend((t, self.index[rank]) for t in lost)
        waiting, self.waiting = self.waiting, []
        for rank in waiting:
            answer = self._answer(rank)
            if answer is not rpc.DEFER:
                rpc.reply(self.comm, rank, *answer)

    def _take(self, rank):
        """The task ids to hand to worker `rank` now (maybe none)."""
        own, shared = self.own[rank], self.shared
        if own:
            return list(_drain(own))
        while shared and shared[0] in self.done:  # handed out again, and finished meanwhile by its first worker
            shared.popleft()
        if not shared:
            return []
        if self.schedule == "guided":
            size = guided_chunk(len(shared), len(self.workers), self.chunk)
        elif self.schedule == "factoring" and self.planned:
            size = self.planned.popleft()
        else:
            size = self.chunk
        tasks = []
        for _ in range(size):  # (a size that is not an int, from a wrong guided_chunk, raises TypeError here)
            while shared and shared[0] in self.done:
                shared.popleft()
            if not shared:
                break
            tasks.append(shared.popleft())
        return tasks

    def _answer(self, rank):
        if self.finished():
            return {"stop": True}, []
        tasks = self._take(rank)
        if not tasks:  # nothing now: wait for results, or for a lease to expire
            self.waiting.append(rank)
            return rpc.DEFER
        deadline = None if self.lease is None else time.monotonic() + self.lease * len(tasks)
        self.leases[self.next_lease] = (rank, tasks, deadline)
        self.next_lease += 1
        return {"lease": self.next_lease - 1, "tasks": tasks}, []

    def release_everyone(self):
        """The run is over: answer every held-back request with stop."""
        for rank in self.waiting + self.silent:
            rpc.reply(self.comm, rank, {"stop": True})
        self.waiting, self.silent = [], []


def _drain(queue):
    while queue:
        yield queue.popleft()


# ----------------------------------------------------------------------------- a worker

def _work(run, master, index, tasks, task_fn, die_after, t0):
    """Ask, run, report, until the master says stop. Returns how many tasks this worker ran. If
    task_fn raises, the run ends on every rank with "worker 2 failed on task 7: ..." (run.fail)."""
    comm = run.comm
    ran, reply = 0, rpc.call(comm, master, "next", {})[0]
    while not reply.get("stop"):
        results = []
        for task in reply["tasks"]:
            if die_after is not None and ran >= die_after:  # "dies": keeps this lease, never reports again
                rpc.call(comm, master, "silent")             # (returns only when the run is over)
                rpc.call(comm, master, rpc.DONE)
                return ran
            start = time.perf_counter() - t0
            try:
                result = task_fn(tasks[task])
            except BaseException as error:
                run.own_failure(error, f"worker {index}", f"on task {task}")
            results.append((task, result, start, time.perf_counter() - t0))
            ran += 1
        reply = rpc.call(comm, master, "next", {"lease": reply["lease"], "results": results})[0]
    rpc.call(comm, master, rpc.DONE)
    return ran


# ----------------------------------------------------------------------------- the whole run

@dataclass
class TaskResult:
    """What run_tasks returns, the same on every rank: results (task_fn's value for each task, in task
    order); trace (one row per counted result: task, worker (0-based among the workers: worker w is
    rank w + 1), start and end in seconds since a common origin); makespan (the last end); per_worker
    (results counted for each worker); reassigned ((task, worker whose lease expired) for each task
    handed out again); duplicates (results dropped because the task had one already); handouts (how
    many times the master handed out tasks: one request and one reply each)."""
    results: list
    trace: list
    makespan: float
    per_worker: list
    reassigned: list
    duplicates: int
    handouts: int


def run_tasks(comm, tasks, task_fn, *, schedule="dynamic", chunk=1, lease=None, die=None):
    """Run task_fn(task) for every task over the ranks of comm (collective); return a TaskResult.

    tasks: the same list on every rank (task_fn gets tasks[i]; results are pickled to the master).
    schedule: "static", "cyclic", "dynamic", "guided" or "factoring"; chunk: tasks per hand-out
    (dynamic), the smallest chunk (guided, factoring). lease: seconds per task a worker may hold a
    hand-out before its unfinished tasks are handed out again (None: forever). die: {worker: n}: worker (0-based among the workers: worker w is rank w + 1)
    goes silent after n tasks (a simulated death). If task_fn raises, every rank raises
    RunAborted("worker 2 failed on task 7: ..."); if the master fails, RunAborted("master: ...");
    if tasks are left undone (a silent worker and no lease), RuntimeError names them.
    """
    die = dict(die or {})
    with rpc.Run(comm, "run_tasks") as run:
        with run.setup():
            check_same_on_all_ranks(run.comm, "run_tasks", n_tasks=len(tasks), schedule=schedule, chunk=chunk,
                                    lease=lease, die=sorted(die.items()))
            if schedule not in SCHEDULES:
                raise ValueError(f"unknown schedule {schedule!r}; valid schedules are {', '.join(SCHEDULES)}")
            if not isinstance(chunk, int) or chunk < 1:
                raise ValueError(f"chunk must be a positive integer, got {chunk!r}")
            if lease is not None and not lease > 0:
                raise ValueError(f"lease must be a positive number of seconds or None, got {lease!r}")
            me = rpc.roles(run.comm, 1)
            if set(die) - set(range(len(me.workers))):
                raise ValueError(f"die names workers {sorted(set(die) - set(range(len(me.workers))))}, "
                                 f"but the workers are 0 .. {len(me.workers) - 1}")
            run.comm.Barrier()

        t0 = time.perf_counter()
        if me.is_server:
            master = _Master(run.comm, len(tasks), me.workers, schedule, chunk, lease)
            _serve(run.comm, master, me.workers)
            mine = {"done": master.done, "trace": sorted(master.trace, key=lambda row: row["task"]),
                    "reassigned": master.reassigned, "duplicates": master.duplicates, "handouts": master.next_lease}
        else:
            _work(run, 0, me.index, tasks, task_fn, die.get(me.index), t0)
            mine = None
        outcome = run.allgather(mine)[0]

    missing = [t for t in range(len(tasks)) if t not in outcome["done"]]
    if missing:
        why = ("a worker went silent holding them, and with lease=None they are never handed out again"
               if lease is None else f"every worker went silent, so no one was left to take them when their "
                                     f"lease of {lease} s per task expired")
        raise RuntimeError(f"{len(missing)} of {len(tasks)} tasks never finished ({missing[:10]}"
                           f"{' ...' if len(missing) > 10 else ''}): {why} (the simulation knows who went silent "
                           f"and ends the run; a real master cannot see it and would wait forever)")
    trace = outcome["trace"]
    per_worker = [sum(row["worker"] == w for row in trace) for w in range(len(me.workers))]
    return TaskResult([outcome["done"][t] for t in range(len(tasks))], trace,
                      max((row["end"] for row in trace), default=0.0), per_worker, outcome["reassigned"],
                      outcome["duplicates"], outcome["handouts"])


def _serve(comm, master, workers):
    """rpc.serve until every worker has said done. While idle, the master checks its leases. A run that
    cannot finish (a silent worker holding tasks and no lease, or no worker left speaking) ends when
    every worker still speaking is waiting for work: then everyone is released, and run_tasks names
    the missing tasks."""
    def idle():
        master.check_leases()
        speaking = set(workers) - set(master.silent)
        stuck = not speaking or (not master.shared and set(master.waiting) >= speaking
                                 and all(deadline is None for _, _, deadline in master.leases.values()))
        if master.finished() or stuck:
            master.release_everyone()
    rpc.serve(comm, master.handlers(), clients=workers, on_idle=idle, name="master")
