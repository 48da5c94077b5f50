"""Exercise checks: run the learner's function for real on every rank and say what is wrong.

    check_global_mean(global_mean, view)     # on the notebook's MPI engines
    check_global_mean(global_mean)           # or under `mpiexec -n 4`, e.g. from a test

Each check has two halves. A *rank function* runs on every rank: it builds seeded inputs, calls the
learner's code inside try/except and returns what it saw (never raising, so one rank's bug cannot
leave the others waiting). The *driver* gathers those reports by rank and raises `CheckFailed`
naming the first rank, trial and value that are wrong, or prints what passed.
"""
import time
import traceback

import numpy as np

from . import mpirun

__all__ = ["CheckFailed", "run_on_ranks", "check_global_mean"]


class CheckFailed(AssertionError):
    """The learner's code gave a wrong answer, raised, or hung."""


def _on_engine(rank_fn, *args):
    from mpi4py import MPI

    return rank_fn(MPI.COMM_WORLD, *args)


def run_on_ranks(rank_fn, *args, view=None, n=4, timeout=60):
    """rank_fn(comm, *args) on each engine of `view` (or each rank of `mpiexec -n n`); results by rank."""
    if view is None:
        try:
            return mpirun.run(rank_fn, n, *args, timeout=timeout)
        except mpirun.MPIRunError as exc:
            raise CheckFailed(f"the check itself could not finish:\n{exc}") from None
    ar = view.apply_async(_on_engine, rank_fn, *args)
    try:
        return ar.get(timeout=timeout)
    except TimeoutError:
        outstanding = view.client.outstanding
        waiting = [rank for rank, msg_id in enumerate(ar.msg_ids) if msg_id in outstanding]
        raise CheckFailed(
            f"no answer within {timeout}s: ranks {waiting} are still inside your function. Usually some "
            f"ranks call a collective (or a receive) that the others never call, so they wait forever. "
            f"The engines are stuck: restart them with `cluster.stop_cluster_sync()` and a new "
            f"`start_mpi_cluster()`, then fix the function."
        ) from None


def _call(fn, *args):
    """Call the learner's fn; return (result, None) or (None, description of the exception)."""
    try:
        return fn(*args), None
    except NotImplementedError:
        return None, "raised NotImplementedError: the exercise is not written yet"
    except Exception as exc:
        where = traceback.extract_tb(exc.__traceback__)[-1]
        return None, f"raised {type(exc).__name__}: {exc} (line {where.lineno} of {where.name})"


def _report(title, reports):
    """Raise CheckFailed with the first problems across ranks, or print a pass line."""
    problems = [f"rank {rank}: {p}" for rank, rank_problems in enumerate(reports) for p in rank_problems]
    if problems:
        shown = "\n  ".join(problems[:8])
        more = f"\n  ... and {len(problems) - 8} more" if len(problems) > 8 else ""
        raise CheckFailed(f"{title}: {len(problems)} problem(s)\n  {shown}{more}")
    print(f"{title}: passed on {len(reports)} ranks.")


# ---------------------------------------------------------------- chapter 00: a global mean

GLOBAL_MEAN_TRIALS = 4


def global_mean_inputs(trial, size):
    """Every rank's local values for one trial: uneven lengths, one rank with none."""
    rng = np.random.default_rng(1000 + trial)
    lengths = rng.integers(1, 7, size=size)
    lengths[trial % size] = 0 if size > 1 else lengths[0]
    return [rng.normal(loc=trial, scale=3.0, size=k) for k in lengths]


def _global_mean_on_rank(comm, global_mean):
    problems = []
    for trial in range(GLOBAL_MEAN_TRIALS):
        everyone = global_mean_inputs(trial, comm.size)
        mine = everyone[comm.rank].copy()
        expected = np.concatenate(everyone).mean()
        lengths = [len(v) for v in everyone]
        got, error = _call(global_mean, comm, mine)
        if error:
            problems.append(f"trial {trial} (lengths by rank {lengths}): your function {error}")
            break
        if not np.array_equal(mine, everyone[comm.rank]):
            problems.append(f"trial {trial}: your function changed its input array")
        if not np.isscalar(got) and np.shape(got) != ():
            problems.append(f"trial {trial}: returned {got!r}, expected one number")
        elif not np.isclose(float(got), expected, rtol=1e-12, atol=1e-12):
            local = f"{mine.mean():.6g}" if len(mine) else "undefined (no values)"
            problems.append(f"trial {trial} (lengths by rank {lengths}): returned {float(got):.6g}, "
                            f"expected {expected:.6g} (this rank's own mean is {local})")
    return problems


def check_global_mean(global_mean, view=None, n=4, timeout=60):
    """global_mean(comm, local_values) must return the mean of all ranks' values, on every rank."""
    reports = run_on_ranks(_global_mean_on_rank, global_mean, view=view, n=n, timeout=timeout)
    _report("check_global_mean", reports)
