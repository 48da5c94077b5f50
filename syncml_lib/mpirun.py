"""Run Python code under a real `mpiexec -n N`, with a time limit, and collect each rank's result.

    results = run(fn, n=4)            # fn(comm) runs on 4 ranks; returns [result of rank 0, 1, 2, 3]
    proc = run_script(["hello.py"], n=4)   # a script; returns the CompletedProcess

`fn` travels to the ranks with cloudpickle, so test functions and notebook functions work as they
are. When a rank raises, its traceback is saved and the job is aborted (no rank waits forever for a
dead peer); when the job outlives `timeout`, the whole process group is killed. Either way
`MPIRunError` says which ranks failed or never finished, with their tracebacks and output.
The notebooks use this to run scripts from the kernel: the kernel never calls MPI itself.
"""
import atexit
import contextlib
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

from . import mpienv

__all__ = ["run", "run_script", "reuse_jobs", "mpiexec_path", "MPIRunError", "MPINotFoundError"]

FIX = ("Fix: install the course environment with `make lab` or `make test` (pip installs MPICH's wheel), "
       "or `pip install mpich mpi4py` in this environment; `python -m syncml_lib doctor` checks the set-up.")


class MPIRunError(RuntimeError):
    """An mpiexec job failed: a rank raised, the job timed out, or mpiexec itself failed.

    Besides the message: .results (rank -> result, for the ranks that finished), .failures
    (rank -> traceback text), .missing (ranks that never finished) and .timed_out.
    """

    def __init__(self, message, results=None, failures=None, missing=(), timed_out=False):
        super().__init__(message)
        self.results, self.failures = results or {}, failures or {}
        self.missing, self.timed_out = list(missing), timed_out


class MPINotFoundError(RuntimeError):
    """No usable mpiexec or mpi4py."""


def mpiexec_path():
    """The mpiexec that belongs to this Python: the one beside sys.executable first, then PATH."""
    beside = Path(sys.executable).parent / "mpiexec"
    if beside.exists():
        return str(beside)
    found = shutil.which("mpiexec")
    if found is None:
        raise MPINotFoundError(f"mpiexec was not found beside {sys.executable} nor on PATH. {FIX}")
    return found


def same_imports_env():
    """PYTHONPATH and PATH for child ranks or engines, so that what imports here imports there too
    (a test module, a notebook's own folder) and this Python's mpiexec comes first."""
    paths = [os.path.abspath(p or os.curdir) for p in sys.path if os.path.isdir(p or os.curdir)]
    return {"PYTHONPATH": os.pathsep.join(dict.fromkeys(paths)),
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}


def _child_env():
    # the course's MPI settings (mpienv: nothing listens beyond loopback; waiting ranks yield their core)
    env = mpienv.mpi_environment({**os.environ, **same_imports_env()})
    # Unbuffered ranks write a print() in pieces that mpiexec interleaves mid-line across ranks;
    # block-buffered, each rank's lines arrive whole.
    env.pop("PYTHONUNBUFFERED", None)
    return env


EXIT_GRACE = 10  # seconds a job whose ranks have all returned gets to exit


def _launch(cmd, timeout, finished=None, grace=None):
    """Run cmd in its own process group; kill the whole group on timeout. Returns (proc, timed_out).

    finished(), if given, says whether every rank has saved its result: from then on the job gets
    `grace` seconds to exit (_after_the_ranks; default EXIT_GRACE).
    """
    grace = EXIT_GRACE if grace is None else grace
    mpienv.remove_leaked_shared_memory()  # what killed jobs left could make this one fail in MPI_Init
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_child_env(), start_new_session=True)
    deadline, timed_out = time.monotonic() + timeout, False
    while True:
        try:
            out, err = proc.communicate(timeout=0.2)
            break
        except subprocess.TimeoutExpired:
            pass
        if finished is not None and finished():
            out, err = _after_the_ranks(proc, cmd, grace)
            break
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            timed_out = True
            break
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), timed_out


def _after_the_ranks(proc, cmd, grace, settle=0.1):
    """Every rank has saved its result: wait up to `grace` seconds for the rank processes to exit, then
    `settle` seconds for mpiexec; return its (stdout, stderr). MPICH's mpiexec.gforker notices that its
    ranks are gone only after a wait of about two seconds (it does not stop for SIGTERM meanwhile), so
    once none of them is left it is killed instead of waited for: there is nothing left for it to do.
    Rarely, on a loaded machine, MPICH's shutdown hangs after every rank has returned; that is not the
    code under test, so the job is then killed with a warning, not an error."""
    import psutil  # ipyparallel's dependency

    deadline, gone_since = time.monotonic() + grace, None
    while time.monotonic() < deadline:
        try:
            return proc.communicate(timeout=0.02)
        except subprocess.TimeoutExpired:
            pass
        try:
            ranks = [p for p in psutil.Process(proc.pid).children() if p.status() != psutil.STATUS_ZOMBIE]
        except psutil.Error:
            ranks = []
        gone_since = (gone_since or time.monotonic()) if not ranks else None
        if gone_since and time.monotonic() - gone_since > settle:
            os.killpg(proc.pid, signal.SIGKILL)
            return proc.communicate()
    os.killpg(proc.pid, signal.SIGKILL)
    out, err = proc.communicate()
    warnings.warn(f"every rank of `{' '.join(cmd[-3:])}` returned, but mpiexec had not exited {grace}s later: "
                  f"killed it (an MPI shutdown hang, not a failure of the job)")
    return out, err


def _tail(text, lines=40):
    text = (text or "").rstrip()
    cut = text.splitlines()[-lines:]
    return "\n".join("    " + line for line in cut) if cut else "    (nothing)"


def run(fn, n, *args, timeout=60, **kwargs):
    """Call fn(comm, *args, **kwargs) on n ranks under mpiexec; return the list of results by rank.

    comm is MPI.COMM_WORLD of the job (a duplicate of it in a reused job: reuse_jobs). Raises MPIRunError
    naming the ranks that raised (with their tracebacks) or that had not finished when `timeout` seconds
    ran out.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive number of ranks, got {n!r}")
    pool = _pool_for(n)
    ran = pool.run(fn, args, kwargs, timeout) if pool else _run_in_a_job_of_its_own(fn, n, args, kwargs, timeout)
    return _results_or_error(getattr(fn, "__qualname__", repr(fn)), n, timeout, ran)


@dataclass
class _Ran:
    """What one call of fn on the ranks left: results and tracebacks by rank, and how the job ended."""
    results: dict
    failures: dict
    missing: list
    timed_out: bool
    never_started: bool
    elapsed: float
    returncode: int
    stdout: str
    stderr: str


def _collect(folder, n):
    """Each rank's result or traceback from `folder`, and the ranks that left neither."""
    results, failures, missing = {}, {}, []
    for rank in range(n):
        done, failed = folder / f"rank{rank}.result", folder / f"rank{rank}.error"
        if failed.exists():
            failures[rank] = failed.read_text()
        elif done.exists():
            results[rank] = pickle.loads(done.read_bytes())
        else:
            missing.append(rank)
    return results, failures, missing


def _run_in_a_job_of_its_own(fn, n, args, kwargs, timeout):
    import cloudpickle

    with tempfile.TemporaryDirectory(prefix="syncml-mpirun-") as tmp:
        job = Path(tmp)
        (job / "job.pkl").write_bytes(cloudpickle.dumps((fn, args, kwargs)))
        cmd = [mpienv.launcher(), "-n", str(n), sys.executable, "-m", "syncml_lib.mpirun", str(job)]
        start = time.perf_counter()
        saved = lambda: all((job / f"rank{r}.result").exists() for r in range(n))  # noqa: E731
        proc, timed_out = _launch(cmd, timeout, finished=saved)
        if timed_out and not any(job.glob("rank*.started")):
            # No rank got past MPI's start-up: the job never ran, so this says nothing about fn. It has
            # happened, rarely, on a loaded 2-core machine; try once more before calling it a failure.
            warnings.warn(f"no rank of `{' '.join(cmd[-3:])}` started within {timeout}s: running it again")
            proc, timed_out = _launch(cmd, timeout, finished=saved)
        never_started = timed_out and not any(job.glob("rank*.started"))
        return _Ran(*_collect(job, n), timed_out, never_started, time.perf_counter() - start, proc.returncode,
                    proc.stdout, proc.stderr)


def _results_or_error(name, n, timeout, ran):
    killed_after_success = (not ran.failures and not ran.missing and not ran.timed_out
                            and ran.returncode == -signal.SIGKILL)
    if (ran.failures or ran.missing or ran.timed_out or ran.returncode not in (0, None)) and not killed_after_success:
        lines = [f"{name} on {n} ranks failed after {ran.elapsed:.1f}s:"]
        if ran.never_started:
            lines.append(f"  no rank started within {timeout}s, twice: MPI itself did not start; the job was killed.")
        elif ran.timed_out:
            lines.append(f"  timed out after {timeout}s (a deadlock, or too slow); the job was killed.")
        for rank, tb in sorted(ran.failures.items()):
            lines.append(f"  rank {rank} raised:\n" + _tail(tb))
        if ran.missing:
            why = ("were still running" if ran.timed_out
                   else "did not finish (aborted after another rank failed, or crashed)")
            lines.append(f"  ranks {ran.missing} {why}.")
        if not ran.failures and not ran.timed_out:
            lines.append(f"  mpiexec exited with code {ran.returncode}.")
        lines.append("  stdout:\n" + _tail(ran.stdout))
        lines.append("  stderr:\n" + _tail(ran.stderr))
        raise MPIRunError("\n".join(lines), ran.results, ran.failures, ran.missing, ran.timed_out)
    return [ran.results[rank] for rank in range(n)]


def run_script(argv, n, timeout=60, check=True):
    """Run `mpiexec -n n python *argv` (mpienv.launcher()'s mpiexec) and return the CompletedProcess (stdout, stderr as text).

    argv is a script path or a list such as ["-m", "syncml_lib.bench", "allreduce"].
    With check=True a non-zero exit or a timeout raises MPIRunError with the output.
    """
    argv = [str(argv)] if isinstance(argv, (str, os.PathLike)) else [str(a) for a in argv]
    cmd = [mpienv.launcher(), "-n", str(n), sys.executable, *argv]
    proc, timed_out = _launch(cmd, timeout)
    if check and (timed_out or proc.returncode != 0):
        why = f"timed out after {timeout}s and was killed" if timed_out else f"exited with code {proc.returncode}"
        raise MPIRunError(f"`{' '.join(cmd)}` {why}.\n  stdout:\n{_tail(proc.stdout)}\n  stderr:\n{_tail(proc.stderr)}",
                          timed_out=timed_out)
    return proc


def _rank_main(job):
    """What each rank runs: load the job, call it, save the result or the traceback."""
    from mpi4py import MPI

    _run_case(MPI.COMM_WORLD, MPI.COMM_WORLD, Path(job))


def _run_case(world, comm, job):
    """fn(comm, ...) of the job in folder `job`: save this rank's result, or its traceback and abort the
    whole job (no rank waits forever for a peer that failed)."""
    (job / f"rank{world.rank}.started").touch()
    try:
        fn, args, kwargs = pickle.loads((job / "job.pkl").read_bytes())
        result = fn(comm, *args, **kwargs)
        data = pickle.dumps(result)
    except BaseException:
        (job / f"rank{world.rank}.error").write_text(traceback.format_exc())
        sys.stdout.flush()
        sys.stderr.flush()
        time.sleep(0.2)  # let a peer that failed at the same moment save its traceback too
        world.Abort(1)
    else:
        tmp = job / f"rank{world.rank}.tmp"
        tmp.write_bytes(data)
        tmp.rename(job / f"rank{world.rank}.result")


# ---------------------------------------------------------------- reused jobs (the test suite's)

_reusing = False
START_LIMIT = 60  # seconds a reused job gets to start, before its first case's own time limit begins
_POOLS = {}  # n -> the _Pool of n ranks, while reuse_jobs is on
_reused_settings = None  # the environment (_settings) in which reuse_jobs was turned on: the pools' own


def reuse_jobs(on=True):
    """From now on run() calls fn inside one long-lived mpiexec job per rank count instead of a new job
    each time (on=False: stop those jobs, and start a job per call again). The test suite does this: its
    hundreds of small cases would otherwise each pay mpiexec's and Python's start-up. Each case still
    gets a fresh duplicate of COMM_WORLD; a case that raises, hangs or crashes ends its job, which is
    started again for the next case; a call made with other environment variables than the job's gets
    a job of its own."""
    global _reusing, _reused_settings
    _reusing = on
    _reused_settings = _settings(_child_env()) if on else None  # the environment every reused job has
    if not on:
        for pool in list(_POOLS.values()):
            pool.stop()
        _POOLS.clear()


def _pool_for(n):
    """The reused job of n ranks for the next case, started if needed; None when not reusing, or when the
    environment is not the job's (a test that sets an MPI variable gets a job of its own)."""
    if not _reusing or _settings(_child_env()) != _reused_settings:
        return None  # (a job started now with another environment would serve no later call)
    pool = _POOLS.get(n)
    if pool is not None and not pool.usable():
        pool.stop()
        pool = None
    if pool is None:
        pool = _POOLS[n] = _Pool(n)
    return pool


def _settings(env):
    """What of an environment a reused job must share with a call: all but pytest's own note of the test
    that is running (PYTEST_CURRENT_TEST changes with every test, and would end every job after one test)."""
    return {name: value for name, value in env.items() if not name.startswith("PYTEST_")}


class _Pool:
    """One long-lived job of n ranks that runs case after case. The driver writes each case's job.pkl into
    a folder of its own and names it to every rank through the rank's own FIFO (the ranks wait in a
    blocking read: an idle job uses no CPU); results come back as files, as from a job of its own. A case
    that raises (its job aborts), hangs (killed at its timeout) or crashes ends the job; after CASES_PER_JOB
    cases it is replaced too, so what cases leave behind (communicators, memory) cannot pile up."""

    CASES_PER_JOB = 200

    def __init__(self, n):
        self.n, self.env, self.cases = n, _child_env(), 0
        self.folder = Path(tempfile.mkdtemp(prefix=f"syncml-pool{n}-"))
        for rank in range(n):
            os.mkfifo(self.folder / f"rank{rank}.fifo")
        mpienv.remove_leaked_shared_memory()
        self.out, self.err = open(self.folder / "stdout", "w+"), open(self.folder / "stderr", "w+")
        cmd = [mpienv.launcher(), "-n", str(n), sys.executable, "-m", "syncml_lib.mpirun", "--serve", str(self.folder)]
        self.proc = subprocess.Popen(cmd, stdout=self.out, stderr=self.err, env=self.env, start_new_session=True)
        # read-write: opening never blocks, and the ranks read EOF once this process has closed it
        self.orders = [os.open(self.folder / f"rank{rank}.fifo", os.O_RDWR) for rank in range(n)]

    def usable(self):
        return self.proc.poll() is None and self.cases < self.CASES_PER_JOB

    def run(self, fn, args, kwargs, timeout):
        import cloudpickle

        case = self.folder / f"case{self.cases}"
        case.mkdir()
        (case / "job.tmp").write_bytes(cloudpickle.dumps((fn, args, kwargs)))
        (case / "job.tmp").rename(case / "job.pkl")
        self.cases += 1
        start = time.perf_counter()
        for fd in self.orders:
            os.write(fd, f"{case.name}\n".encode())
        # the time limit counts from the moment every rank has the case: a job still starting (its first
        # case) gets START_LIMIT seconds for that, so a short limit meant for the case is not spent on it
        deadline, timed_out, started = time.monotonic() + max(timeout, START_LIMIT), False, False
        finished = lambda: all((case / f"rank{r}.result").exists() or (case / f"rank{r}.error").exists()  # noqa: E731
                               for r in range(self.n))
        while not finished() and self.proc.poll() is None:
            if not started and all((case / f"rank{r}.started").exists() for r in range(self.n)):
                started, deadline = True, time.monotonic() + timeout
            if time.monotonic() > deadline:
                timed_out = True
                break
            time.sleep(0.002)
        ended = timed_out or any(case.glob("rank*.error")) or self.proc.poll() is not None
        if ended:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=0 if timed_out else EXIT_GRACE)  # a failed case aborts the job
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        never_started = timed_out and not any(case.glob("rank*.started"))
        ran = _Ran(*_collect(case, self.n), timed_out, never_started, time.perf_counter() - start,
                   self.proc.returncode, _read(self.out), _read(self.err))  # returncode None: the job goes on
        shutil.rmtree(case, ignore_errors=True)
        if ended:
            self.stop()
        return ran

    def stop(self):
        """End the job: the ranks read EOF and exit; whatever is still there a moment later is killed."""
        for fd in self.orders:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.orders = []
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=1)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.out.close()
        self.err.close()
        shutil.rmtree(self.folder, ignore_errors=True)


def _read(file):
    file.flush()
    file.seek(0)
    return file.read()


def _serve(folder):
    """What each rank of a reused job runs: case after case, each on a fresh duplicate of COMM_WORLD."""
    from mpi4py import MPI

    world, folder = MPI.COMM_WORLD, Path(folder)
    with open(folder / f"rank{world.rank}.fifo") as orders:
        for line in iter(orders.readline, ""):
            library = _library_names()
            comm = world.Dup()
            _run_case(world, comm, folder / line.strip())
            comm.Free()
            _put_back(library)


def _library_names():
    """What each loaded module of the course library names (its functions, classes, constants)."""
    return {name: dict(vars(module)) for name, module in list(sys.modules.items())
            if module is not None and (name == "syncml_lib" or name.startswith("syncml_lib."))}


def _put_back(library):
    """Undo what a case rebound in the library modules that were loaded before it (a test that put a
    broken function in place of one of the library's and did not put it back), so that the next case on
    these ranks finds them as a job of its own would. (A module first loaded by the case itself has no
    state from before to go back to: a test that patches the library still puts back what it changed.)"""
    for name, names in library.items():
        module = sys.modules.get(name)
        for attribute, value in names.items():
            if module is not None and getattr(module, attribute, None) is not value:
                setattr(module, attribute, value)


atexit.register(reuse_jobs, False)


if __name__ == "__main__":
    if sys.argv[1] == "--serve":
        _serve(sys.argv[2])
    else:
        _rank_main(sys.argv[1])
