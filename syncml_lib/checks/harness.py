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
import sysconfig
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

    _publish_data({"started": True})  # the check's time limit counts from here (_all_started)
    return _in_fresh_comm(MPI.COMM_WORLD, rank_fn, *args)


START_LIMIT = 30  # seconds for every rank to enter the learner's function before the time limit counts
STUCK = ("did not finish within {timeout}s: it is waiting for a message or a collective that never comes "
         "(some ranks call what others skip, or a rank that hit an error left early)")
STUCK_INSIDE = ("is still inside your function after {timeout}s, waiting for a message or a collective that "
                "the other ranks never send or call")
STUCK_AFTER = ("returned from your function, then waited {timeout}s for the other ranks, which are still "
               "inside theirs")
RESTARTED = ("; the engines were stuck in it, so new ones were started ({took:.1f} s): the next check runs on "
             "engines that are not stuck (anything you defined on the old ones with %px is gone)")


def run_on_ranks(rank_fn, *args, view=None, n=4, timeout=TIMEOUT):
    """rank_fn(comm, *args) on each engine of `view` (or each rank of `mpiexec -n n`): a list by rank.

    Each rank function returns its list of problems. A rank still running after `timeout` seconds
    gets the problem STUCK instead, and the ranks that did finish keep theirs: their errors are
    usually why the others wait. Engines left stuck are replaced (cluster.restart_engines), so a hang
    is reported once, against the code that hung, never against the next check.
    """
    stuck = [STUCK.format(timeout=timeout)]
    if view is None:
        try:
            return mpirun.run(_in_fresh_comm, n, rank_fn, *args, timeout=timeout)
        except mpirun.MPIRunError as exc:
            if not exc.timed_out:
                raise CheckFailed(f"the check itself failed:\n{exc}") from None
            return [exc.results.get(rank, stuck) for rank in range(n)]
    _not_stuck_before(view)
    # one request per engine, all sent at once, so the ranks run together and each can be waited for
    requests = [view.client[engine].apply_async(_on_engine, rank_fn, *args) for engine in view.targets]
    deadline = _all_started(requests) + timeout
    for request in requests:
        request.wait(max(0.0, deadline - time.monotonic()))
    if all(request.ready() for request in requests):
        return [request.get() for request in requests]
    reports, stuck_ranks = [], []
    for rank, request in enumerate(requests):
        if request.ready():
            reports.append(request.get())
        else:
            inside = (request.data or {}).get("inside_learner_function")
            reports.append([{True: STUCK_INSIDE, False: STUCK_AFTER}.get(inside, STUCK).format(timeout=timeout)])
            stuck_ranks.append(rank)
    restarted = RESTARTED.format(took=_restart(view))
    for rank in stuck_ranks:  # every stuck rank says it, so it is shown once
        reports[rank][0] += restarted
    return reports


def _all_started(requests, limit=START_LIMIT):
    """When every engine has started the check (or finished it): the time limit counts from there, not
    from the sending, so engines that are slow to start on a busy machine (new ones still importing, say)
    are not taken for a hang. At most `limit` seconds; then the limit counts from now."""
    give_up = time.monotonic() + limit
    while time.monotonic() < give_up:
        if all(request.ready() or (request.data or {}).get("started") for request in requests):
            break
        time.sleep(0.02)
    return time.monotonic()


def _restart(view):
    from ..cluster import restart_engines

    return restart_engines(view, say=None)


def _not_stuck_before(view, grace=2.0):
    """Before a check: if the engines are still busy with an earlier cell (stuck in a call that never
    returns, most likely, or gone), say so and replace them, so this check does not wait behind it."""
    client, deadline = view.client, time.monotonic() + grace
    while True:
        if not set(view.targets) <= set(client.ids):
            busy = [rank for rank, engine in enumerate(view.targets) if engine not in client.ids]
            what = "have stopped"
            break
        status = client.queue_status(targets=view.targets)
        # the hub's count, and this client's own (a request just sent may not have reached the hub yet)
        mine = {engine: client._outstanding_dict.get(client._engines.get(engine)) for engine in view.targets}
        busy = [rank for rank, engine in enumerate(view.targets)
                if status[engine]["queue"] or status[engine]["tasks"] or mine[engine]]
        what = "were still busy with an earlier cell (a call that never returned?)"
        if not busy or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    if busy:
        print(f"Before this check: the engines of rank{'s' if len(busy) > 1 else ''} {', '.join(map(str, busy))} "
              f"{what}; new engines were started ({_restart(view):.1f} s). Anything you defined on the old ones "
              f"with %px is gone: run those cells again.")


def _publish(inside):
    """On an ipyparallel engine, tell the notebook whether this rank is inside the learner's function,
    so that a check that times out can say which ranks are stuck where."""
    _publish_data({"inside_learner_function": inside})


def _publish_data(data):
    """On an ipyparallel engine, send `data` to the notebook now (the request's .data there)."""
    if "ipyparallel.engine" in sys.modules:
        with contextlib.suppress(Exception):
            from ipyparallel.datapub import publish_data

            publish_data(data)
            # wait until the engine's I/O thread has sent it: a rank can block inside MPI while holding the
            # GIL (the root of a pickle-based reduce), and the message would then never leave
            sys.stdout.flush()


def _call(fn, *args):
    """Call the learner's fn; return (result, None) or (None, description of the exception)."""
    _publish(True)
    try:
        return fn(*args), None
    except NotImplementedError:
        return None, "raised NotImplementedError: the exercise is not written yet"
    except Exception as exc:
        return None, f"raised {type(exc).__name__}: {exc} ({_where(exc)})"
    finally:
        _publish(False)


# folders of code that is not the learner's: Python's, the installed packages' and the course library's
NOT_THE_LEARNERS = tuple({sysconfig.get_paths()[key] for key in ("stdlib", "purelib", "platlib")}
                         | {os.path.dirname(CHECKS_FOLDER)})


def _where(exc):
    """Where an exception of the learner's function arose: "line 4 of weighted_average", the learner's own
    deepest line, and the library call it was in, if any ("..., in mpi4py.MPI.Comm.Allreduce"). Compiled
    libraries (mpi4py) name their frames by relative source paths; a notebook cell has an absolute one."""
    frames = traceback.extract_tb(exc.__traceback__)[1:]  # frames[0] is _call
    learners = [frame for frame in frames if (frame.filename.startswith(("/", "<")) and
                                              not os.path.abspath(frame.filename).startswith(NOT_THE_LEARNERS))]
    if not learners:
        return f"line {frames[-1].lineno} of {frames[-1].name}"
    own = learners[-1]
    called = frames[frames.index(own) + 1:]  # the library call on the learner's line, if it raised inside
    return f"line {own.lineno} of {own.name}" + (f", in {called[0].name}" if called else "")


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
