"""Exercise checks: run the learner's function for real on every rank and say what is wrong.

    check_global_mean(global_mean, view)     # on the notebook's MPI engines
    check_global_mean(global_mean)           # or under `mpiexec -n 4`, e.g. from a test

Each check has two halves. A *rank function* runs on every rank: it builds seeded inputs, calls the
learner's code inside try/except and returns what it saw (never raising, so one rank's bug cannot
leave the others waiting). The *driver* gathers those reports by rank and raises `CheckFailed`
naming the first rank, trial and value that are wrong, or prints what passed.
"""
import contextlib
import sys
import time
import traceback

import numpy as np

from . import mpirun

__all__ = ["CheckFailed", "run_on_ranks", "check_global_mean", "check_ring_reduce_scatter", "check_ring_allgather",
           "check_recursive_doubling", "check_ssp_rule", "check_momentum", "check_shard", "check_scatter_rows",
           "check_epoch_indices", "check_ring_owners", "check_guided_chunk", "check_expired_leases",
           "check_record_result"]


class CheckFailed(AssertionError):
    """The learner's code gave a wrong answer, raised, or hung."""


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


def run_on_ranks(rank_fn, *args, view=None, n=4, timeout=30):
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


# ---------------------------------------------------------------- chapter 00: a global mean

GLOBAL_MEAN_TRIALS = 4


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


def global_mean_inputs(trial, size):
    """Every rank's local values for one trial: uneven lengths; from trial 1 on, one rank has none."""
    rng = np.random.default_rng(1000 + trial)
    lengths = rng.integers(1, 7, size=size)
    if trial > 0 and size > 1:
        lengths[trial % size] = 0
    return [rng.normal(loc=trial, scale=3.0, size=k) for k in lengths]


def _global_mean_on_rank(comm, global_mean):
    problems = []
    for trial in range(GLOBAL_MEAN_TRIALS):
        everyone = global_mean_inputs(trial, comm.size)
        mine = everyone[comm.rank].copy()
        expected = np.concatenate(everyone).mean()
        lengths = [len(v) for v in everyone]
        counting = _CountingComm(comm)
        got, error = _call(global_mean, counting, mine)
        if error:
            problems.append(f"trial {trial} (lengths by rank {lengths}): your function {error}")
        elif len(counting.collectives) != 1:
            problems.append(f"trial {trial}: your function made {len(counting.collectives)} collective calls "
                            f"({', '.join(counting.collectives) or 'none'}); the exercise asks for exactly one")
        elif not np.array_equal(mine, everyone[comm.rank]):
            problems.append(f"trial {trial}: your function changed its input array")
        elif not np.isscalar(got) and np.shape(got) != ():
            problems.append(f"trial {trial}: returned {got!r}, expected one number")
        elif not np.isclose(float(got), expected, rtol=1e-12, atol=1e-12):
            local = f"{mine.mean():.6g}" if len(mine) else "undefined (no values)"
            problems.append(f"trial {trial} (lengths by rank {lengths}): returned {float(got):.6g}, "
                            f"expected {expected:.6g} (this rank's own mean is {local})")
        if _anyone(comm, problems):
            break
    return problems


def check_global_mean(global_mean, view=None, n=4, timeout=30):
    """global_mean(comm, local_values) must return the mean of all ranks' values, on every rank."""
    __tracebackhide__ = True
    reports = run_on_ranks(_global_mean_on_rank, global_mean, view=view, n=n, timeout=timeout)
    _report("check_global_mean", reports)


# ---------------------------------------------------------------- chapter 03: the ring and recursive doubling

RING_LENGTHS = (12, 13, 3, 1001)  # 13 and 1001 do not divide evenly; 3 is fewer elements than 4 ranks


def _integer_inputs(trial, size, length):
    """Every rank's array for one trial: small integers stored as float64, so every sum is exact."""
    rng = np.random.default_rng(3000 + trial)
    return rng.integers(-9, 10, size=(size, length)).astype(np.float64)


def _recording(comm):
    """A TracedComm that also keeps a copy of every array sent, so a check can say which step went wrong."""
    from .trace import TracedComm

    class Recording(TracedComm):
        def __init__(self, comm):
            super().__init__(comm)
            self.sent = []  # (step, dest, copy of the data)
            self.blocking_sends = 0

        def Send(self, buf, dest, tag=0):
            self.sent.append((self.steps, dest, np.array(buf, copy=True)))
            self.blocking_sends += 1
            return super().Send(buf, dest, tag)

        def Isend(self, buf, dest, tag=0):
            self.sent.append((self.steps, dest, np.array(buf, copy=True)))
            return super().Isend(buf, dest, tag)

        def Sendrecv(self, sendbuf, dest, *args, **kwargs):
            self.sent.append((self.steps, dest, np.array(sendbuf, copy=True)))
            return super().Sendrecv(sendbuf, dest, *args, **kwargs)

    return Recording(comm)


def _mpi_total(comm, mine):
    """The reference answer: MPI's own Allreduce (sum) of this rank's array."""
    total = np.empty_like(mine)
    comm.Allreduce(mine, total)
    return total


def _show(values, limit=4):
    values = np.asarray(values).ravel()
    shown = ", ".join(f"{v:g}" for v in values[:limit])
    return f"[{shown}{', ...' if values.size > limit else ''}] ({values.size} values)"


BLOCKING_SEND = ("used a blocking comm.Send: when every rank sends before it receives, a message too large "
                 "for MPI to buffer deadlocks the ring (chapter 03, 'A ring with blocking Send then Recv'); "
                 "exchange with comm.Sendrecv instead")


def _first_wrong_message(sent, expected):
    """Compare the messages a rank sent with the (dest, data, what) it should have sent, step by step."""
    for step, (want_dest, want, what) in enumerate(expected):
        if step >= len(sent):
            return f"step {step}: sent nothing; expected to send {what} to rank {want_dest}"
        _, dest, data = sent[step]
        right_data = data.shape == want.shape and np.array_equal(data, want)
        if right_data and dest != want_dest:
            return f"step {step}: sent the right data ({what}) to rank {dest}, but it should go to rank {want_dest}"
        if not right_data:
            return (f"step {step}: sent {_show(data)} to rank {dest}; expected {what} = {_show(want)} "
                    f"to rank {want_dest}")
    return None


def _run_trials(comm, learner, one_trial):
    """one_trial(comm, learner, xs) for each length in RING_LENGTHS (xs: every rank's array); the
    problems found, each prefixed with its length. All ranks stop after the first trial with one."""
    problems = []
    for trial, length in enumerate(RING_LENGTHS):
        problem = one_trial(comm, learner, _integer_inputs(trial, comm.size, length))
        if problem:
            problems.append(f"length {length}: {problem}")
        if _anyone(comm, problems):
            break
    return problems


def _wrong_values(what, got, want, sent, expected_messages, hint):
    """Explain a wrong result: the first wrong element, then the first wrong message (or the hint)."""
    i = int(np.flatnonzero(~(got == want))[0])
    why = _first_wrong_message(sent, expected_messages)
    return (f"{what} element {i} is {got[i]:g}, expected {want[i]:g} (MPI.Allreduce). "
            + (f"First wrong message: {why}" if why else f"Every message was right: {hint}"))


NOT_IN_PLACE = ("replaced entries of the list `chunks` instead of changing them in place, so the buffer they "
                "are views of never changed: write into the chunk (`chunk += incoming`, or receive straight into "
                "it), do not assign `chunks[i] = ...`")


def _still_views(chunks, buffer):
    """Are the learner's chunks still the views of `buffer` they were given?"""
    return all(c.size == 0 or np.shares_memory(c, buffer) for c in chunks)


def _call_on_chunks(comm, ring_phase, buffer, prepare=None):
    """Run a learner's ring phase on chunks that are views of `buffer` (after prepare(chunks), if
    given), through a recording comm. Returns (recording, the chunks of buffer afterwards, problem):
    problem says why the call itself is wrong (it raised, used a blocking Send, or rebound chunks)."""
    chunks = np.array_split(buffer, comm.size)
    if prepare:
        prepare(chunks)
    recording = _recording(comm)
    _, error = _call(ring_phase, recording, chunks)
    problem = (f"your function {error}" if error else BLOCKING_SEND if recording.blocking_sends
               else None if _still_views(chunks, buffer) else NOT_IN_PLACE)
    return recording, np.array_split(buffer, comm.size), problem


def _reduce_scatter_trial(comm, reduce_scatter, xs):
    p, r = comm.size, comm.rank
    total = np.array_split(_mpi_total(comm, xs[r].copy()), p)
    recording, chunks, problem = _call_on_chunks(comm, reduce_scatter, xs[r].copy())
    mine = (r + 1) % p
    if problem:
        return problem
    if np.array_equal(chunks[mine], total[mine]):
        return None
    expected_messages = []
    for step in range(p - 1):
        c = (r - step) % p
        contributors = sorted((r - k) % p for k in range(step + 1))
        want = np.array_split(xs[contributors].sum(axis=0), p)[c]
        expected_messages.append(((r + 1) % p, want, f"chunk {c} summed over ranks {contributors}"))
    return _wrong_values(f"chunks[{mine}] should end as the sum over all ranks, but its", chunks[mine], total[mine],
                         recording.sent, expected_messages, "add what arrives into the chunk it belongs to.")


def check_ring_reduce_scatter(reduce_scatter, view=None, n=4, timeout=30):
    """reduce_scatter(comm, chunks) must leave chunks[(rank + 1) % p] summed over all ranks."""
    __tracebackhide__ = True
    reports = run_on_ranks(_run_trials, reduce_scatter, _reduce_scatter_trial, view=view, n=n, timeout=timeout)
    _report("check_ring_reduce_scatter", reports)


def _allgather_trial(comm, allgather, xs):
    p, r = comm.size, comm.rank
    total = np.array_split(_mpi_total(comm, xs[r].copy()), p)

    def as_the_reduce_scatter_left_it(chunks):  # only chunk (r + 1) % p is complete, the rest garbage
        chunks[(r + 1) % p][:] = total[(r + 1) % p]

    recording, chunks, problem = _call_on_chunks(comm, allgather, np.full(xs.shape[1], np.nan),
                                                 as_the_reduce_scatter_left_it)
    if problem:
        return problem
    wrong = [c for c in range(p) if not np.array_equal(chunks[c], total[c])]
    if not wrong:
        return None
    expected_messages = [((r + 1) % p, total[(r + 1 - step) % p], f"the complete chunk {(r + 1 - step) % p}")
                         for step in range(p - 1)]
    return _wrong_values(f"chunks[{wrong[0]}]", chunks[wrong[0]], total[wrong[0]], recording.sent,
                         expected_messages, "receive each one into the chunk it belongs to.")


def check_ring_allgather(allgather, view=None, n=4, timeout=30):
    """allgather(comm, chunks), starting with only chunks[(rank + 1) % p] complete, must complete them all."""
    __tracebackhide__ = True
    reports = run_on_ranks(_run_trials, allgather, _allgather_trial, view=view, n=n, timeout=timeout)
    _report("check_ring_allgather", reports)


def _recursive_doubling_trial(comm, recursive_doubling, xs):
    p, r = comm.size, comm.rank
    total = _mpi_total(comm, xs[r].copy())
    mine = xs[r].copy()
    recording = _recording(comm)
    got, error = _call(recursive_doubling, recording, mine)
    if error:
        return f"your function {error}"
    if recording.blocking_sends:
        return BLOCKING_SEND
    if not np.array_equal(mine, xs[r]):
        return "your function changed its input array; work on a copy"
    if not isinstance(got, np.ndarray) or got.shape != total.shape:
        return f"returned {type(got).__name__} of shape {np.shape(got)}, expected an array of shape {total.shape}"
    if np.array_equal(got, total):
        return None
    expected_messages = []
    for step in range(p.bit_length() - 1):
        group = [k for k in range(p) if k >> step == r >> step]  # the ranks summed before this step
        expected_messages.append((r ^ (1 << step), xs[group].sum(axis=0), f"the sum over ranks {group}"))
    return _wrong_values("the result's", got, total, recording.sent, expected_messages,
                         "add what you receive into your running sum.")


def _power_of_two_trials(comm, recursive_doubling, one_trial):
    if comm.size & (comm.size - 1):
        return [f"this check needs a power-of-two number of ranks, not {comm.size}"]
    return _run_trials(comm, recursive_doubling, one_trial)


def check_recursive_doubling(recursive_doubling, view=None, n=4, timeout=30):
    """recursive_doubling(comm, x) must return the sum of all ranks' x (p a power of two), x unchanged."""
    __tracebackhide__ = True
    reports = run_on_ranks(_power_of_two_trials, recursive_doubling, _recursive_doubling_trial,
                           view=view, n=n, timeout=timeout)
    _report("check_recursive_doubling", reports)


# ---------------------------------------------------------------- chapter 02: the parameter server's rules

@contextlib.contextmanager
def _in_place_of(module, name, replacement):
    """Run the library with the learner's function in place of module.name, then put the original back."""
    original = getattr(module, name)
    setattr(module, name, replacement)
    try:
        yield
    finally:
        setattr(module, name, original)


def _least_squares(n_workers, dim=4, samples=12):
    """A seeded least-squares problem split over the workers: (grad_fn, initial params)."""
    rng = np.random.default_rng(2024)
    X, y = rng.normal(size=(n_workers * samples, dim)), rng.normal(size=n_workers * samples)
    parts = np.array_split(np.arange(len(y)), n_workers)

    def grad_fn(params, worker, step):
        rows = parts[worker]
        return {"w": X[rows].T @ (X[rows] @ params["w"] - y[rows]) / len(rows)}

    return grad_fn, {"w": np.zeros(dim)}


def _sequential_reference(grad_fn, params, n_workers, steps, lr, optimizer="sgd", momentum=0.9):
    """What BSP must give: params -= lr * mean_w grad (with momentum, through the velocity), step by step."""
    w, velocity = params["w"].copy(), np.zeros_like(params["w"])
    for step in range(steps):
        mean = sum(grad_fn({"w": w}, worker, step)["w"] for worker in range(n_workers)) / n_workers
        if optimizer == "momentum":
            velocity = momentum * velocity + mean
            mean = velocity
        w = w - lr * mean
    return w


def _run_with(comm, module_name, learner, **run_args):
    """A real run_parameter_server with the learner's function in place; (result, problem or None)."""
    from . import parameter_server

    n_workers = comm.size - run_args.get("n_servers", 1)
    grad_fn, params = _least_squares(n_workers)
    try:
        with _in_place_of(parameter_server, module_name, learner):
            result = parameter_server.run_parameter_server(comm, params, grad_fn, **run_args)
    except Exception as exc:
        return None, f"the parameter server, run with your function, failed: {type(exc).__name__}: {exc}"
    return result, None


def _compare_with_reference(comm, result, **run_args):
    """Problem text if a BSP run's final parameters differ from the sequential reference, else None."""
    n_workers = comm.size - run_args.get("n_servers", 1)
    grad_fn, params = _least_squares(n_workers)
    expected = _sequential_reference(grad_fn, params, n_workers, run_args["steps"], run_args["lr"],
                                     run_args.get("optimizer", "sgd"))
    got = result.params["w"]
    if got.shape != expected.shape or not np.allclose(got, expected, rtol=1e-12, atol=1e-14):
        i = int(np.argmax(np.abs(got - expected))) if got.shape == expected.shape else 0
        return (f"a real BSP run ({n_workers} workers, {run_args.get('n_servers', 1)} servers, {run_args['steps']} "
                f"steps) with your function ended with w = {_show(got)}, expected w = {_show(expected)} "
                f"(element {i} differs most)")
    return None


def _bsp_run_problems(comm, module_name, learner, **run_args):
    """A real BSP run with the learner's function in place, against the sequential reference."""
    result, problem = _run_with(comm, module_name, learner, **run_args)
    problem = problem or _compare_with_reference(comm, result, **run_args)
    return [problem] if problem else []


def _ssp_rule_on_rank(comm, may_read):
    problems = []
    # the rule itself, on every case a server can meet (the clock never passes the step), on every rank
    for staleness in (0, 1, 3):
        for step in range(7):
            for clock in range(step + 1):
                got, error = _call(may_read, step, clock, staleness)
                want = clock >= step - staleness
                if error:
                    problems.append(f"may_read(step={step}, clock={clock}, staleness={staleness}) {error}")
                elif bool(got) != want:
                    missing = step - clock
                    why = (f"the worker would miss the updates of {missing} step(s) before step {step}, "
                           f"more than staleness={staleness} allows" if not want else
                           f"it misses the updates of {missing} step(s), within staleness={staleness}: "
                           f"blocking it here only wastes time (and with staleness=0 deadlocks BSP)")
                    problems.append(f"may_read(step={step}, clock={clock}, staleness={staleness}) returned "
                                    f"{got!r}, expected {want}: {why}")
                if problems:
                    break
            if problems:
                break
        if problems:
            break
    if _anyone(comm, problems):
        return problems
    # the rule inside a real SSP run, with worker 0 slower than the others
    result, problem = _run_with(comm, "may_read", may_read, steps=6, lr=0.05, mode="ssp", staleness=1,
                                n_servers=1)
    if problem:
        return [problem]
    for row in result.history:
        if row["staleness"] > 1:
            return [f"worker {row['worker']}, step {row['step']}: computed on parameters with clock "
                    f"{row['read_clock']}, {row['staleness']} steps stale (staleness=1)"]
    return []


def check_ssp_rule(may_read, view=None, n=4, timeout=60):
    """may_read(step, clock, staleness) must be SSP's admission rule, in a table and in a real SSP run."""
    __tracebackhide__ = True
    reports = run_on_ranks(_ssp_rule_on_rank, may_read, view=view, n=n, timeout=timeout)
    _report("check_ssp_rule", reports)


def _momentum_on_rank(comm, momentum_update):
    problems = []
    rng = np.random.default_rng(20 + comm.rank)
    param, velocity = rng.normal(size=5), 0.1 * rng.normal(size=5)  # a velocity that is not 0 yet
    want_param, want_velocity = param.copy(), velocity.copy()
    for step in range(4):
        grad = rng.normal(size=5)
        want_velocity = 0.9 * want_velocity + grad
        want_param = want_param - 0.1 * want_velocity
        before = {"param": param.copy(), "velocity": velocity.copy()}
        returned, error = _call(momentum_update, param, velocity, grad.copy(), 0.1, 0.9)
        unchanged = [name for name, array in (("velocity", velocity), ("param", param))
                     if np.array_equal(array, before[name])]
        if error:
            problems.append(f"step {step}: your function {error}")
        elif unchanged:
            problems.append(f"step {step}: {' and '.join(unchanged)} {'is' if len(unchanged) == 1 else 'are'} unchanged "
                            f"after your call" + (" (and your function returned a value)" if returned is not None else "")
                            + f": update param and velocity in place (`velocity *= ...`, `param -= ...`); "
                            f"`{unchanged[0]} = ...` only rebinds a local name, and the server keeps using its arrays")
        elif not np.allclose(velocity, want_velocity, rtol=1e-12):
            i = int(np.argmax(np.abs(velocity - want_velocity)))
            problems.append(f"step {step}: velocity[{i}] is {velocity[i]:.6g}, expected {want_velocity[i]:.6g} "
                            f"(= 0.9 * previous velocity + grad)")
        elif not np.allclose(param, want_param, rtol=1e-12):
            i = int(np.argmax(np.abs(param - want_param)))
            problems.append(f"step {step}: param[{i}] is {param[i]:.6g}, expected {want_param[i]:.6g} "
                            f"(= previous param - lr * new velocity)")
        if problems:
            break
    if _anyone(comm, problems):
        return problems
    return _bsp_run_problems(comm, "momentum_update", momentum_update, steps=5, lr=0.05, mode="bsp",
                             optimizer="momentum", n_servers=1)


def check_momentum(momentum_update, view=None, n=4, timeout=60):
    """momentum_update(param, velocity, grad, lr, momentum) must apply heavy-ball momentum in place."""
    __tracebackhide__ = True
    reports = run_on_ranks(_momentum_on_rank, momentum_update, view=view, n=n, timeout=timeout)
    _report("check_momentum", reports)


def _shard_problem(shard, n, servers):
    """What is wrong with shard(np.arange(n), servers), or None."""
    flat = np.arange(float(n))
    got, error = _call(shard, flat, servers)
    call = f"shard(np.arange({n}), {servers})"
    if error:
        return f"{call}: your function {error}"
    if not isinstance(got, (list, tuple)) or len(got) != servers:
        return f"{call} returned {type(got).__name__} of length {len(got) if hasattr(got, '__len__') else '?'}, " \
               f"expected a list of {servers} arrays, one per server"
    sizes = [np.size(piece) for piece in got]
    values = np.concatenate([np.ravel(piece) for piece in got]) if got else np.zeros(0)
    counts = np.bincount(values.astype(int), minlength=n) if values.size else np.zeros(n, int)
    if values.size > n or (counts > 1).any():
        twice = int(np.flatnonzero(counts > 1)[0]) if (counts > 1).any() else None
        return (f"{call} gave slices of sizes {sizes}, {values.size} elements in all for {n}: the slices overlap"
                + (f" (element {twice} is on more than one server)" if twice is not None else ""))
    if values.size < n:
        lost = int(np.flatnonzero(counts == 0)[0])
        return f"{call} gave slices of sizes {sizes}: element {lost} is on no server"
    if not np.array_equal(values, flat):
        return f"{call} covers every element once but out of order: the slices must be contiguous, in server order"
    expected = [len(piece) for piece in np.array_split(flat, servers)]
    if sizes != expected:
        return (f"{call} gave slices of sizes {sizes}, expected {expected}: the first len(flat) % n_servers "
                f"slices get one element more, so that every rank computes the same slices")
    return None


def _shard_on_rank(comm, shard):
    problems = []
    # on every rank, as the parameter server calls it on every rank
    for n in (10, 7, 3, 0, 13):
        for servers in (1, 2, 3, 4):
            problem = _shard_problem(shard, n, servers)
            if problem:
                problems.append(problem)
                break
        if problems:
            break
    if _anyone(comm, problems):
        return problems
    return _bsp_run_problems(comm, "shard", shard, steps=4, lr=0.05, mode="bsp",
                             n_servers=2 if comm.size >= 3 else 1)


def check_shard(shard, view=None, n=4, timeout=60):
    """shard(flat, n_servers) must cut flat into n_servers contiguous, balanced, non-overlapping slices."""
    __tracebackhide__ = True
    reports = run_on_ranks(_shard_on_rank, shard, view=view, n=n, timeout=timeout)
    _report("check_shard", reports)


# ---------------------------------------------------------------- chapter 04: scatter, sampler, ring

SCATTER_TRIALS = ((10, 3), (13, 2), (3, 4), (1000, 8))  # (rows, columns): 13 and 3 leave some ranks a row short
BROADCASTS = ("Bcast", "bcast", "Allgather", "allgather")


class _WatchingComm(_CountingComm):
    """A _CountingComm that also adds up the bytes each rank receives through broadcasts."""

    def __init__(self, comm):
        super().__init__(comm)
        self.broadcast_bytes = 0

    def __getattr__(self, name):
        attribute = super().__getattr__(name)
        if name not in BROADCASTS:
            return attribute

        def watched(*args, **kwargs):
            result = attribute(*args, **kwargs)
            received = args[0] if name[0].isupper() else result  # Bcast fills its buffer; bcast returns the object
            received = received[0] if isinstance(received, (list, tuple)) and name[0].isupper() else received
            self.broadcast_bytes += np.asarray(received).nbytes if np.asarray(received).dtype != object else 0
            return result
        return watched


_scatter_calls = [0]  # how many times this process ran the check: each run gets data of its own


def _scatter_rows_on_rank(comm, scatter_rows):
    from .data import block_range

    problems = []
    _scatter_calls[0] += 1
    for trial, (n, d) in enumerate(SCATTER_TRIALS):
        # data that differs from any earlier run's, so rows left over in reused memory cannot pass
        full = np.random.default_rng([4000 + trial, _scatter_calls[0]]).normal(size=(n, d))
        block = block_range(n, comm.size, comm.rank)
        expected = full[block.start:block.stop]
        watching = _WatchingComm(comm)
        got, error = _call(scatter_rows, watching, full.copy() if comm.rank == 0 else None, n, d)
        called = comm.allgather("Scatterv" in watching.collectives)  # (on comm itself, not through the learner's)
        call = f"trial {trial} ({n} rows of {d} on {comm.size} ranks)"
        if error:
            problems.append(f"{call}: your function {error}")
        elif comm.rank != 0 and watching.broadcast_bytes >= full.nbytes:
            problems.append(f"{call}: this rank received {watching.broadcast_bytes} bytes through "
                            f"{', '.join(n for n in watching.collectives if n in BROADCASTS)}: all {n} rows "
                            f"({full.nbytes} bytes), to keep {len(block)}; a scatter sends each rank only its own "
                            f"rows, with comm.Scatterv")
        elif "Scatterv" not in watching.collectives:
            others = [r for r, did in enumerate(called) if did]
            problems.append(f"{call}: your function made the collective calls {watching.collectives or 'none'} on "
                            f"this rank; every rank must call comm.Scatterv (rank 0 with the data, the others "
                            f"with None)" + (f". Ranks {others} did call it, which leaves their messages unreceived: "
                                             f"restart the cluster before you try again" if others else ""))
        elif not isinstance(got, np.ndarray) or got.shape != expected.shape:
            problems.append(f"{call}: returned {type(got).__name__} of shape {getattr(got, 'shape', '?')}, expected "
                            f"this rank's rows {block.start}..{block.stop - 1}, shape {expected.shape}")
        elif not np.array_equal(got, expected):
            wrong = int(np.flatnonzero(got.ravel() != expected.ravel())[0])
            if wrong > 0:
                problems.append(f"{call}: the first {wrong} values of this rank's block are right, value {wrong} "
                                f"is not: check the counts, the number of elements (rows times d) each rank gets")
            else:
                found = [r for r in range(n) if np.array_equal(full[r], got[0])]
                problems.append(f"{call}: row 0 of this rank's block should be row {block.start} of the data, got "
                                + (f"row {found[0]}" if found else _show(got[0])) +
                                " (check the displacements: where each rank's block starts in the data, in elements)")
        if _anyone(comm, problems):
            break
    return problems


def check_scatter_rows(scatter_rows, view=None, n=4, timeout=30):
    """scatter_rows(comm, data, n, d) must give rank r rows block_range(n, size, r) of root 0's data."""
    __tracebackhide__ = True
    reports = run_on_ranks(_scatter_rows_on_rank, scatter_rows, view=view, n=n, timeout=timeout)
    _report("check_scatter_rows", reports)


SAMPLER_CASES = ((10, 0, 11), (10, 1, 11), (12, 2, 11), (7, 0, 11), (3, 1, 11), (10, 0, 12))
# (items, epoch, seed); 10, 7 and 3 need padding on 4 ranks. Seed 12, epoch 0 against seed 11, epoch 1:
# seeding with seed + epoch would make them the same.


def _epoch_problem(everyone, n, epoch, size):
    """What is wrong with every rank's indices for one epoch (a list by rank), or None."""
    per_rank = -(-n // size)
    for rank, got in enumerate(everyone):
        if len(got) != per_rank:
            return (f"epoch {epoch}, n={n}: rank {rank} got {len(got)} indices, expected {per_rank} = ceil(n / size) "
                    f"on every rank, so that all ranks run the same number of steps (pad by repeating)")
        bad = [i for i in got if not 0 <= i < n]
        if bad:
            return f"epoch {epoch}, n={n}: rank {rank} got index {bad[0]}, outside 0..{n - 1}"
    counts = np.bincount(np.concatenate(everyone).astype(int), minlength=n) if n else np.zeros(0, int)
    if (counts == 0).any():
        item = int(np.flatnonzero(counts == 0)[0])
        return f"epoch {epoch}, n={n}: item {item} is visited by no rank"
    extra = per_rank * size - n  # the padding: this many visits may repeat an item
    if int((counts - 1).sum()) > extra:
        item = int(np.flatnonzero(counts > 1)[0])
        ranks = [r for r, got in enumerate(everyone) if item in got]
        return (f"epoch {epoch}, n={n}: item {item} is visited by ranks {ranks}, more repeats than the {extra} "
                f"that padding needs: do all ranks cut the same permutation? Seed it with seed and epoch, not rank")
    return None


def _padding(everyone, n):
    """The items visited more than once in one epoch (what the padding repeats), sorted."""
    counts = np.bincount(np.concatenate(everyone).astype(int), minlength=n)
    return sorted(np.flatnonzero(counts > 1).tolist())


def _epoch_indices_on_rank(comm, epoch_indices):
    problems, seen = [], {}
    for n, epoch, seed in SAMPLER_CASES:
        case = f"epoch {epoch}, n={n}" + (f", seed={seed}" if seed != 11 else "")
        got, error = _call(epoch_indices, n, comm.size, comm.rank, epoch, seed)
        again, _ = _call(epoch_indices, n, comm.size, comm.rank, epoch, seed) if not error else (None, None)
        if error:
            problems.append(f"{case}: your function {error}")
        elif not np.array_equal(np.asarray(got), np.asarray(again)):
            problems.append(f"{case}: two calls gave different indices {_show(np.asarray(got))} and "
                            f"{_show(np.asarray(again))}: every rank must be able to compute the same permutation, "
                            f"so draw it from a generator seeded with (seed, epoch)")
        everyone = comm.allgather(None if problems else [int(i) for i in np.asarray(got).ravel()])
        if problems or None in everyone:
            break
        # every rank has every rank's indices now: each judges the whole layout (the same verdict everywhere)
        problems += filter(None, [_epoch_problem(everyone, n, epoch, comm.size)])
        seen[n, epoch, seed] = everyone
        if problems:
            break
    if problems:
        return problems
    order = {key: [i for part in everyone for i in part] for key, everyone in seen.items()}
    if order[10, 0, 11] == order[10, 1, 11]:
        return ["epochs 0 and 1 (n=10) visit the items in the same order on every rank: the permutation must "
                "change with the epoch, or every epoch repeats the first one"]
    if order[10, 0, 11] == order[10, 0, 12]:
        return ["seeds 11 and 12 give the same order (n=10, epoch 0): the permutation must depend on the seed"]
    if order[10, 0, 12] == order[10, 1, 11]:
        return ["seed 12, epoch 0 gives the same order as seed 11, epoch 1 (n=10): seeding with seed + epoch makes "
                "runs with neighbouring seeds share epochs; seed the generator with the pair [seed, epoch]"]
    repeated = [_padding(seen[10, epoch, 11], 10) for epoch in (0, 1)]
    if repeated[0] and repeated[0] == repeated[1]:
        return [f"the padding repeats items {repeated[0]} in epochs 0 and 1 (n=10): pad with items of the epoch's "
                f"own shuffle (repeat its start), not fixed items, or those items are seen more often every epoch"]
    return []


def check_epoch_indices(epoch_indices, view=None, n=4, timeout=30):
    """epoch_indices(n, size, rank, epoch, seed) must give the ranks disjoint, equal parts of one shuffle per epoch."""
    __tracebackhide__ = True
    reports = run_on_ranks(_epoch_indices_on_rank, epoch_indices, view=view, n=n, timeout=timeout)
    _report("check_epoch_indices", reports)


RING_CASES = (  # (points, key_hash, replicas, why the answer is what it is)
    ([(10, "a"), (20, "b"), (30, "c")], 15, 1, "the first point at or after 15 is 20"),
    ([(10, "a"), (20, "b"), (30, "c")], 20, 1, "a key exactly on a point belongs to that point"),
    ([(10, "a"), (20, "b"), (30, "c")], 35, 1, "past the last point the ring wraps around to the first"),
    ([(10, "a"), (20, "b"), (30, "c")], 25, 3, "going clockwise from 25: c, then a (wrapping), then b"),
    ([(10, "a"), (20, "a"), (30, "b"), (40, "c")], 5, 2, "a server with two points counts once"),
    ([(10, "a"), (20, "b"), (30, "a"), (40, "b")], 35, 2, "replicas stop at 2 distinct servers"),
)


def _ring_owners_on_rank(comm, ring_owners):
    from . import kvstore

    problems = []
    for points, key_hash, replicas, why in RING_CASES:  # on every rank, as every client asks the ring
        expected = kvstore.ring_owners(points, key_hash, replicas)
        got, error = _call(ring_owners, list(points), key_hash, replicas)
        call = f"ring_owners({points}, key_hash={key_hash}, replicas={replicas})"
        if error:
            problems.append(f"{call}: your function {error}")
        elif not isinstance(got, (list, tuple)) or list(got) != expected:
            problems.append(f"{call} returned {got!r}, expected {expected!r}: {why}")
        if problems:
            break
    if _anyone(comm, problems) or comm.size < 2:
        return problems
    # a real store with the learner's function in place: 60 keys on the servers, one server crashes
    n_servers = min(3, comm.size - 1)
    replicas = min(2, n_servers)
    ring = kvstore.HashRing(range(n_servers))
    expected = np.zeros(n_servers, dtype=int)
    for i in range(60):
        for server in kvstore.ring_owners(ring.points, kvstore.stable_hash(f"k{i}"), replicas):
            expected[server] += 1

    def client(store):
        if store.index == 0:
            for i in range(60):
                store.put(f"k{i}", np.full(2, float(i)))
            if replicas > 1:
                store.crash(n_servers - 1)
            for i in range(60):
                if not np.array_equal(store.get(f"k{i}"), np.full(2, float(i))):
                    return f"key 'k{i}' read back wrong after server {n_servers - 1} crashed"
        return None

    try:
        with _in_place_of(kvstore, "ring_owners", ring_owners):
            result = kvstore.run_kvstore(comm, client, n_servers=n_servers, replicas=replicas)
    except Exception as exc:
        return [f"a real store ({n_servers} servers, {replicas} replicas) with your function failed: "
                f"{type(exc).__name__}: {exc}"]
    if result.returns[0]:
        return [result.returns[0]]
    if result.keys_per_server != expected.tolist():
        return [f"a real store ({n_servers} servers, {replicas} replicas) with your function holds "
                f"{result.keys_per_server} keys per server, expected {expected.tolist()} from the ring"]
    return []


def check_ring_owners(ring_owners, view=None, n=4, timeout=60):
    """ring_owners(points, key_hash, replicas) must return the first `replicas` distinct servers clockwise."""
    __tracebackhide__ = True
    reports = run_on_ranks(_ring_owners_on_rank, ring_owners, view=view, n=n, timeout=timeout)
    _report("check_ring_owners", reports)


# ---------------------------------------------------------------- chapter 05: the task master's rules

def _tasks_run_with(comm, name, learner, **run_args):
    """A real run_tasks (40 tasks, task_fn = square) with the learner's function in place of
    scheduler.<name>; a problem text, or None if every result came back right."""
    from . import scheduler

    try:
        with _in_place_of(scheduler, name, learner):
            result = scheduler.run_tasks(comm, list(range(40)), _square, **run_args)
    except Exception as exc:
        return f"a real run_tasks({', '.join(f'{k}={v!r}' for k, v in run_args.items())}) with your function " \
               f"failed: {type(exc).__name__}: {exc}"
    wrong = [t for t, r in enumerate(result.results) if r != _square(t)]
    counted = sorted(row["task"] for row in result.trace)
    if wrong:
        return f"a real run_tasks with your function returned a wrong result for task {wrong[0]}"
    if counted != list(range(40)):
        return f"a real run_tasks with your function counted {len(counted)} results for 40 tasks"
    return None


def _square(task):
    return task * task


def _table_then_run(comm, learner, cases, describe, name, normalize=lambda got: got, **run_args):
    """Each rank tries the learner on the cases ((args, expected, why); describe(args) names the call),
    then all ranks run the scheduler with the learner's function in place of scheduler.<name>."""
    problems = []
    for args, expected, why in cases:
        got, error = _call(learner, *args)
        if error:
            problems.append(f"{describe(args)}: your function {error}")
        elif normalize(got) != expected:
            problems.append(f"{describe(args)} returned {normalize(got)!r}, expected {expected!r}: {why}")
        if problems:
            break
    if _anyone(comm, problems) or comm.size < 2:
        return problems
    problem = _tasks_run_with(comm, name, learner, **run_args)
    return [problem] if problem else []


GUIDED_CASES = (  # (remaining, workers, min_chunk), expected, why
    ((100, 4, 1), 25, "a quarter of the 100 left: ceil(100 / 4)"),
    ((10, 4, 1), 3, "ceil(10 / 4) = 3: round up, or the last tasks come one at a time"),
    ((6, 4, 2), 2, "ceil(6 / 4) = 2"),
    ((3, 4, 2), 2, "ceil(3 / 4) = 1 is below min_chunk = 2"),
    ((1, 4, 5), 1, "never more than remains: only 1 task is left"),
    ((0, 3, 1), 0, "nothing left: 0"),
)


def _guided_on_rank(comm, guided_chunk):
    return _table_then_run(comm, guided_chunk, GUIDED_CASES, lambda args: f"guided_chunk{args}", "guided_chunk",
                           schedule="guided", chunk=1)


def check_guided_chunk(guided_chunk, view=None, n=4, timeout=60):
    """guided_chunk(remaining, workers, min_chunk) must be max(min_chunk, ceil(remaining / workers)), capped
    at remaining."""
    __tracebackhide__ = True
    reports = run_on_ranks(_guided_on_rank, guided_chunk, view=view, n=n, timeout=timeout)
    _report("check_guided_chunk", reports)


LEASES = {0: (1, [3, 4], 10.0), 1: (2, [5], 20.0), 2: (3, [6], None), 3: (1, [7], 12.5)}
EXPIRY_CASES = (
    (5.0, [], "no deadline has passed at time 5"),
    (10.0, [0], "a deadline equal to now has passed (deadline <= now)"),
    (15.0, [0, 3], "leases 0 (deadline 10) and 3 (12.5) have passed"),
    (1e9, [0, 1, 3], "lease 2 has no deadline (None): it never expires"),
)


def _expiry_on_rank(comm, expired_leases):
    cases = [((dict(LEASES), now), expected, why) for now, expected, why in EXPIRY_CASES]
    return _table_then_run(comm, expired_leases, cases, lambda args: f"expired_leases(leases={LEASES}, now={args[1]})",
                           "expired_leases", normalize=lambda got: sorted(got) if isinstance(got, (list, tuple, set))
                           else got, schedule="dynamic", chunk=2, lease=0.2, die={0: 3} if comm.size > 2 else None)


def check_expired_leases(expired_leases, view=None, n=4, timeout=60):
    """expired_leases(leases, now) must list the leases whose deadline is not None and <= now."""
    __tracebackhide__ = True
    reports = run_on_ranks(_expiry_on_rank, expired_leases, view=view, n=n, timeout=timeout)
    _report("check_expired_leases", reports)


def _record_on_rank(comm, record_result):
    problems = []
    done = {}
    for step, (task, result, expected_return, expected_done, why) in enumerate((
            (3, "first", True, {3: "first"}, "task 3 had no result: store it and return True"),
            (4, 0, True, {3: "first", 4: 0}, "a result of 0 is a result too"),
            (3, "second", False, {3: "first", 4: 0}, "task 3 has a result already: keep the first, return False"))):
        got, error = _call(record_result, done, task, result)
        call = f"call {step + 1}, record_result(done, {task}, {result!r})"
        if error:
            problems.append(f"{call}: your function {error}")
        elif got != expected_return:
            problems.append(f"{call} returned {got!r}, expected {expected_return}: {why}")
        elif done != expected_done:
            problems.append(f"{call} left done = {done}, expected {expected_done}: {why}")
        if problems:
            break
    if _anyone(comm, problems) or comm.size < 2:
        return problems
    # a lease much shorter than a task: tasks run twice, and each result must count once
    problem = _tasks_run_with(comm, "record_result", record_result, schedule="dynamic", chunk=8, lease=1e-4)
    return [problem] if problem else []


def check_record_result(record_result, view=None, n=4, timeout=60):
    """record_result(done, task, result) must keep the first result of each task and say whether it was new."""
    __tracebackhide__ = True
    reports = run_on_ranks(_record_on_rank, record_result, view=view, n=n, timeout=timeout)
    _report("check_record_result", reports)
