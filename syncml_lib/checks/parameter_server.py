"""Chapter 02's exercises: SSP's admission rule, the momentum update, cutting parameters into shards.

Each check tries the learner's function on its own first, then puts it in place of the library's
(parameter_server.may_read, .momentum_update, .shard) and runs a real parameter server with it.
"""
import time

import numpy as np

from .harness import _anyone, _call, _in_place_of, _is_bool, _show, _table, _wrong_type, exercise_check

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


def _run_with(comm, module_name, learner, slow_worker_seconds=0.0, **run_args):
    """A real run_parameter_server with the learner's function in place; (result, problem or None).
    Worker 0 sleeps slow_worker_seconds in each step's gradient, so the others can run ahead of it."""
    from .. import parameter_server

    n_workers = comm.size - run_args.get("n_servers", 1)
    grad_fn, params = _least_squares(n_workers)

    def slowed(params, worker, step):
        if worker == 0:
            time.sleep(slow_worker_seconds)
        return grad_fn(params, worker, step)

    try:
        with _in_place_of(parameter_server, module_name, learner):
            result = parameter_server.run_parameter_server(comm, params, slowed, **run_args)
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


SSP_CASES = [(step, clock, staleness) for staleness in (0, 1, 3) for step in range(7) for clock in range(step + 1)]
SSP_RUN = dict(steps=6, lr=0.05, mode="ssp", staleness=1, n_servers=1)
SLOW_STEP = 0.1  # seconds worker 0 sleeps in each step of the real SSP run: the others' steps take ~1 ms


def _why(step, clock, staleness):
    """Why may_read(step, clock, staleness) is what it is."""
    missing = step - clock
    if clock < step - staleness:
        return (f"the worker would miss the updates of {missing} step(s) before step {step}, more than "
                f"staleness={staleness} allows")
    return (f"it misses the updates of {missing} step(s), within staleness={staleness}: blocking it here only "
            f"wastes time (and with staleness=0 deadlocks BSP)")


def _judge_rule(args, got, want, why):
    return (_wrong_type(got, _is_bool, "return True or False")
            or (None if got == want else f"returned {got!r}, expected {want}: {why}"))


def _ssp_rule_on_rank(comm, may_read):
    # the rule itself, on every case a server can meet (the clock never passes the step), on every rank
    cases = [(case, case[1] >= case[0] - case[2], _why(*case)) for case in SSP_CASES]
    problems = _table(may_read, cases, lambda i, args: "may_read(step={}, clock={}, staleness={})".format(*args),
                      _judge_rule)
    if _anyone(comm, problems):
        return problems
    # the rule inside a real SSP run in which worker 0 really is slow: the others must run ahead of it
    # by exactly the staleness bound, never more
    result, problem = _run_with(comm, "may_read", may_read, slow_worker_seconds=SLOW_STEP, **SSP_RUN)
    if problem:
        return [problem]
    bound = SSP_RUN["staleness"]
    for row in result.history:
        if row["staleness"] > bound:
            return [f"a real SSP run (staleness={bound}, worker 0 slow): worker {row['worker']}, step {row['step']}: "
                    f"computed on parameters with clock {row['read_clock']}, {row['staleness']} steps stale "
                    f"(staleness={bound})"]
    ahead = max((row["staleness"] for row in result.history if row["worker"] != 0), default=bound)
    if ahead < bound:
        return [f"a real SSP run (staleness={bound}): worker 0 was slow ({SLOW_STEP * 1000:.0f} ms a step), yet no "
                f"other worker ever read parameters {bound} step stale: SSP lets them run {bound} step ahead of the "
                f"slowest, and your rule held them back as BSP would"]
    return []


@exercise_check(_ssp_rule_on_rank)
def check_ssp_rule(may_read):
    """may_read(step, clock, staleness) must be SSP's admission rule: in a table, and in a real SSP run with a
    slow worker, where the others run ahead of it by the staleness bound and no further."""


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


@exercise_check(_momentum_on_rank)
def check_momentum(momentum_update):
    """momentum_update(param, velocity, grad, lr, momentum) must apply heavy-ball momentum in place."""


def _call_without_array_split(shard, flat, servers):
    """_call(shard, flat, servers) with np.array_split watched: (result, error, whether it was called)."""
    array_split, used = np.array_split, []

    def watched(*args, **kwargs):
        used.append(True)
        return array_split(*args, **kwargs)

    with _in_place_of(np, "array_split", watched):
        got, error = _call(shard, flat, servers)
    return got, error, bool(used)


def _shard_problem(shard, n, servers):
    """What is wrong with shard(np.arange(n), servers), or None."""
    flat = np.arange(float(n))
    got, error, used_array_split = _call_without_array_split(shard, flat, servers)
    call = f"shard(np.arange({n}), {servers})"
    if error:
        return f"{call}: your function {error}"
    if used_array_split:
        return (f"{call} called np.array_split: the exercise asks you to cut the slices yourself, with slicing "
                f"(np.array_split is what the library uses, and what your answer is compared with)")
    if not isinstance(got, (list, tuple)) or len(got) != servers:
        return f"{call} returned {type(got).__name__} of length {len(got) if hasattr(got, '__len__') else '?'}, " \
               f"expected a list of {servers} arrays, one per server"
    not_arrays = [s for s, piece in enumerate(got) if not isinstance(piece, np.ndarray)]
    if not_arrays:
        return (f"{call} returned slice {not_arrays[0]} as a {type(got[not_arrays[0]]).__name__}: return numpy "
                f"arrays (slices of flat)")
    sizes = [piece.size for piece in got]
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


SHARD_CASES = [(n, servers) for n in (10, 7, 3, 0, 13) for servers in (1, 2, 3, 4)]


def _shard_on_rank(comm, shard):
    problems = []
    for n, servers in SHARD_CASES:  # on every rank, as the parameter server calls it on every rank
        problem = _shard_problem(shard, n, servers)
        if problem:
            problems = [problem]
            break
    if _anyone(comm, problems):
        return problems
    return _bsp_run_problems(comm, "shard", shard, steps=4, lr=0.05, mode="bsp",
                             n_servers=2 if comm.size >= 3 else 1)


@exercise_check(_shard_on_rank)
def check_shard(shard):
    """shard(flat, n_servers) must cut flat into n_servers contiguous, balanced, non-overlapping slices, by
    slicing (not np.array_split)."""
