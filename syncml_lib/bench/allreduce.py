"""`bench allreduce`: the course's allreduce algorithms against MPI's own (chapter 03).

    make bench BENCH=allreduce                  # 8 B .. 64 MB, under a minute
    make bench BENCH=allreduce BENCH_ARGS="--max-size 1M"  # a quick run
    make bench BENCH=allreduce BENCH_ARGS="--sizes 8 1K 8M --repeat 20"
For each message size (float64 arrays), the median time of each algorithm in allreduce.py, of "auto",
of MPI's buffer-based comm.Allreduce and of the pickle-based comm.allreduce. One sample is the slowest
rank's time for one call, after a Barrier; the calls take turns in a random order, and the table shows
the median sample and, for each algorithm, its ratio to comm.Allreduce. --fit also fits the cost
model's alpha and beta to the measured times (how costmodel.DEFAULT_PARAMS was set). Needs 2 ranks:
on one there is nothing to reduce, and nothing to fit.
"""
import numpy as np
from mpi4py import MPI

from .. import costmodel
from ..allreduce import ALGORITHMS, allreduce
from .common import format_size, format_time, parse_size, print_table, progress, repeats_for, require_ranks, time_calls


def bench_allreduce(comm, sizes, repeat):
    """Time every allreduce method at every size. Returns a list of rows (dicts), one per size."""
    rows = []
    for nbytes in sizes:
        progress(comm, f"allreduce of {format_size(nbytes)}")
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
    print(f"allreduce of float64 arrays on {p} ranks: median over repeats of the slowest rank's time "
          f"(ratio to MPI Allreduce)")
    print_table(header, lines)

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


def main(args):
    comm = MPI.COMM_WORLD
    require_ranks(comm, "allreduce", 2, "on one rank there is nothing to reduce")
    sizes = [parse_size(s) for s in args.sizes]
    sizes = [s for s in sizes if s <= parse_size(args.max_size)]
    rows = bench_allreduce(comm, sizes, args.repeat)
    if comm.rank == 0:
        print_allreduce_table(rows, comm.size)
        if args.fit:
            print_fitted_params(rows, comm.size)
