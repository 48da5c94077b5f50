"""python -m syncml_lib doctor | grade: check that this machine can run the course (and say how to fix it
if not); grade exercise notebooks check by check (syncml_lib.grade)."""
import importlib
import platform
import sys
import time

from . import mpirun

USAGE = """usage: python -m syncml_lib doctor [--ranks N] [--skip-cluster]
       python -m syncml_lib grade [--json] [--time-limit SECONDS] NOTEBOOK_OR_FOLDER ...

  doctor   check Python, numpy, mpi4py, the MPI library, mpiexec, an N-rank Allreduce
           under mpiexec and an ipyparallel cluster of MPI engines (exit 1 if anything fails)
  grade    run exercise notebooks headless, each on its own cluster, and print a row per check:
           passed or failed and why (exit 0 only if every check passed)
"""


def _allreduce_ranks(comm):
    import numpy as np

    mine = np.array([comm.rank + 1.0])
    total = np.empty(1)
    comm.Allreduce(mine, total)
    return comm.rank, comm.size, float(total[0])


def _engine_sum():
    from mpi4py import MPI

    return MPI.COMM_WORLD.allreduce(MPI.COMM_WORLD.rank)


def doctor(ranks=4, cluster=True, out=print):
    """Run the checks, print one line each; return the number of failed checks."""
    failed = 0

    def line(ok, what, detail):
        nonlocal failed
        failed += not ok
        out(f"  [{'ok' if ok else 'FAIL'}] {what:<22} {detail}")

    out("syncml doctor")
    line(sys.version_info >= (3, 11), "Python", f"{platform.python_version()} at {sys.executable}"
         + ("" if sys.version_info >= (3, 11) else "  -> the course needs Python 3.11 or newer"))
    for name in ("numpy", "mpi4py", "ipyparallel", "cloudpickle", "matplotlib"):
        try:
            module = importlib.import_module(name)
            line(True, name, module.__version__)
        except ImportError as exc:
            line(False, name, f"not importable ({exc})")
    try:
        import mpi4py

        mpi4py.rc.initialize = False  # read the library's version without starting MPI here
        from mpi4py import MPI

        line(True, "MPI library", MPI.Get_library_version().splitlines()[0].strip())
    except Exception as exc:
        line(False, "MPI library", f"mpi4py cannot load an MPI library ({exc})")
    try:
        line(True, "mpiexec", mpirun.mpiexec_path())
        from . import mpienv

        settings = " ".join(f"{name}={value}" for name, value in mpienv.mpi_settings().items())
        where = ("across machines (SYNCML_NETWORK=1): Hydra's mpiexec listens on 0.0.0.0" if mpienv.across_machines()
                 else "one machine: nothing listens beyond loopback")
        line(True, "MPI jobs", f"{mpienv.launcher()} with {settings}; {where}")
    except mpirun.MPINotFoundError as exc:
        line(False, "mpiexec", f"not found beside {sys.executable} nor on PATH")
        return failed

    start = time.perf_counter()
    try:
        results = mpirun.run(_allreduce_ranks, ranks, timeout=60)
        expected = ranks * (ranks + 1) / 2
        ok = results == [(r, ranks, expected) for r in range(ranks)]
        line(ok, f"mpiexec -n {ranks}", f"Allreduce of rank+1 = {results[0][2]:g} on every rank "
             f"(expected {expected:g}) in {time.perf_counter() - start:.1f}s")
    except mpirun.MPIRunError as exc:
        line(False, f"mpiexec -n {ranks}", f"failed:\n{exc}")

    if cluster:
        from .cluster import ClusterError, mpi_cluster

        start = time.perf_counter()
        try:
            with mpi_cluster(n=ranks, timeout=60) as view:
                up = time.perf_counter() - start
                sums = view.apply_sync(_engine_sum)
            expected = ranks * (ranks - 1) // 2
            line(sums == [expected] * ranks, "ipyparallel cluster",
                 f"{ranks} MPI engines up in {up:.1f}s, allreduce of ranks = {sums[0]} (expected {expected}), "
                 f"stopped; {time.perf_counter() - start:.1f}s in all")
        except (ClusterError, Exception) as exc:
            line(False, "ipyparallel cluster", f"{exc}")
    return failed


def main(argv):
    if argv[:1] == ["grade"]:
        from .grade import main as grade

        return grade(argv[1:])
    if not argv or argv[0] != "doctor" or "-h" in argv or "--help" in argv:
        print(USAGE)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    ranks = int(argv[argv.index("--ranks") + 1]) if "--ranks" in argv else 4
    failed = doctor(ranks=ranks, cluster="--skip-cluster" not in argv)
    print("all checks passed" if not failed else f"{failed} check(s) failed (the FAIL lines above). {mpirun.FIX}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
