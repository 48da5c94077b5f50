"""The harness every exercise check shares: run a rank function on every rank, gather, report.

A *rank function* rank_fn(comm, learner, ...) runs on every rank: it builds seeded inputs, calls the
learner's code through `_call` (never raising, so one rank's bug cannot leave the others waiting)
and returns its list of problems. `run_on_ranks` runs it on the notebook's engines or under
`mpiexec`, each time on a fresh duplicate of the communicator, and `_report` raises `CheckFailed`
naming the first problem of each failing rank, or prints what passed. `exercise_check` makes the
public `check_...` function of a rank function.
"""
import contextlib
import inspect
import os
import sys
import time
import traceback

import numpy as np

from .. import mpirun

# Seconds every check waits for every rank before it calls the learner's function stuck. A right answer
# passes the slowest check (chapter 06, a real training run; most of it is importing scikit-learn) in about
# 3 s on 4 ranks, mpiexec's start included.
TIMEOUT = 30


CHECKS_FOLDER = os.path.dirname(os.path.abspath(__file__))


class CheckFailed(AssertionError):
    """The learner's code gave a wrong answer, raised, or hung."""

    def _render_traceback_(self):
        """What IPython (JupyterLab, nbval) shows of a failed check: the learner's own lines and the
        message, without the frames of the check's code. IPython would always show the last frame, the
        `raise` in _report; pytest already leaves it out (__tracebackhide__)."""
        hidden = [CHECKS_FOLDER] + [os.path.dirname(sys.modules[name].__file__)  # IPython's own frames
                                    for name in ("IPython", "ipykernel") if name in sys.modules]
        learners = [frame for frame in traceback.extract_tb(self.__traceback__)
                    if not os.path.abspath(frame.filename).startswith(tuple(hidden))]
        lines = ["Traceback (most recent call last):"] if learners else []
        lines += [entry.rstrip("\n") for entry in traceback.format_list(learners)]
        return lines + [f"{type(self).__name__}: {self}"]


def _in_fresh_comm(comm, rank_fn, *args):
    """rank_fn on a duplicate of comm. A wrong answer can leave messages nobody receives (a collective
    that only some ranks called); in a duplicate they can never be matched by a later check's calls.
    The duplicate is freed only when every rank passed, so a used one is never handed out again."""
    fresh = comm.Dup()
    problems = rank_fn(fresh, *args)
    if not fresh.allreduce(len(problems)):
        fresh.Free()
    return problems


def _on_engine(rank_fn, *args):
    from mpi4py import MPI

    return _in_fresh_comm(MPI.COMM_WORLD, rank_fn, *args)


STUCK = ("did not finish within {timeout}s: it is waiting for a message or a collective that never comes "
         "(some ranks call what others skip, or a rank that hit an error left early)")
STUCK_INSIDE = ("is still inside your function after {timeout}s, waiting for a message or a collective that "
                "the other ranks never send or call")
STUCK_AFTER = ("returned from your function, then waited {timeout}s for the other ranks, which are still "
               "inside theirs")
RESTART = "; the engines stay stuck: stop the cluster (`cluster.stop_cluster_sync()`) and start a new one"


def run_on_ranks(rank_fn, *args, view=None, n=4, timeout=TIMEOUT):
    """rank_fn(comm, *args) on each engine of `view` (or each rank of `mpiexec -n n`): a list by rank.

    Each rank function returns its list of problems. A rank still running after `timeout` seconds
    gets the problem STUCK instead, and the ranks that did finish keep theirs: their errors are
    usually why the others wait.
    """
    stuck = [STUCK.format(timeout=timeout)]
    if view is None:
        try:
            return mpirun.run(_in_fresh_comm, n, rank_fn, *args, timeout=timeout)
        except mpirun.MPIRunError as exc:
            if not exc.timed_out:
                raise CheckFailed(f"the check itself failed:\n{exc}") from None
            return [exc.results.get(rank, stuck) for rank in range(n)]
    # one request per engine, all sent at once, so the ranks run together and each can be waited for
    requests = [view.client[engine].apply_async(_on_engine, rank_fn, *args) for engine in view.targets]
    deadline = time.monotonic() + timeout
    for request in requests:
        request.wait(max(0.0, deadline - time.monotonic()))
    reports = []
    for request in requests:
        if request.ready():
            reports.append(request.get())
        else:  # what _call published from the engine says where this rank is waiting
            inside = (request.data or {}).get("inside_learner_function")
            why = {True: STUCK_INSIDE, False: STUCK_AFTER}.get(inside, STUCK).format(timeout=timeout)
            first_stuck = not any(RESTART in r[0] for r in reports if r)
            reports.append([why + (RESTART if first_stuck else "")])
    return reports


def _publish(inside):
    """On an ipyparallel engine, tell the notebook whether this rank is inside the learner's function,
    so that a check that times out can say which ranks are stuck where."""
    if "ipyparallel.engine" in sys.modules:
        with contextlib.suppress(Exception):
            from ipyparallel.datapub import publish_data

            publish_data({"inside_learner_function": inside})


def _call(fn, *args):
    """Call the learner's fn; return (result, None) or (None, description of the exception)."""
    _publish(True)
    try:
        return fn(*args), None
    except NotImplementedError:
        return None, "raised NotImplementedError: the exercise is not written yet"
    except Exception as exc:
        where = traceback.extract_tb(exc.__traceback__)[-1]
        return None, f"raised {type(exc).__name__}: {exc} (line {where.lineno} of {where.name})"
    finally:
        _publish(False)


def _anyone(comm, problems):
    """True on every rank if any rank has found a problem: all ranks stop after the same trial, so none
    is left waiting in the next one for a rank that stopped (one small pickle-based allreduce)."""
    return comm.allreduce(len(problems)) > 0


def _report(title, reports):
    """Raise CheckFailed with each rank's first problem, or print a pass line."""
    __tracebackhide__ = True  # IPython and pytest show the message, not this frame
    failed = {}  # first problem -> the ranks that had it, so a problem every rank found is shown once
    for rank, rank_problems in enumerate(reports):
        if rank_problems:
            failed.setdefault(rank_problems[0], []).append(rank)
    if failed:
        problems = [f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}: {problem}"
                    for problem, ranks in failed.items()]
        shown = "\n  ".join(problems[:8])
        more = f"\n  ... and {len(problems) - 8} more" if len(problems) > 8 else ""
        count = sum(len(ranks) for ranks in failed.values())
        raise CheckFailed(f"{title}: failed on {count} of {len(reports)} ranks\n  {shown}{more}")
    print(f"{title}: passed on {len(reports)} ranks.")


def _table(learner, cases, describe, judge, explain_error=lambda error: ""):
    """The learner's first problem on a table of cases ((args, expected, why)) as a list, or [].
    describe(i, args) names call i; judge(args, got, expected, why) says what is wrong with a result
    ("returned ..."), or None; explain_error(error) may add to the message of an exception."""
    for i, (args, expected, why) in enumerate(cases):
        got, error = _call(learner, *args)
        if error:
            return [f"{describe(i, args)}: your function {error}{explain_error(error)}"]
        problem = judge(args, got, expected, why)
        if problem:
            return [f"{describe(i, args)} {problem}"]
    return []


def exercise_check(rank_fn, *rank_args):
    """Make the public check of an exercise from its rank function:

        @exercise_check(_global_mean_on_rank)
        def check_global_mean(global_mean):
            '''global_mean(comm, local_values) must return the mean of all ranks' values.'''

    gives check_global_mean(global_mean, view=None, n=4, timeout=TIMEOUT), which runs
    rank_fn(comm, global_mean, *rank_args) on every rank (run_on_ranks) and reports (_report). The
    decorated function lends its name, docstring and argument name; its body is never run."""
    def make(named):
        def check(learner, view=None, n=4, timeout=TIMEOUT):
            __tracebackhide__ = True
            _report(named.__name__, run_on_ranks(rank_fn, learner, *rank_args, view=view, n=n, timeout=timeout))

        learner_name = next(iter(inspect.signature(named).parameters))
        learner, *options = inspect.signature(check).parameters.values()
        check.__signature__ = inspect.Signature([learner.replace(name=learner_name)] + options)
        check.__name__ = check.__qualname__ = named.__name__
        check.__doc__, check.__module__ = named.__doc__, named.__module__
        return check
    return make


# ---------------------------------------------------------------- tools the chapters' checks share

@contextlib.contextmanager
def _in_place_of(module, name, replacement):
    """Run with `replacement` in place of module.name (the learner's function inside the library, or a
    watcher in place of a numpy function), then put the original back."""
    original = getattr(module, name)
    setattr(module, name, replacement)
    try:
        yield
    finally:
        setattr(module, name, original)


def _show(values, limit=4):
    """A few values of an array and its size, for a message."""
    values = np.asarray(values).ravel()
    shown = ", ".join(f"{v:g}" for v in values[:limit])
    return f"[{shown}{', ...' if values.size > limit else ''}] ({values.size} values)"


def _described(value):
    """'25.0, a float64': a value and its type, for a message about a value of the wrong type."""
    name = type(value).__name__
    return f"{value}, {'an' if name[0] in 'aeiou' else 'a'} {name}"


def _wrong_type(got, is_right, advice):
    """'returned 3.0, a float64; <advice>' unless is_right(got) (e.g. _is_int, _is_bool), else None."""
    return None if is_right(got) else f"returned {_described(got)}; {advice}"


def _is_int(value):
    """A whole number of Python's or numpy's integer types (not a bool, not a float that is whole)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_bool(value):
    return isinstance(value, (bool, np.bool_))


COLLECTIVES = {"Allreduce", "allreduce", "Reduce", "reduce", "Bcast", "bcast", "Gather", "gather", "Gatherv",
               "Allgather", "allgather", "Allgatherv", "Scatter", "scatter", "Scatterv", "Alltoall", "alltoall",
               "Reduce_scatter", "Reduce_scatter_block", "Scan", "scan", "Exscan", "exscan", "Barrier", "barrier"}


class _CountingComm:
    """Forwards everything to comm and counts the collective calls made through it."""

    def __init__(self, comm):
        self._comm, self.collectives = comm, []

    def __getattr__(self, name):
        attribute = getattr(self._comm, name)
        if name in COLLECTIVES:
            self.collectives.append(name)
        return attribute
