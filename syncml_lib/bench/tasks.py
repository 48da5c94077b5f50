"""`bench tasks`: the task master (scheduler.run_tasks) against MPI's scatter and gather (chapter 05).

    make bench BENCH=tasks
    make bench BENCH=tasks BENCH_ARGS="--tasks 12 --repeat 3"
The same tasks (empty, then 1 ms of sleep each) handed out by MPI's pickle-based scatter and gathered
back (a static block schedule), and by run_tasks under each schedule of TASK_SCHEDULES; rank 0 is the
master, the others are workers, so it needs 2 ranks.
"""
import functools
import time

from mpi4py import MPI

from ..data import block_range
from ..scheduler import run_tasks
from .common import format_time, print_table, progress, require_ranks, time_calls

TASK_SCHEDULES = [("static", 1), ("cyclic", 1), ("dynamic", 1), ("dynamic", 16), ("guided", 1)]


def _sleep_task(seconds):
    if seconds:
        time.sleep(seconds)
    return seconds


def time_tasks(comm, n_tasks, seconds, repeat):
    """{name: seconds} of running n_tasks tasks of `seconds` each over the workers (ranks 1..p-1):
    with MPI's own pickle-based scatter and gather (a static block schedule, rank 0 only hands out and
    collects) and with run_tasks under each schedule of TASK_SCHEDULES."""
    tasks = [seconds] * n_tasks
    workers = comm.size - 1

    def mpi_scatter_gather():
        blocks = [[]] + [tasks[b.start:b.stop] for b in (block_range(n_tasks, workers, w) for w in range(workers))]
        mine = comm.scatter(blocks if comm.rank == 0 else None, root=0)
        results = comm.gather([_sleep_task(t) for t in mine], root=0)
        return results

    calls = {"MPI scatter + gather": mpi_scatter_gather}
    for schedule, chunk in TASK_SCHEDULES:
        calls[f"{schedule}, chunk {chunk}"] = functools.partial(run_tasks, comm, tasks, _sleep_task,
                                                                schedule=schedule, chunk=chunk)
    return time_calls(comm, calls, repeat)


def print_tasks_table(rows, p):
    names = ["MPI scatter + gather"] + [f"{s}, chunk {c}" for s, c in TASK_SCHEDULES]
    print(f"task scheduling on {p} ranks (1 master, {p - 1} workers): median of the slowest rank's time for the "
          f"whole run (ratio to MPI's scatter + gather of the same tasks, a static schedule)")
    print_table(["tasks", "task time", *names], [[row["n_tasks"], format_time(row["seconds"]) if row["seconds"] else "0"]
                                                 + [f"{format_time(row[n])} ({row[n] / row[names[0]]:.2f}x)" for n in names]
                                                 for row in rows])
    for row in rows:
        if not row["seconds"]:
            per = (row["dynamic, chunk 1"] - row["MPI scatter + gather"]) / row["n_tasks"]
            print(f"\n{row['n_tasks']} empty tasks: dynamic scheduling costs about {format_time(per)} more per "
                  f"hand-out than the scatter (one request and one reply through the master)")


def main(args):
    comm = MPI.COMM_WORLD
    require_ranks(comm, "tasks", 2, "a master and a worker")
    rows = []
    for seconds, repeat in ((0.0, args.repeat), (1e-3, max(3, args.repeat // 5))):
        progress(comm, f"{args.tasks} tasks of {seconds * 1e3:g} ms under every schedule")
        rows.append(dict(n_tasks=args.tasks, seconds=seconds, **time_tasks(comm, args.tasks, seconds, repeat)))
    if comm.rank == 0:
        print_tasks_table(rows, comm.size)
