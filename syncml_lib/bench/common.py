"""What every benchmark shares: sizes, timing, tables, progress lines, rank counts, MPICH's progress throttle.

Importing it does not start MPI (mpi4py.MPI is imported inside the functions that call it), so the
command line can use it before it decides how MPI starts (__main__.py).
"""
import ctypes
import os
import sys
import time

import numpy as np

UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "M": 1 << 20, "MB": 1 << 20, "G": 1 << 30, "GB": 1 << 30}
THROTTLE = "MPIR_CVAR_CH4_PROGRESS_THROTTLE"


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


def progress(comm, text):
    """On rank 0 (comm may be None: plain engines), one line on stderr saying what is measured now, so a long
    run shows that it is going and where; the tables go to stdout."""
    if comm is None or comm.rank == 0:
        print(f"measuring {text} ...", file=sys.stderr, flush=True)


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
    from mpi4py import MPI

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


def require_ranks(comm, command, at_least, why):
    """End the run on every rank, with a message and exit status 1, if it has fewer than at_least ranks."""
    if comm.size < at_least:
        raise SystemExit(f"bench {command} needs at least {at_least} ranks ({why}); it was started on "
                         f"{comm.size}: make bench BENCH={command} RANKS={at_least}")


def read_mpi_cvar(name):
    """The value of MPI's integer control variable `name` (MPICH's MPIR_CVAR_...) as MPI uses it, read
    through MPI's tool interface, MPI_T (mpi4py does not wrap its control variables: ctypes does);
    None where it cannot be read (an MPI without it)."""
    from mpi4py import MPI

    c = ctypes
    try:
        lib = c.CDLL(MPI.__file__)  # mpi4py's extension module: a symbol lookup in it reaches libmpi
        if lib.MPI_T_init_thread(0, c.byref(c.c_int())) != 0:
            return None
    except (OSError, AttributeError):
        return None
    index, handle, count = c.c_int(), c.c_void_p(), c.c_int()
    value = (c.c_int * 2)()  # room for an 8-byte type too; MPICH's switches are MPI_INT
    try:
        if (lib.MPI_T_cvar_get_index(name.encode(), c.byref(index)) != 0
                or lib.MPI_T_cvar_handle_alloc(index, None, c.byref(handle), c.byref(count)) != 0):
            return None
        read = lib.MPI_T_cvar_read(handle, value) == 0
        lib.MPI_T_cvar_handle_free(c.byref(handle))
        return value[0] if read and count.value == 1 else None
    finally:
        lib.MPI_T_finalize()


def progress_throttle():
    """MPICH's progress throttle as MPI uses it: "1" (a rank waiting inside MPI yields its core) or "0"
    (it spins); where MPI cannot say (not MPICH), the environment's value, which MPI read when it started."""
    value = read_mpi_cvar(THROTTLE)
    return os.environ.get(THROTTLE, "unset") if value is None else str(value)
