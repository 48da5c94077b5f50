"""Chapter 06's exercises: the weighted gradient average, local SGD's parameter averaging, the buckets.

Each check tries the learner's function on its own first (seeded inputs, the answer computed from
every rank's data, the classic mistakes named), then puts it in place of the library's
(training.data_parallel.weighted_average, .local_sgd.average_parameters, .bucketing.assign_buckets)
and trains the digits MLP with it for real on every rank: one epoch in global batches of 61 examples,
which no rank count from 2 to 5 divides, so the shards are unequal. Inside the run each call of the
learner's function is compared with the library's on the same inputs, so a message names the first
wrong step, parameter and element on each rank; the run's final parameters must then equal the
reference run's (the single process; local SGD with the library's averaging; the un-bucketed run).
"""
import numpy as np

from .harness import (COLLECTIVES, _anyone, _call, _described, _in_place_of, _is_int, _show, _table,
                      exercise_check)

RUN = dict(epochs=1, batch_size=61, lr=0.2)  # 23 steps; 61 is prime: unequal shards on 2 to 5 ranks
SHAPES = {"W": (3, 2), "b": (2,)}  # the parameters of the checks' own trials (a run has W1, b1, W2, b2)
TRIALS = 3
STEP_RTOL, STEP_ATOL = 1e-9, 1e-12  # a call in a run against the library's answer (MPI sums in another order)


# ---------------------------------------------------------------- shared by the three checks

def _run_text(mechanism, model="mlp", **options):
    args = ", ".join(f"{name}={value!r}" for name, value in {"model": model, **options, **RUN}.items())
    return f"a real train(comm, {mechanism!r}, {args})"


def _element(name, index):
    return f"{name}[{', '.join(map(str, index))}]" if index else name


def _worst(got, expected):
    """(element, got value, expected value, difference) where two dicts of same-shaped arrays differ most."""
    worst = ("", 0.0, 0.0, -1.0)
    for name, want in expected.items():
        difference = np.abs(np.asarray(got[name], dtype=float) - want)
        if difference.size and difference.max() > worst[3]:
            index = np.unravel_index(np.argmax(difference), difference.shape)
            worst = (_element(name, tuple(map(int, index))), float(np.asarray(got[name])[index]), float(want[index]),
                     float(difference.max()))
    return worst


def _malformed(got, like, what):
    """What is wrong with the form of got (a dict name -> array shaped like `like`'s), or None."""
    if not isinstance(got, dict):
        return (f"returned {'None' if got is None else 'a ' + type(got).__name__}: return a dict name -> array, "
                f"with the names of {what}")
    if sorted(got) != sorted(like):
        return f"returned a dict with the names {sorted(got)}, expected those of {what}, {sorted(like)}"
    for name, value in like.items():
        if not isinstance(got[name], np.ndarray):
            return f"returned {name} as a {type(got[name]).__name__}: return numpy arrays"
        if got[name].shape != np.shape(value):
            return (f"returned {name} of shape {got[name].shape}, expected the shape of {what}[{name!r}], "
                    f"{np.shape(value)}")
        if not np.issubdtype(got[name].dtype, np.floating) or not np.isfinite(got[name]).all():
            return f"returned {name} = {_show(got[name])}, of dtype {got[name].dtype}: expected finite floats"
    return None


def _changed(before, after, what):
    """A problem if the learner changed the caller's arrays in place, else None."""
    changed = [name for name, value in before.items() if not np.array_equal(value, after[name])]
    if changed:
        return (f"your function changed {what}[{changed[0]!r}] in place: leave the caller's arrays as they are "
                f"and return new ones (`x * n` makes a new array, `x *= n` changes x)")
    return None


def _diagnosis(got, expected, candidates):
    """Why got differs from expected: the text of the first candidate (a known wrong answer) it equals."""
    for wrong, why in candidates:
        if all(np.allclose(got[name], wrong[name], rtol=1e-10, atol=1e-13) for name in expected):
            return why
    return None


def _alone_problem(got, expected, candidates):
    """'W[1, 0] is 0.3, expected 0.25: why' for a well-formed result that differs, else None."""
    if all(np.allclose(got[name], want, rtol=1e-12, atol=1e-13) for name, want in expected.items()):
        return None
    element, value, want, _ = _worst(got, expected)
    why = _diagnosis(got, expected, candidates)
    return f"{element} is {value:.6g}, expected {want:.6g}" + (f": {why}" if why else "")


class _Watched:
    """The learner's function as the trainer calls it inside a real run. Each call first computes the
    library's answer on the same inputs (the same collectives on every rank), then the learner's, and
    notes the first call whose answer differs. The trainer goes on with the learner's answer when it is
    a well-formed dict of finite arrays, else with the library's, so that no rank stops alone."""

    def __init__(self, learner, library, what, step_of_call, explain):
        self.learner, self.library, self.what = learner, library, what
        self.step_of_call, self.explain = step_of_call, explain  # call number -> step; (comm, args) -> text
        self.calls, self.problem = 0, None

    def __call__(self, comm, arrays, *args, algorithm="ring"):
        expected = self.library(comm, arrays, *args, algorithm=algorithm)
        got, error = _call(self.learner, comm, arrays, *args)
        step, self.calls = self.step_of_call(self.calls), self.calls + 1
        malformed = None if error else _malformed(got, arrays, self.what)
        problem = f"your function {error}" if error else malformed
        if problem is None:
            if not all(np.allclose(got[name], expected[name], rtol=STEP_RTOL, atol=STEP_ATOL) for name in expected):
                element, value, want, _ = _worst(got, expected)
                problem = (f"your function returned {element} = {value:.6g}, expected {want:.6g} "
                           f"({self.explain(comm, args)})")
        if problem and self.problem is None:
            self.problem = f"step {step}: {problem}"
        return expected if error or malformed else got


def _trained(comm, module, name, replacement, mechanism, model="mlp", **options):
    """(result, problem): a real train(comm, mechanism) with replacement in place of module.name."""
    from .. import training

    try:
        with _in_place_of(module, name, replacement):
            return training.train(comm, mechanism, model=model, **RUN, **options), None
    except Exception as exc:
        label = getattr(model, "name", model)
        return None, f"{_run_text(mechanism, label, **options)} with your function failed: {type(exc).__name__}: {exc}"


def _first_loss_difference(history, reference):
    """Which step's update first went wrong, from the losses (each step's loss is measured before its update)."""
    for row, want in zip(history, reference):
        if not np.isclose(row["loss"], want["loss"], rtol=1e-10, atol=0.0):
            return (f"the loss first differs at step {row['step']} ({row['loss']:.10g}, expected {want['loss']:.10g}), "
                    f"so the update of step {row['step'] - 1} went wrong")
    return "the losses agree at every step: the last update went wrong"


def _final_problem(run, result, reference, tolerance, reference_text):
    """A problem if the run's final parameters are more than tolerance from the reference run's, else None."""
    element, value, want, difference = _worst(result.params, reference.params)
    if difference <= tolerance:
        return None
    return (f"{run} with your function ended with {element} = {value:.10g} on this rank, expected {want:.10g} "
            f"({reference_text}), {difference:.2g} apart (allowed: {tolerance:g}); "
            f"{_first_loss_difference(result.history, reference.history)}")


def _run_problems(comm, module, name, watched, mechanism, reference, tolerance, reference_text, **options):
    """A real run with watched in place of module.name, against the reference run: [problem] or []."""
    run = _run_text(mechanism, **options)
    result, problem = _trained(comm, module, name, watched, mechanism, **options)
    if problem is None and watched.problem:
        problem = f"{run}, {watched.problem}"
    problem = problem or _final_problem(run, result, reference, tolerance, reference_text)
    return [problem] if problem else []


def _each_trial(comm, trial_problem):
    """[the first problem] of trial_problem(trial) (text or None) for trial 0, 1, ..., TRIALS - 1, or [];
    every rank stops after the same trial (then some ranks may return [])."""
    for trial in range(TRIALS):
        problem = trial_problem(trial)
        if _anyone(comm, [problem] if problem else []):
            return [problem] if problem else []
    return []


class _OwnComm:
    """The rank function body(comm, own, learner), where own, a duplicate of comm, carries the learner's
    collectives (and the runs that call them) and comm only the check's own. MPI matches collectives by
    their order alone: a rank that skips one of the learner's and goes on to the check's next one would be
    matched with the others' call (a wrong result, or a truncation error that aborts every rank); on
    separate communicators it waits for them instead, and the time limit says so. (A class, not a
    closure: it travels to the engines by reference.)"""

    def __init__(self, body):
        self.body = body

    def __call__(self, comm, learner):
        own = comm.Dup()
        problems = self.body(comm, own, learner)
        if not _anyone(comm, problems):
            own.Free()
        return problems


# ---------------------------------------------------------------- the weighted gradient average

def weighted_inputs(trial, size):
    """(examples by rank, per-example gradients by rank) of a trial: every rank a different count."""
    rng = np.random.default_rng(600 + trial)
    counts = [1 + (5 * rank + 3 * trial) % 7 for rank in range(size)]
    return counts, [{name: rng.normal(size=(n, *shape)) for name, shape in SHAPES.items()} for n in counts]


def _weighted_candidates(counts, means, rank):
    """The classic wrong answers, computed from every rank's mean gradient, with why each is wrong."""
    p, total = len(counts), sum(counts)
    summed = {name: sum(n * g[name] for n, g in zip(counts, means)) for name in SHAPES}
    fewest = int(np.argmin(counts))
    return [
        ({name: np.mean([g[name] for g in means], axis=0) for name in SHAPES},
         f"that is the mean of the ranks' means, which weights each rank equally: ranks with fewer examples count "
         f"too much (rank {fewest} has {counts[fewest]} of the {total} examples, yet counts for 1/{p}); weight each "
         f"rank's mean by its n_local: sum_r n_r g_r / sum_r n_r"),
        ({name: sum(g[name] for g in means) for name in SHAPES},
         f"that is the sum of the ranks' means, not divided: about p = {p} times the mean gradient, so the learning "
         f"rate is multiplied by p"),
        (summed, f"that is sum_r n_r g_r, not divided by the total count of examples N = {total}: the learning rate "
                 f"is multiplied by N"),
        ({name: summed[name] / p for name in SHAPES},
         f"that is sum_r n_r g_r divided by the number of ranks p = {p}; divide by the total count of examples "
         f"N = sum_r n_r = {total}"),
        (means[rank], "that is this rank's own mean gradient: the ranks must add up their weighted gradients "
                      "(comm.Allreduce) so that every rank gets the same average"),
    ]


def _holds_arrays(value):
    if isinstance(value, np.ndarray):
        return value.size > 1
    if isinstance(value, dict):
        value = list(value.values())
    return isinstance(value, (list, tuple)) and any(_holds_arrays(v) for v in value)


class _PickleWatch:
    """Forwards everything to comm; notes the pickle-based (lower-case) collectives given numpy arrays."""

    def __init__(self, comm):
        self._comm, self.pickled = comm, []

    def __getattr__(self, name):
        attribute = getattr(self._comm, name)
        if name not in COLLECTIVES or not name.islower():
            return attribute

        def watched(*args, **kwargs):
            if _holds_arrays(list(args) + list(kwargs.values())):
                self.pickled.append(name)
            return attribute(*args, **kwargs)
        return watched


def _pickled_problem(watch, small):
    """The one rule of both averaging exercises: arrays travel by the buffer-based calls. A problem if the
    learner's function sent arrays through a pickle-based (lower-case) collective of `watch`, else None."""
    if not watch.pickled:
        return None
    return (f"your function sent arrays through the pickle-based comm.{watch.pickled[0]}, which pickles and copies "
            f"every array: use the buffer-based comm.Allreduce(send, recv) for arrays, and keep lower-case calls for "
            f"small values{small}")


def _weighted_trial(own, weighted_average, trial):
    """The problem of the learner's weighted_average in one trial, or None."""
    counts, examples = weighted_inputs(trial, own.size)
    means = [{name: e[name].mean(axis=0) for name in SHAPES} for e in examples]
    grads = {name: g.copy() for name, g in means[own.rank].items()}
    expected = {name: np.concatenate([e[name] for e in examples]).mean(axis=0) for name in SHAPES}
    watch = _PickleWatch(own)
    got, error = _call(weighted_average, watch, grads, counts[own.rank])
    problem = (f"your function {error}" if error else
               _malformed(got, grads, "grads") or _changed(means[own.rank], grads, "grads")
               or _alone_problem(got, expected, _weighted_candidates(counts, means, own.rank)))
    problem = problem or _pickled_problem(watch, " such as n_local")
    return problem and f"trial {trial} (examples by rank {counts}): {problem}"


def _weighted_on_rank(comm, own, weighted_average):
    problems = _each_trial(comm, lambda trial: _weighted_trial(own, weighted_average, trial))
    if _anyone(comm, problems):
        return problems
    from ..training import data_parallel, train

    reference = train(None, "sequential", **RUN)
    watched = _Watched(weighted_average, data_parallel.weighted_average, "grads", lambda call: call,
                       lambda comm, args: f"the mean gradient over the global batch's {RUN['batch_size']} examples; "
                                          f"this rank had {args[0]} of them")
    return _run_problems(own, data_parallel, "weighted_average", watched, "allreduce", reference, 1e-10,
                         "the single process on the same global batches")


@exercise_check(_OwnComm(_weighted_on_rank))
def check_weighted_average(weighted_average):
    """weighted_average(comm, grads, n_local) must return, on every rank, the mean gradient over all ranks'
    examples, sum_r n_r g_r / sum_r n_r, as a new dict name -> array: alone on seeded unequal shards, and
    inside a real data-parallel run, which must equal the single process."""


# ---------------------------------------------------------------- local SGD's averaging

def average_inputs(trial, size):
    """Every rank's parameters (name -> array) for one trial."""
    rng = np.random.default_rng(700 + trial)
    return [{name: rng.normal(size=shape) for name, shape in SHAPES.items()} for _ in range(size)]


def _average_candidates(everyone, rank):
    p = len(everyone)
    summed = {name: sum(x[name] for x in everyone) for name in SHAPES}
    candidates = [(summed, f"that is the sum over the ranks, not divided by their number p = {p}"
                           + (" (or divided by p - 1 = 1)" if p == 2 else ""))]
    if p > 2:
        candidates.append(({name: summed[name] / (p - 1) for name in SHAPES},
                           f"that is the sum over the ranks divided by p - 1 = {p - 1}: divide by p = {p}, the number "
                           f"of ranks whose parameters the sum holds (this rank's own included)"))
    for other in sorted({(rank + 1) % p, (rank - 1) % p} - {rank}):
        candidates.append(({name: (everyone[rank][name] + everyone[other][name]) / 2 for name in SHAPES},
                           f"that is the mean of this rank's and rank {other}'s parameters only: every rank must get "
                           f"the mean over all {p} ranks"))
    candidates.append((everyone[rank], "that is this rank's own parameters: no averaging happened"))
    return candidates


def _average_trial(own, average_parameters, trial):
    """The problem of the learner's average_parameters in one trial, or None."""
    everyone = average_inputs(trial, own.size)
    params = {name: x.copy() for name, x in everyone[own.rank].items()}
    expected = {name: np.mean([x[name] for x in everyone], axis=0) for name in SHAPES}
    watch = _PickleWatch(own)
    got, error = _call(average_parameters, watch, params)
    problem = (f"your function {error}" if error else
               _malformed(got, params, "params") or _changed(everyone[own.rank], params, "params")
               or _alone_problem(got, expected, _average_candidates(everyone, own.rank)))
    if problem is None and any(np.shares_memory(got[name], params[name]) for name in params):
        problem = "your function returned params' own arrays: return new ones"
    problem = problem or _pickled_problem(watch, "")
    return problem and f"trial {trial}: {problem}"


def _average_on_rank(comm, own, average_parameters):
    problems = _each_trial(comm, lambda trial: _average_trial(own, average_parameters, trial))
    if _anyone(comm, problems):
        return problems
    from ..training import load_digits_split, local_sgd, train

    total_steps = RUN["epochs"] * (len(load_digits_split()[1]) // RUN["batch_size"])
    references = {1: train(None, "sequential", **RUN), 4: train(own, "local_sgd", H=4, **RUN)}
    texts = {1: "H = 1 is data-parallel SGD: the single process on the same global batches",
             4: "the same run with the library's average_parameters"}
    for H, reference in references.items():
        watched = _Watched(average_parameters, local_sgd.average_parameters, "params",
                           lambda call, H=H: min((call + 1) * H, total_steps) - 1,
                           lambda comm, args: f"the mean over the {comm.size} ranks of the parameters they passed")
        problems = _run_problems(own, local_sgd, "average_parameters", watched, "local_sgd", reference, 1e-10,
                                 texts[H], H=H)
        if _anyone(comm, problems):
            return problems
    return []


@exercise_check(_OwnComm(_average_on_rank))
def check_average_parameters(average_parameters):
    """average_parameters(comm, params) must return, on every rank, the mean over all ranks of each parameter, as
    new arrays: alone, and inside real local SGD runs (H = 1 must equal data-parallel SGD; H = 4 the library's)."""


# ---------------------------------------------------------------- buckets

BUCKET_MODEL = (64, 48, 32, 24, 10)  # 4 layers: in backward order 2000, 6336, 12544 and 24960 bytes of gradient
BUCKET_CAP = 10_000
BUCKET_CASES = (  # (layer_sizes, bucket_bytes), expected, why
    (([10, 20, 30], None), [[0, 1, 2]], "bucket_bytes=None: one bucket for everything"),
    (([10, 20, 30], 0), [[0], [1], [2]], "bucket_bytes=0: one bucket per layer (each layer alone is over the cap)"),
    (([10, 20, 30], 30), [[0, 1], [2]], "10 + 20 = 30 bytes fit within 30 (a total equal to the cap fits); "
                                        "adding 30 more would not"),
    (([10, 20, 30], 29), [[0], [1], [2]], "10 + 20 = 30 bytes are over 29, and so is 20 + 30"),
    (([10, 50, 5, 5, 40], 20), [[0], [1], [2, 3], [4]],
     "layers 1 (50 bytes) and 4 (40) are over the cap 20: a bucket each; 5 + 5 fit together"),
    (([30, 10, 10, 30], 40), [[0, 1], [2, 3]], "fill each bucket in order while its total stays within 40: "
                                               "30 + 10, then 10 + 30"),
    (([], 100), [], "no layers, no buckets"),
    (([2000, 6336, 12544, 24960], BUCKET_CAP), [[0, 1], [2], [3]],
     f"the layers of the run's MLP 64-48-32-24-10, last layer first: 2000 + 6336 bytes fit within "
     f"{BUCKET_CAP}; 12544 and 24960 are each over it, a bucket each"),
)
SAME_ORDER = ("every rank must make the same buckets: MPI matches the buckets' Iallreduce calls by their order "
              "alone, so different buckets add one rank's layer to another rank's (silently wrong), fail with a "
              "truncation error, or deadlock")


def _call_text(args):
    return f"assign_buckets({args[0]}, {args[1]})"


def _judge_buckets(args, got, expected, why):
    """What is wrong with assign_buckets(*args) = got: the actual mistake, where it can be named."""
    sizes, cap = args
    if not isinstance(got, list) or not all(isinstance(bucket, list) for bucket in got):
        return (f"returned {got!r}: return a list of buckets, each a list of positions in layer_sizes "
                f"(e.g. [[0, 1], [2]])")
    flat = [position for bucket in got for position in bucket]
    not_int = [position for position in flat if not _is_int(position)]
    if not_int:
        return f"returned {got}: {_described(not_int[0])} is not a position; positions in layer_sizes are ints"
    missing = [position for position in range(len(sizes)) if position not in flat]
    problem = None
    strangers = [position for position in flat if not 0 <= position < len(sizes)]
    twice = [position for position in range(len(sizes)) if flat.count(position) > 1]
    if strangers:
        problem = f"there is no layer at position {strangers[0]} (positions run from 0 to len(layer_sizes) - 1)"
    elif twice:
        problem = (f"layer {twice[0]} is in {flat.count(twice[0])} buckets: every layer goes in exactly one "
                   f"(its gradient would be reduced and applied twice)")
    elif missing:
        problem = f"layer {missing[0]} is in no bucket: its gradient would never be reduced"
    elif [] in got:
        problem = f"bucket {got.index([])} is empty"
    elif flat != sorted(flat):
        backward = flat == sorted(flat, reverse=True)
        order = "in forward order (the reverse of layer_sizes)" if backward else "out of order"
        problem = (f"the buckets take the layers {order}: layer_sizes is in backward order already (position 0 is "
                   f"the last layer, whose gradient is ready first), so fill the buckets with positions 0, 1, 2, ... "
                   f"in that order")
    else:
        over = [bucket for bucket in got
                if len(bucket) > 1 and cap is not None and sum(sizes[i] for i in bucket) > cap]
        if over:
            total = " + ".join(str(sizes[i]) for i in over[0])
            problem = (f"bucket {over[0]} holds {total} = {sum(sizes[i] for i in over[0])} bytes, over "
                       f"bucket_bytes={cap}: a bucket may pass the cap only when it holds a single layer")
    if problem is None and got == expected:
        return None
    return f"returned {got}, expected {expected}: {problem or why}"


def _explain_bucket_error(error):
    return ": bucket_bytes=None means one bucket for everything; test for None before comparing" \
        if "NoneType" in error else ""


def _answer_text(assign_buckets, args):
    got, error = _call(assign_buckets, *args)
    return f"your function {error}" if error else f"returned {got!r}"


def _buckets_alone(comm, assign_buckets):
    # first: the same answers on every rank (what the library needs most), then each answer itself
    everyone = comm.allgather([_answer_text(assign_buckets, args) for args, _, _ in BUCKET_CASES])
    for i, (args, _, _) in enumerate(BUCKET_CASES):
        differ = [rank for rank, answers in enumerate(everyone) if answers[i] != everyone[0][i]]
        if differ:
            return [f"{_call_text(args)}: on rank 0 {everyone[0][i]}, on rank {differ[0]} {everyone[differ[0]][i]}: "
                    f"{SAME_ORDER}"]
    return _table(assign_buckets, BUCKET_CASES, lambda i, args: _call_text(args), _judge_buckets,
                  _explain_bucket_error)


def _buckets_on_rank(comm, assign_buckets):
    problems = _buckets_alone(comm, assign_buckets)
    if _anyone(comm, problems):
        return problems
    from ..training import MLP, bucketing, train

    model = MLP(BUCKET_MODEL)
    reference = train(comm, "allreduce", model=model, **RUN)  # un-bucketed, the library's weighted average
    calls = []

    def recorded(layer_sizes, bucket_bytes):
        buckets = assign_buckets(layer_sizes, bucket_bytes)
        calls.append(f"assign_buckets({list(layer_sizes)}, {bucket_bytes}) returned {buckets!r}")
        return buckets

    run = _run_text("bucketed", model.name, bucket_bytes=BUCKET_CAP, overlap=True)
    result, problem = _trained(comm, bucketing, "assign_buckets", recorded, "bucketed", model=model,
                               bucket_bytes=BUCKET_CAP, overlap=True)
    if problem is None and not calls:
        problem = f"{run} never called your function: it was not put in place of bucketing.assign_buckets"
    problem = problem or _final_problem(run, result, reference, 1e-12, "the same run un-bucketed, "
                                        "train(comm, 'allreduce', ...)")
    if problem and calls:
        problem += f"; in the run, {calls[-1]}"
    return [problem] if problem else []


@exercise_check(_buckets_on_rank)
def check_assign_buckets(assign_buckets):
    """assign_buckets(layer_sizes, bucket_bytes) must group the layers, in the order given (backward), into
    buckets of consecutive positions whose bytes stay within bucket_bytes (a bigger layer alone; 0: a bucket
    per layer; None: one bucket), the same on every rank: in a table, and inside a real bucketed run, which
    must equal the un-bucketed one."""
