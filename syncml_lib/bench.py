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
"""
import argparse
import time

import numpy as np
from mpi4py import MPI

from . import costmodel
from .allreduce import ALGORITHMS, allreduce

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

    # Other benchmarks (e.g. `ps`, the parameter server) add their subparser here, with a
    # main_<name>(args) function in their own section above.

    args = parser.parse_args(argv)
    args.main(args)


if __name__ == "__main__":
    main()
