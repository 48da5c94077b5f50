"""Benchmarks of the course's synchronization code against MPI's own.

    mpiexec -n 4 python -m syncml_lib.bench allreduce                  # 8 B .. 64 MB, under a minute
    mpiexec -n 4 python -m syncml_lib.bench allreduce --max-size 1M    # a quick run
    mpiexec -n 4 python -m syncml_lib.bench allreduce --sizes 8 1K 8M --repeat 20

allreduce: for each message size (float64 arrays), the median time of each algorithm in
allreduce.py, of "auto", of MPI's buffer-based comm.Allreduce and of the pickle-based
comm.allreduce. One sample is the slowest rank's time for one call, after a Barrier; the calls
take turns in a random order, and the table shows the median sample and, for each algorithm, its
ratio to comm.Allreduce. --fit also fits the cost model's alpha and beta to the measured times
(how costmodel.DEFAULT_PARAMS was set).

    mpiexec -n 4 python -m syncml_lib.bench ps                       # 8 MB model, 30 steps, ~15 s
    mpiexec -n 4 python -m syncml_lib.bench ps --size 10000 --steps 3 --rounds 1

ps: the parameter server (parameter_server.py) with 1 and with 2 servers (the other ranks are
workers), BSP and ASP, against an allreduce of the same gradient among the workers only (ring_allreduce
and comm.Allreduce on a communicator of the W workers). grad_fn returns a fixed precomputed array,
so the step time is all communication and bookkeeping. The table compares the measured PS / ring
ratio with costmodel.predict_ps / predict("ring"), under costmodel.DEFAULT_PARAMS and under
constants calibrated in the same run (see predict_ps_row).
"""
import argparse
import functools
import os
import sys
import time

# In `ps` (and `data`, `tasks`), a parameter server's ranks (a key-value store's, a task master's) wait for requests and replies asleep (rpc.py), but inside an MPI
# call (a big array under way, an allreduce among the workers) MPICH waits by spinning. With more ranks
# than cores that takes the cores from the ranks that have work, unless MPICH's progress throttle makes
# an idle rank yield; the course's engines and mpirun turn it on for the same reason.
# MPICH reads it when MPI starts, that is when mpi4py.MPI is imported: so here, before that import.
# (`allreduce` runs without it: every rank there is busy, and its tables were measured so.)
if sys.argv[1:2] in (["ps"], ["data"], ["tasks"]):
    os.environ.setdefault("MPIR_CVAR_CH4_PROGRESS_THROTTLE", "1")

import numpy as np  # noqa: E402
from mpi4py import MPI  # noqa: E402

from . import costmodel
from .allreduce import ALGORITHMS, allreduce, ring_allreduce
from .data import block_range, scatter_rows
from .kvstore import run_kvstore
from .parameter_server import run_parameter_server
from .scheduler import run_tasks

DEFAULT_SIZES = ["8", "64", "1K", "8K", "64K", "1M", "8M", "64M"]
UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "M": 1 << 20, "MB": 1 << 20, "G": 1 << 30, "GB": 1 << 30}


def parse_size(text):
    """'8' -> 8, '64K' -> 65536, '8M' / '8MB' -> 8388608 (bytes)."""
    text = text.strip().upper()
    digits = text.rstrip("KMGB")
    return int(float(digits) * UNITS[text[len(digits):]])


def format_size(nbytes):
    for unit, scale in (("MB", 1 << 20), ("KB", 1 << 10)):
        if nbytes >= scale and nbytes % scale == 0:
            return f"{nbytes // scale} {unit}"
    return f"{nbytes} B"


def format_time(seconds):
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def print_table(header, lines):
    """Print rows of cells under a header, right-aligned in columns separated by |."""
    widths = [max(len(str(c)) for c in column) for column in zip(header, *lines)]
    for cells in [header, ["-" * w for w in widths], *lines]:
        print(" | ".join(str(c).rjust(w) for c, w in zip(cells, widths)))


def time_calls(comm, calls, repeat):
    """{name: median over `repeat` rounds of the slowest rank's time for calls[name]()}.

    Every call first runs a few times to warm up (a tenth of `repeat`, at least once). Then each
    round runs every call once, each after a Barrier, in a new random order (the same on every
    rank): a slow spell of the machine, or the wake of the call before, hits all of them alike.
    """
    for call in calls.values():
        for _ in range(max(1, repeat // 10)):
            call()
    names = list(calls)
    times = {name: np.empty(repeat) for name in names}
    shuffle = np.random.default_rng(0).permutation
    for i in range(repeat):
        for name in shuffle(names):
            comm.Barrier()
            start = time.perf_counter()
            calls[name]()
            times[name][i] = time.perf_counter() - start
    result = {}
    for name in names:
        slowest = np.empty(repeat)
        comm.Allreduce(times[name], slowest, op=MPI.MAX)
        result[name] = float(np.median(slowest))
    return result


def repeats_for(nbytes, repeat):
    """Fewer repeats for big messages: about 1 GB per call per measurement, but at least 5."""
    return int(max(5, min(repeat, (1 << 30) // max(nbytes, 1))))


# ----------------------------------------------------------------------------- allreduce

def bench_allreduce(comm, sizes, repeat):
    """Time every allreduce method at every size. Returns a list of rows (dicts), one per size."""
    rows = []
    for nbytes in sizes:
        x = np.random.default_rng(comm.rank).random(nbytes // 8)
        out = np.empty_like(x)
        calls = {"MPI Allreduce": lambda: comm.Allreduce(x, out)}
        for name in [*ALGORITHMS, "auto"]:
            calls[name] = lambda name=name: allreduce(comm, x, algorithm=name, check=False)
        row = time_calls(comm, calls, repeats_for(nbytes, repeat))
        # the pickle-based allreduce is only there for contrast, and slow: fewer repeats
        row.update(time_calls(comm, {"pickle allreduce": lambda: comm.allreduce(x)},
                              max(3, repeats_for(nbytes, repeat) // 4)))
        row.update(nbytes=nbytes, picked=costmodel.choose(x.nbytes, comm.size))
        rows.append(row)
    return rows


def print_allreduce_table(rows, p):
    methods = [*ALGORITHMS, "auto"]
    header = ["size", "MPI Allreduce", *methods, "pickle allreduce", "auto picked"]
    lines = []
    for row in rows:
        mpi = row["MPI Allreduce"]
        cells = [format_size(row["nbytes"]), format_time(mpi)]
        cells += [f"{format_time(row[m])} ({row[m] / mpi:.2f}x)" for m in methods]
        cells += [f"{format_time(row['pickle allreduce'])} ({row['pickle allreduce'] / mpi:.2f}x)", row["picked"]]
        lines.append(cells)
    widths = [max(len(str(c)) for c in column) for column in zip(header, *lines)]
    print(f"allreduce of float64 arrays on {p} ranks: median over repeats of the slowest rank's time "
          f"(ratio to MPI Allreduce)")
    for cells in [header, ["-" * w for w in widths], *lines]:
        print(" | ".join(str(c).rjust(w) for c, w in zip(cells, widths)))

    # The course's targets, measured on 4 ranks of a 2-core machine.
    print()
    for row in rows:
        fastest = min(ALGORITHMS, key=lambda m: row[m])
        notes = [f"auto/fastest ({fastest}) = {row['auto'] / row[fastest]:.2f}x (target <= 1.2)"]
        if row["nbytes"] >= 8 << 20:
            notes.append(f"ring/MPI = {row['ring'] / row['MPI Allreduce']:.2f}x (target <= 1.25)")
        if row["nbytes"] <= 1 << 10:
            notes.append(f"recursive_doubling/MPI = {row['recursive_doubling'] / row['MPI Allreduce']:.2f}x "
                         f"(target <= 3)")
        print(f"{format_size(row['nbytes']):>6}: " + "; ".join(notes))


def print_fitted_params(rows, p):
    """Fit alpha and beta to the algorithms auto chooses between (gamma measured apart), and say
    what auto would pick with them: how costmodel.DEFAULT_PARAMS was set."""
    candidates = ("recursive_doubling", "ring", "rabenseifner")
    timings = {(m, row["nbytes"]): row[m] for row in rows for m in candidates}
    params = costmodel.fit_params(timings, p, gamma=costmodel.measure_gamma())
    print("\ncost model fitted to these times: " + ", ".join(f"{k}={v:.2g}" for k, v in params.items()))
    print("auto would pick: " + ", ".join(f"{format_size(row['nbytes'])}: "
                                          f"{costmodel.choose(row['nbytes'], p, params)}" for row in rows))


def main_allreduce(args):
    comm = MPI.COMM_WORLD
    sizes = [parse_size(s) for s in args.sizes]
    sizes = [s for s in sizes if s <= parse_size(args.max_size)]
    rows = bench_allreduce(comm, sizes, args.repeat)
    if comm.rank == 0:
        print_allreduce_table(rows, comm.size)
        if args.fit:
            print_fitted_params(rows, comm.size)


# ----------------------------------------------------------------------------- parameter server

PS_CONFIGS = [(1, "bsp"), (1, "asp"), (2, "bsp"), (2, "asp")]  # (servers, mode)
TINY = 64 * 8  # bytes of the tiny model whose step time measures the per-message cost


def ps_step_time(history):
    """Median time between the ends of consecutive steps (a step ends when its last worker is
    done), over steps 1, 2, ...: step 0 is a warm-up. In ASP, the slowest worker's pace."""
    steps = sorted({row["step"] for row in history})
    finish = np.array([max(row["end"] for row in history if row["step"] == t) for t in steps])
    return float(np.median(np.diff(finish)))


def time_ps(comm, nbytes, n_servers, mode, steps):
    """(step time, bytes through each server per step) of run_parameter_server with a model of
    nbytes whose grad_fn returns a fixed precomputed gradient (no compute)."""
    grad = {"w": np.random.default_rng(1).standard_normal(nbytes // 8)}
    comm.Barrier()
    result = run_parameter_server(comm, {"w": np.zeros(nbytes // 8)}, lambda params, worker, step: grad,
                                  steps=steps, lr=0.01, mode=mode, n_servers=n_servers)
    return ps_step_time(result.history), [(b["sent"] + b["received"]) / steps for b in result.server_bytes]


def wait_sleeping(comm):
    """A Barrier that sleeps instead of spinning, so a rank that waits leaves the cores to the others."""
    done = comm.Ibarrier()
    while not done.Test():
        time.sleep(1e-3)


def time_allreduce_among_workers(comm, n_servers, nbytes, repeat):
    """{name: seconds} of ring_allreduce and comm.Allreduce of nbytes among the ranks n_servers..p-1
    only (the workers of a parameter server with n_servers servers), the same on every rank.
    The server ranks sleep meanwhile."""
    is_worker = comm.rank >= n_servers
    workers = comm.Split(0 if is_worker else MPI.UNDEFINED, comm.rank)
    times = None
    if is_worker:
        x = np.random.default_rng(comm.rank).random(nbytes // 8)
        out = np.empty_like(x)
        times = time_calls(workers, {"ring": lambda: ring_allreduce(workers, x),
                                     "MPI Allreduce": lambda: workers.Allreduce(x, out)}, repeat)
        workers.Free()
    wait_sleeping(comm)
    return comm.bcast(times, root=n_servers)


def measure_server_pass(comm, nbytes, repeat=10):
    """Seconds per byte of one numpy pass over nbytes of fresh memory (c = a + b, c *= 0.5,
    a.copy(): what a server does to its slice) on rank 0 while the other ranks sleep, as the
    waiting ranks of a parameter server do (rpc.py). Mean, not median: the server's work is long
    enough to be preempted, and that is the point. The same on every rank."""
    cost = None
    if comm.rank == 0:
        a, b = np.random.random(nbytes // 8), np.random.random(nbytes // 8)
        start = time.perf_counter()
        for _ in range(repeat):
            c = a + b
            c *= 0.5
            a.copy()
        cost = (time.perf_counter() - start) / (3 * repeat) / a.nbytes
    wait_sleeping(comm)
    return comm.bcast(cost, root=0)


def bench_ps(comm, nbytes, steps, repeat, rounds):
    """One row per (servers, mode) in PS_CONFIGS: the parameter server's step time and bytes through
    each server per step; the allreduce times among the same workers; and, to calibrate the cost
    model in this run, the same at a tiny size (per-message cost) and the server's cost per pass.
    The parameter-server runs take turns, `rounds` of each, and each keeps its median: how the ranks
    happen to share the cores differs from run to run, by up to 1.5x on a 2-core machine."""
    runs = {config: [] for config in PS_CONFIGS}
    for _ in range(rounds):
        for n_servers, mode in PS_CONFIGS:
            step, server_bytes = time_ps(comm, nbytes, n_servers, mode, steps)
            tiny_step, _ = time_ps(comm, TINY, n_servers, mode, steps)
            runs[n_servers, mode].append((step, tiny_step, server_bytes))
    rows = []
    for (n_servers, mode), measured in runs.items():
        ring = time_allreduce_among_workers(comm, n_servers, nbytes, repeat)
        tiny_ring = time_allreduce_among_workers(comm, n_servers, TINY, repeat)["ring"]
        rows.append(dict(servers=n_servers, workers=comm.size - n_servers, mode=mode, nbytes=nbytes,
                         step=float(np.median([m[0] for m in measured])),
                         tiny_step=float(np.median([m[1] for m in measured])), server_bytes=measured[0][2],
                         tiny_ring=tiny_ring, server_pass=measure_server_pass(comm, nbytes // n_servers), **ring))
    return rows


def predict_ps_row(row):
    """(predicted PS/ring with DEFAULT_PARAMS, predicted PS/ring calibrated in this run, the latter's
    parameters). Calibrated: alpha of each side from its tiny-model time (divided by its number of
    messages in sequence: 4 max(W, S) for the PS, 2 (W-1) for the ring); beta from DEFAULT_PARAMS and
    gamma from measure_server_pass (the PS) or DEFAULT_PARAMS (the ring), moved to the ranks that are
    busy at once on this machine's cores (costmodel.on_cores). In the ring that is the W workers (the
    servers sleep); in the parameter server it is each server and the worker it is serving,
    2 min(W, S), because ranks waiting for a request or a reply sleep (rpc.py)."""
    w, s, n = row["workers"], row["servers"], row["nbytes"]
    d = costmodel.DEFAULT_PARAMS
    default = costmodel.ps_over_ring(n, w, s, **d, mode=row["mode"])
    cores = len(os.sched_getaffinity(0))
    busy = 2 * min(w, s)
    ps_params, ring_params = costmodel.on_cores(d, busy, cores), costmodel.on_cores(d, w, cores)
    server_gamma = costmodel.on_cores(dict(beta=0, gamma=row["server_pass"]), busy, cores,
                                      fitted_on=dict(ranks=1, cores=cores))["gamma"]  # measured alone
    ps_alpha = row["tiny_step"] / (4 * max(w, s))
    ring_alpha = row["tiny_ring"] / (2 * (w - 1))
    ps = costmodel.predict_ps(n, w, s, ps_alpha, ps_params["beta"], server_gamma, row["mode"])
    ring = costmodel.predict("ring", n, w, ring_alpha, ring_params["beta"], ring_params["gamma"])
    return default, ps / ring, dict(ps_alpha=ps_alpha, ring_alpha=ring_alpha, server_gamma=row["server_pass"],
                                    ps=ps, ring=ring)


def print_ps_table(rows, p, steps, rounds):
    header = ["config", "workers", "servers", "PS step time", "ring allreduce (same W)", "MPI Allreduce",
              "measured PS/ring", "predicted (DEFAULT_PARAMS)", "predicted (calibrated)", "measured/predicted",
              "bytes per server per step"]
    lines, notes = [], []
    for row in rows:
        measured = row["step"] / row["ring"]
        default, calibrated, fit = predict_ps_row(row)
        s = row["servers"]
        lines.append([f"{s} server{'s' if s > 1 else ''} {row['mode'].upper()}", row["workers"], s,
                      format_time(row["step"]), format_time(row["ring"]), format_time(row["MPI Allreduce"]),
                      f"{measured:.2f}", f"{default:.2f}", f"{calibrated:.2f}", f"{measured / calibrated:.2f}x",
                      " + ".join(format_size(round(b)) for b in row["server_bytes"])])
        verdict = "within" if 1 / 1.5 <= measured / calibrated <= 1.5 else "NOT within"
        notes.append(f"{lines[-1][0]}: measured {measured:.2f} vs calibrated {calibrated:.2f} -> {verdict} 1.5x "
                     f"(with DEFAULT_PARAMS: measured/predicted {measured / default:.2f}x). PS step {format_time(fit['ps'])} predicted, "
                     f"ring {format_time(fit['ring'])}; per-message alpha PS {format_time(fit['ps_alpha'])}, "
                     f"ring {format_time(fit['ring_alpha'])}; server pass {fit['server_gamma']:.2g} s/B")
    print(f"parameter server vs ring allreduce among the workers only: {format_size(rows[0]['nbytes'])} "
          f"of float64, {p} ranks, {steps} steps (the first is a warm-up); PS step: median time between "
          f"step ends, median over {rounds} runs; allreduce: median of the slowest worker's time; MPIR_CVAR_CH4_PROGRESS_THROTTLE="
          f"{os.environ.get('MPIR_CVAR_CH4_PROGRESS_THROTTLE', 'unset')}")
    print_table(header, lines)
    d = costmodel.DEFAULT_PARAMS
    print(f"\npredicted PS/ring = costmodel.predict_ps(n, W, S) / predict('ring', n, p=W). DEFAULT_PARAMS: "
          f"alpha={d['alpha']:.2g}, beta={d['beta']:.2g}, gamma={d['gamma']:.2g} for both. Calibrated in this "
          f"run: alpha of each from its step time with a {TINY} B model; beta from DEFAULT_PARAMS and the server's "
          f"gamma from a pass over fresh memory while the other ranks sleep, both moved to the ranks busy at once on "
          f"this machine's cores (costmodel.on_cores: in the PS 2 min(W, S), each server and the worker it serves; "
          f"in the ring the W workers). Target: within 1.5x")
    for note in notes:
        print(note)


def main_ps(args):
    comm = MPI.COMM_WORLD
    if comm.size < 3:
        raise SystemExit("bench ps needs at least 3 ranks (2 servers and a worker)")
    nbytes = parse_size(args.size) // 8 * 8
    rows = bench_ps(comm, nbytes, args.steps, repeats_for(nbytes, args.repeat), args.rounds)
    if comm.rank == 0:
        print_ps_table(rows, comm.size, args.steps, args.rounds)


# ----------------------------------------------------------------------------- data storage

DATA_SIZES = ["64K", "1M", "8M"]


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


def bench_data(comm, sizes, repeat):
    return [dict(nbytes=n, **time_scatter(comm, n, repeats_for(n, repeat)),
                 **time_kvstore(comm, n, repeats_for(n, repeat))) for n in sizes]


def print_data_table(rows, p):
    scatter = ["MPI Scatterv", "scatter_rows", "Bcast + slice"]
    kv = ["MPI Send + reply", "kv put, R=1", "kv put, R=2", "kv get"]
    print(f"cutting float64 rows over {p} ranks from rank 0 (median of the slowest rank; ratio to MPI Scatterv)")
    print_table(["size", *scatter], [[format_size(row["nbytes"])] + [
        f"{format_time(row[name])} ({row[name] / row['MPI Scatterv']:.2f}x)" for name in scatter] for row in rows])
    print(f"\nkey-value store, 2 servers, one client putting (new keys) and getting one array (median per "
          f"operation; ratio to sending the same bytes with MPI Send and a 0-byte reply)")
    print_table(["size", *kv], [[format_size(row["nbytes"])] + [
        f"{format_time(row[name])} ({row[name] / row['MPI Send + reply']:.2f}x)" for name in kv] for row in rows])


def main_data(args):
    comm = MPI.COMM_WORLD
    if comm.size < 3:
        raise SystemExit("bench data needs at least 3 ranks (2 servers and a client)")
    rows = bench_data(comm, [parse_size(s) for s in args.sizes], args.repeat)
    if comm.rank == 0:
        print_data_table(rows, comm.size)


# ----------------------------------------------------------------------------- task scheduling

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


def main_tasks(args):
    comm = MPI.COMM_WORLD
    if comm.size < 2:
        raise SystemExit("bench tasks needs at least 2 ranks (a master and a worker)")
    rows = [dict(n_tasks=args.tasks, seconds=seconds, **time_tasks(comm, args.tasks, seconds, repeat))
            for seconds, repeat in ((0.0, args.repeat), (1e-3, max(3, args.repeat // 5)))]
    if comm.rank == 0:
        print_tasks_table(rows, comm.size)


# ----------------------------------------------------------------------------- command line

def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m syncml_lib.bench", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    allreduce_parser = commands.add_parser("allreduce", help="our allreduce algorithms against MPI's")
    allreduce_parser.add_argument("--sizes", nargs="+", default=DEFAULT_SIZES,
                                  help="message sizes in bytes, e.g. 8 1K 8M (default: %(default)s)")
    allreduce_parser.add_argument("--max-size", default="64M", help="skip sizes above this (default: 64M)")
    allreduce_parser.add_argument("--repeat", type=int, default=200,
                                  help="repeats per measurement, fewer for large sizes (default: 200)")
    allreduce_parser.add_argument("--fit", action="store_true",
                                  help="also fit the cost model's alpha and beta to the times")
    allreduce_parser.set_defaults(main=main_allreduce)

    ps_parser = commands.add_parser("ps", help="the parameter server against an allreduce among its workers")
    ps_parser.add_argument("--size", default="8M", help="model size in bytes, float64 (default: 8M, 1M floats)")
    ps_parser.add_argument("--steps", type=int, default=30,
                           help="steps per configuration; the first is a warm-up (default: 30)")
    ps_parser.add_argument("--rounds", type=int, default=5,
                           help="parameter-server runs per configuration, in turns; the median counts (default: 5)")
    ps_parser.add_argument("--repeat", type=int, default=50,
                           help="allreduce repeats, fewer for large sizes (default: 50)")
    ps_parser.set_defaults(main=main_ps)

    data_parser = commands.add_parser("data", help="scatter and the key-value store against bare MPI")
    data_parser.add_argument("--sizes", nargs="+", default=DATA_SIZES,
                             help="bytes per scatter, per key-value array (default: %(default)s)")
    data_parser.add_argument("--repeat", type=int, default=100,
                             help="repeats per measurement, fewer for large sizes (default: 100)")
    data_parser.set_defaults(main=main_data)

    tasks_parser = commands.add_parser("tasks", help="the task master against MPI's scatter and gather")
    tasks_parser.add_argument("--tasks", type=int, default=300, help="tasks per run (default: 300)")
    tasks_parser.add_argument("--repeat", type=int, default=15,
                              help="runs per measurement of empty tasks, a fifth of it for 1 ms tasks (default: 15)")
    tasks_parser.set_defaults(main=main_tasks)

    # Other benchmarks add their subparser here, with a main_<name>(args) function in their own
    # section above.

    args = parser.parse_args(argv)
    args.main(args)


if __name__ == "__main__":
    main()
